"""`featurewatch features compare`, `probes train`, `rules calibrate`, `rules backtest`.

Typer sub-apps registered by ``monitor.cli``; every heavy import (torch, scikit-learn, the
reader) happens inside a command. Bad input — a truncated recording, one from another model, a
label file naming unknown requests, a rules/config file that does not compile — is one line on
stderr naming the file and what is wrong, exit code 2, no traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

features_app = typer.Typer(help="Find the SAE features that separate two sets of recorded requests.", no_args_is_help=True)
probes_app = typer.Typer(help="Train linear probes on recorded activations.", no_args_is_help=True)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

RecordingArg = typer.Argument(..., help="A recording directory (sidecar config `record:`).")
TokenizerOpt = typer.Option(None, "--tokenizer", help="The served model's tokenizer (tokenizer.json or its directory), for regexes over the generated text.")
ScopeOpt = typer.Option("generated", "--scope", help="Tokens a request is judged on: generated | prompt | all.")


@contextlib.contextmanager
def bad_input():
    """Every refusal of the authoring commands: one line, exit 2."""
    from monitor.config import ConfigError
    from monitor.encode.errors import SAEFormatError
    from monitor.evaluate.rules import RulesInvalid
    from monitor.record import RecordingError

    from monitor.author.errors import AuthorError

    try:
        yield
    except RulesInvalid as exc:
        for e in exc.errors:
            err.print(f"[red]✗[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2)
    except (AuthorError, RecordingError, ConfigError, SAEFormatError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2)


def _progress(total: int, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True)
    task = progress.add_task(what, total=total)
    return progress, (lambda n=1: progress.advance(task, n))


def _open(path: Path):
    from monitor.record import Recording

    rec = Recording.open(path)
    if rec.requests.num_rows == 0:
        from monitor.author.errors import AuthorError

        raise AuthorError(f"{path}: the recording holds no complete request"
                          + (f" ({len(rec.incomplete_shards)} incomplete shard(s) ignored)" if rec.incomplete_shards else ""))
    if rec.incomplete_shards:
        err.print(f"[yellow]note:[/yellow] {len(rec.incomplete_shards)} incomplete shard(s) of {path} ignored", highlight=False)
    return rec


def _catalog(rec, path: Path):
    from monitor.author.sets import Catalog

    return Catalog.of(rec.iter_requests(layers=[]), str(path))


def _detok(tokenizer: Optional[Path]):
    from monitor.author.text import Detokenizer

    return Detokenizer(tokenizer) if tokenizer is not None else None


def _check_scope(scope: str) -> None:
    from monitor.author.errors import AuthorError

    if scope not in ("generated", "prompt", "all"):
        raise AuthorError(f"--scope must be generated, prompt or all, got {scope!r}")


def _num(v: float, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# ------------------------------------------------------------------------------ features compare


@features_app.command("compare")
def features_compare(
    recording: Path = RecordingArg,
    positive: str = typer.Option(..., "--positive", "-p", help="The set to find features for: labels:FILE[#VALUE], KEY=VALUE, rule:NAME, regex:PATTERN, not:<set>, all."),
    negative: Optional[str] = typer.Option(None, "--negative", "-n", help="The set to separate it from (default: every other recorded request)."),
    sae: Optional[Path] = typer.Option(None, "--sae", help="An SAE (any supported format) reading --layer."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A sidecar config: use its SAE source on --layer (or --source)."),
    source: Optional[str] = typer.Option(None, "--source", help="With --config: the SAE source's name."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="The layer the SAE reads (default: the config source's, or the recording's only layer)."),
    scope: str = ScopeOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
    top: int = typer.Option(20, "--top", help="Features to show."),
    fpr: float = typer.Option(0.01, "--fpr", help="Target share of negative requests for the above@fpr column."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Rank SAE features by how well their per-request maximum separates two request sets (AUROC), with
    firing rates in each set and the threshold a rule would need."""
    with bad_input():
        from monitor.author import compare as cmp
        from monitor.author.errors import AuthorError
        from monitor.author.sets import resolve

        _check_scope(scope)
        model, layer, what = _sae(sae, config, source, layer, recording)
        rec = _open(recording)
        rec.check_compatible(d_model=model.d_in, layers=[layer], source=what)
        catalog = _catalog(rec, recording)
        detok = _detok(tokenizer)
        pos = resolve(positive, catalog, detok)
        neg = resolve(negative, catalog, detok) if negative else set(catalog.ids) - pos
        overlap = pos & neg
        if overlap:
            raise AuthorError(f"{len(overlap)} request(s) are in both the positive and the negative set")
        if not pos or not neg:
            raise AuthorError(f"{recording}: the positive set has {len(pos)} requests and the negative {len(neg)}: both need some")
        progress, step = _progress(len(pos) + len(neg), f"encoding {len(pos) + len(neg)} requests")
        with progress:
            _, p = cmp.request_maxima(model, rec.iter_requests(layers=[layer]), layer, scope, pos, step)
            _, n = cmp.request_maxima(model, rec.iter_requests(layers=[layer]), layer, scope, neg, step)
        scores = cmp.rank(p, n, top=top, fpr=fpr)
    if as_json:
        print(json.dumps({"recording": str(recording), "layer": layer, "scope": scope, "positive": {"set": positive, "requests": len(p)},
                          "negative": {"set": negative or f"not:{positive}", "requests": len(n)}, "fpr": fpr,
                          "features": cmp.as_json(scores)}))
        return
    table = Table(title=f"SAE features separating {escape(positive)} ({len(p)} requests) from "
                        f"{escape(negative or 'the rest')} ({len(n)}), layer {layer}, {scope} tokens")
    for col in ("feature", "AUROC", "fires (+)", "fires (−)", "mean max (+)", "mean max (−)", f"above@{fpr:g}", f"TPR@{fpr:g}"):
        table.add_column(col, justify="right")
    for s in scores:
        table.add_row(str(s.feature), _num(s.auroc), f"{s.rate_positive:.0%}", f"{s.rate_negative:.0%}", _num(s.mean_positive, 2),
                      _num(s.mean_negative, 2), _num(s.above_at_fpr, 4), f"{s.tpr_at_fpr:.0%}")
    console.print(table)


def _sae(sae: Optional[Path], config: Optional[Path], source: Optional[str], layer: Optional[int], recording: Path):
    """(SAE, layer, its file for errors) from --sae or a config's SAE source."""
    from monitor.author.errors import AuthorError
    from monitor.encode import load_sae

    if (sae is None) == (config is None):
        raise AuthorError("give either --sae PATH (with --layer) or --config sidecar.yaml")
    if sae is not None:
        if layer is None:
            from monitor.record import Recording

            layers = Recording.open(recording).manifest.layers
            if len(layers) != 1:
                raise AuthorError(f"--layer is needed: {recording} holds layers {layers}")
            layer = layers[0]
        return load_sae(sae), layer, str(sae)
    from monitor.config import load_config

    cfg = load_config(config)
    saes = [s for s in cfg.sources if s.kind == "sae" and (source is None or s.name == source) and (layer is None or s.layer == layer)]
    if len(saes) != 1:
        have = [f"{s.name} (layer {s.layer})" for s in cfg.sources if s.kind == "sae"]
        raise AuthorError(f"{config}: {'no' if not saes else 'more than one'} SAE source matches"
                          f"{f' --source {source}' if source else ''}{f' --layer {layer}' if layer is not None else ''} (has: {have})")
    s = saes[0]
    return load_sae(s.path, format=s.format), s.layer, str(s.path)


# ------------------------------------------------------------------------------ probes train


@probes_app.command("train")
def probes_train(
    recording: Path = RecordingArg,
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="The layer to read (default: the recording's only layer)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="JSONL {api_request_id, label}: label true/false or concept name(s); one probe per name."),
    regex: Optional[List[str]] = typer.Option(None, "--regex", help="NAME=PATTERN over the generated text: one probe NAME (repeatable); needs --tokenizer."),
    tokenizer: Optional[Path] = TokenizerOpt,
    out: Path = typer.Option(..., "--out", "-o", help="The probe-bank file to write (safetensors)."),
    per: Optional[str] = typer.Option(None, "--per", help="Labels per token (regex spans) or per request (default: token with --regex, request with --labels)."),
    scope: str = ScopeOpt,
    fpr: float = typer.Option(0.01, "--fpr", help="Threshold at this false-positive rate on benign held-out data."),
    holdout: float = typer.Option(0.3, "--holdout", help="Share of labelled requests held out for the metrics and the threshold."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and the folds."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Train logistic probes (standardised, Platt-calibrated, threshold at --fpr) and write the probe bank
    the sidecar serves; print held-out AUROC and TPR at that FPR per probe."""
    with bad_input():
        import numpy as np

        from monitor.author import train as tr
        from monitor.author.errors import AuthorError
        from monitor.author.sets import compile_regex, labelled

        _check_scope(scope)
        if (labels is None) == (not regex):
            raise AuthorError("give either --labels FILE.jsonl or --regex NAME=PATTERN (one or more)")
        per = per or ("token" if regex else "request")
        if per == "token" and labels is not None:
            raise AuthorError(f"{labels}: a label file labels requests, not tokens: use --per request (or --regex for per-token labels)")
        rec = _open(recording)
        if layer is None:
            if len(rec.manifest.layers) != 1:
                raise AuthorError(f"--layer is needed: {recording} holds layers {rec.manifest.layers}")
            layer = rec.manifest.layers[0]
        rec.check_compatible(layers=[layer], source=f"--layer {layer}")
        catalog = _catalog(rec, recording)
        if regex:
            patterns = {}
            for item in regex:
                name, eq, pattern = item.partition("=")
                if not eq or not name or not pattern:
                    raise AuthorError(f"--regex wants NAME=PATTERN, got {item!r}")
                patterns[name] = compile_regex(pattern, f"--regex {name}")
            names = list(patterns)
            catalog.texts(_detok(tokenizer))
            spans = {e.request_id: e for e in catalog.entries}

            def labels_of(r, mask):
                e = spans[r.request_id]
                tok = np.zeros((len(r.positions), len(names)), dtype=bool)
                gen_rows = np.flatnonzero(r.generated)
                for p, name in enumerate(names):
                    hits = [(m.start(), m.end()) for m in patterns[name].finditer(e.text) if m.end() > m.start()]
                    tok[gen_rows, p] = e.token_spans.tokens_overlapping(hits)
                return tok[mask], tok.any(axis=0)
        else:
            by_request = labelled(catalog, labels)
            named = sorted({n for got in by_request.values() for n in got})
            names = [n or labels.stem for n in named] if named else [labels.stem]
            keys = named or [""]

            def labels_of(r, mask):
                got = by_request.get(r.request_id)
                if got is None:
                    return None
                req = np.array([k in got for k in keys], dtype=bool)
                return np.broadcast_to(req, (int(mask.sum()), len(keys))), req
        progress, step = _progress(rec.requests.num_rows, f"reading layer {layer}")
        with progress:
            examples = tr.gather(rec.iter_requests(layers=[layer]), layer, scope, labels_of, step)
        with console.status(f"fitting {len(names)} probe(s) on {len(examples)} requests …"):
            reports = tr.train(examples, names, layer, out, per=per, fpr=fpr, holdout=holdout, seed=seed)
    if as_json:
        print(json.dumps({"out": str(out), "layer": layer, "per": per, "fpr": fpr, "probes": tr.as_json(reports)}))
        return
    table = Table(title=f"Probes written to {escape(str(out))} (layer {layer}); held-out {reports[0].heldout_requests} "
                        f"of {reports[0].heldout_requests + reports[0].train_requests} requests, per {per}")
    for col in ("probe", "pos. held-out req.", f"AUROC ({per})", f"TPR@{fpr:g}", "FPR", "benign units", "AUROC (request)",
                "TPR (request)", "FPR (request)", "threshold"):
        table.add_column(col, justify="right" if col != "probe" else "left")
    for r in reports:
        table.add_row(escape(r.name), str(r.heldout_positive), _num(r.auroc), _num(r.tpr), _num(r.fpr), str(r.benign_units),
                      _num(r.request_auroc), _num(r.request_tpr), _num(r.request_fpr), f"{r.threshold:.4g}")
    console.print(table)
    for r in reports:
        for w in r.warnings:
            err.print(f"[yellow]note:[/yellow] {escape(r.name)}: {escape(w)}", highlight=False)


# ------------------------------------------------------------------------------ rules calibrate / backtest


def rules_calibrate(
    rules: Path = typer.Argument(..., help="The rules file to calibrate."),
    recording: Path = RecordingArg,
    config: Path = typer.Option(..., "--config", "-c", help="The sidecar config the rules run under (its SAEs and probes)."),
    fpr: float = typer.Option(0.01, "--fpr", help="Per-request false-positive target on the benign requests."),
    benign: str = typer.Option("all", "--benign", help="The benign requests (a set: labels:FILE, not:labels:FILE, KEY=VALUE, …; default all)."),
    rule: Optional[List[str]] = typer.Option(None, "--rule", "-r", help="Calibrate only this rule (repeatable; default: every rule), "
                                                                         "e.g. each concept's rules against the requests without that concept."),
    tokenizer: Optional[Path] = TokenizerOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the calibrated rules here."),
    write: bool = typer.Option(False, "--write", help="Write the calibrated thresholds back into RULES."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Set each rule's `above` so it fires on at most --fpr of the benign requests of a recording (per
    request, with the rule's scope and window); the rest of the file is kept as written."""
    with bad_input():
        from monitor.author import replay as rp
        from monitor.author.calibrate import calibrate
        from monitor.author.errors import AuthorError
        from monitor.author.sets import resolve

        if out is not None and write:
            raise AuthorError("give --out FILE or --write, not both")
        setup = rp.load_setup(rules, config)
        rec = _open(recording)
        rec.check_compatible(d_model=setup.dictionaries.d_model(), layers=setup.rules.layers, source=str(config))
        catalog = _catalog(rec, recording)
        benign_ids = resolve(benign, catalog, _detok(tokenizer))
        progress, step = _progress(rec.requests.num_rows, "encoding")
        with progress:
            report, text = calibrate(setup, lambda: rec.iter_requests(layers=setup.rules.layers), benign_ids, fpr,
                                     str(recording), step, only=rule or None, ids=catalog.ids)
        target = rules if write else out
        if target is not None:
            _write_text(target, text)
    if as_json:
        print(json.dumps({"fpr": fpr, "written_to": str(target) if target else None,
                          "rules": [r.__dict__ for r in report]}))
    else:
        table = Table(title=f"Thresholds at {fpr:.2%} of {report[0].benign if report else 0} benign requests ({escape(benign)})")
        for col in ("rule", "window", "above (was)", "above (now)", "benign fired", "allowed", "other fired"):
            table.add_column(col, justify="left" if col in ("rule", "window") else "right")
        for r in report:
            table.add_row(escape(r.rule), r.window, f"{r.old_above:g}", f"{r.above:.6g}", f"{r.benign_fired}/{r.benign}",
                          str(r.allowed), f"{r.other_fired}/{r.other}")
        console.print(table)
        if target is None:
            err.print("(dry run: --write to update the rules file, or --out FILE)")
        else:
            console.print(f"[green]✓[/green] written to {escape(str(target))}", highlight=False)


def _write_text(path: Path, text: str) -> None:
    """Atomically (temp file + rename), keeping an existing file's mode."""
    import os
    import tempfile

    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def rules_backtest(
    rules: Path = typer.Argument(..., help="The rules file to replay."),
    recording: Path = RecordingArg,
    config: Path = typer.Option(..., "--config", "-c", help="The sidecar config the rules run under."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="JSONL {api_request_id, label}: precision/recall per rule (a rule's positives: "
                                                                 "label true/1, or a name equal to the rule's name or its labels.concept)."),
    compare_live: bool = typer.Option(False, "--compare-live", help="Exit 1 when the replay differs from the alerts the live sidecar recorded "
                                                                     "(the comparison is always shown; differences are expected for edited rules)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Replay a recording through the sidecar's compiled evaluator: per rule, requests fired and rate,
    precision/recall against labels, and every difference from the alerts raised live."""
    with bad_input():
        from monitor.author import backtest as bt
        from monitor.author import replay as rp

        setup = rp.load_setup(rules, config)
        rec = _open(recording)
        rec.check_compatible(d_model=setup.dictionaries.d_model(), layers=setup.rules.layers, source=str(config))
        progress, step = _progress(rec.requests.num_rows, "replaying")
        with progress:
            result = bt.backtest(setup.rules, rec.iter_requests(layers=setup.rules.layers), step, str(recording))
        truth = bt.truth_for_rules(setup.rules, result.catalog, labels) if labels is not None else None
        summary = bt.summarise(setup.rules, result, truth)
        mismatches = bt.compare_live(setup.rules, result)
    if as_json:
        print(json.dumps({"requests": result.n_requests, "rules": summary,
                          "live_mismatches": [m.__dict__ for m in mismatches]}))
    else:
        table = Table(title=f"Backtest of {escape(str(rules))} on {result.n_requests} recorded requests")
        cols = ["rule", "fired", "rate"] + (["TP", "FP", "FN", "precision", "recall"] if truth is not None else []) + [
            "live fired", "differences"]
        for col in cols:
            table.add_column(col, justify="left" if col == "rule" else "right")
        for s in summary:
            row = [escape(s["rule"]), str(s["fired"]), f"{s['rate']:.2%}"]
            if truth is not None:
                row += [str(s["tp"]), str(s["fp"]), str(s["fn"]), _num(s["precision"], 2), _num(s["recall"], 2)]
            row += [str(s["live_fired"]), str(sum(m.rule == s["rule"] for m in mismatches))]
            table.add_row(*row)
        console.print(table)
        if mismatches:
            for m in mismatches[:20]:
                err.print(f"[yellow]≠[/yellow] {escape(m.describe())}", highlight=False)
            if len(mismatches) > 20:
                err.print(f"… and {len(mismatches) - 20} more (--json lists all)")
        else:
            console.print("[green]✓[/green] the replay raised exactly the alerts the live sidecar recorded")
    if mismatches and compare_live:
        raise typer.Exit(1)


def register(app: typer.Typer, rules_app: typer.Typer) -> None:
    """Add the authoring commands to the `featurewatch` app."""
    app.add_typer(features_app, name="features")
    app.add_typer(probes_app, name="probes")
    rules_app.command("calibrate")(rules_calibrate)
    rules_app.command("backtest")(rules_backtest)
