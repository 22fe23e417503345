"""`featurewatch record ls|show`: what a recording holds, and one request token by token."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

record_app = typer.Typer(help="Read flight recordings (the sidecar's `record:`).", no_args_is_help=True)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # recorded text is untrusted: no terminal escapes


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _open(path: Path):
    from monitor.record import Recording, RecordingError

    try:
        return Recording.open(path)
    except RecordingError as exc:
        _fail(str(exc), 2)


def _when(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S") if unix_s else "-"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _clean(text: str) -> str:
    return _CONTROL.sub("\ufffd", text.replace("\n", "⏎").replace("\t", " "))


@record_app.command("ls")
def record_ls(directory: Path = typer.Argument(..., help="The recording directory (record.dir).")) -> None:
    """The manifest, the shards (complete or not) and what they hold."""
    from monitor.record.format import KINDS, scan_shards, shard_files

    rec = _open(directory)
    m = rec.manifest
    console.print(f"[bold]{escape(str(rec.path))}[/bold]: model {escape(m.model_name)}, d_model {m.d_model}, layers {m.layers}, "
                  f"{m.dtype}, created {_when(m.created_unix_s)}, rules version {m.sidecar.rules_version}", highlight=False)
    for name, s in m.sidecar.sources.items():
        console.print(f"  source {escape(name)}: {s.kind} layer {s.layer} {escape(s.path)}", highlight=False)
    table = Table("shard", "requests", "tokens", "sample", "rule", "size", "written", "status")
    found = scan_shards(rec.path)
    requests = rec.requests.to_pydict()
    for number in sorted(found):
        files = shard_files(rec.path, number)
        size = sum(p.stat().st_size for p in files.values() if p.exists())
        if number in rec.incomplete_shards:
            missing = ", ".join(k for k in KINDS if k not in found[number])
            table.add_row(str(number), "-", "-", "-", "-", _size(size), "-", f"[yellow]incomplete[/yellow] (no {missing}: ignored)")
            continue
        rows = [i for i, s in enumerate(requests["shard"]) if s == number]
        reasons = [requests["reason"][i] for i in rows]
        table.add_row(str(number), str(len(rows)), str(sum(requests["token_count"][i] for i in rows)),
                      str(reasons.count("sample")), str(reasons.count("rule")), _size(size),
                      _when(files["requests.parquet"].stat().st_mtime), "complete")
    console.print(table)
    fired: dict[str, int] = {}
    for rules in requests["rules_fired"]:
        for rule in dict.fromkeys(rules):
            fired[rule] = fired.get(rule, 0) + 1
    console.print(f"{rec.requests.num_rows} requests, {sum(requests['token_count'])} tokens in {len(rec.shards)} complete "
                  f"shards" + (f"; {len(rec.incomplete_shards)} incomplete ignored" if rec.incomplete_shards else ""),
                  highlight=False)
    if fired:
        console.print("requests per rule fired: " + ", ".join(f"{escape(k)} {v}" for k, v in sorted(fired.items())), highlight=False)


class _Signals:
    """SAEs and probe banks to show per token: from a sidecar config's sources, or named files."""

    def __init__(self, rec, config: Optional[Path], sae: Optional[Path], probes: Optional[Path], layer: Optional[int]):
        from monitor.encode import load_probes, load_sae
        from monitor.encode.errors import SAEFormatError
        from monitor.record import RecordingError

        self.saes, self.banks = [], []  # (name, layer, object)
        todo = []
        if config is not None:
            from monitor.config import ConfigError, load_config

            try:
                cfg = load_config(config)
            except ConfigError as exc:
                _fail(str(exc), 2)
            todo += [(s.name, s.kind, s.layer, s.path, s.format) for s in cfg.sources if s.layer in rec.manifest.layers]
            self.tokenizer_path = cfg.tokenizer if hasattr(cfg, "tokenizer") else None
        else:
            self.tokenizer_path = None
        layer = rec.manifest.layers[0] if layer is None else layer
        if sae is not None:
            todo.append((sae.name, "sae", layer, sae, None))
        if probes is not None:
            todo.append((probes.name, "probes", None, probes, None))
        try:
            for name, kind, at, path, fmt in todo:
                if kind == "sae":
                    obj = load_sae(path, format=fmt)
                    rec.check_compatible(d_model=obj.d_in, layers=[at], source=str(path))
                    self.saes.append((name, at, obj))
                else:
                    obj = load_probes(path)
                    at = obj.layer if at is None else at
                    rec.check_compatible(d_model=obj.d_in, layers=[at], source=str(path))
                    self.banks.append((name, at, obj))
        except (SAEFormatError, RecordingError) as exc:
            _fail(str(exc), 2)

    @property
    def layers(self) -> list[int]:
        return sorted({at for _, at, _ in self.saes + self.banks})


def _tokenizer(path: Optional[Path]):
    if path is None:
        return None
    from monitor.export.context import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path)
    except TokenizerError as exc:
        _fail(str(exc).replace("tokenizer:", "--tokenizer:", 1), 2)


@record_app.command("show")
def record_show(directory: Path = typer.Argument(..., help="The recording directory (record.dir)."),
                request: Optional[str] = typer.Option(None, "--request", "-r", help="One request (vLLM or API id): its tokens."),
                tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json (or its directory) to show text."),
                config: Optional[Path] = typer.Option(None, "--config", "-c", help="Sidecar config: per-token values of its "
                                                      "sources (SAEs: top features; probe banks: scores), and its tokenizer."),
                sae: Optional[Path] = typer.Option(None, "--sae", help="An SAE to show top features of, per token."),
                probes: Optional[Path] = typer.Option(None, "--probes", help="A probe bank to score each token with."),
                layer: Optional[int] = typer.Option(None, "--layer", help="The layer --sae reads (default: the first recorded)."),
                top: int = typer.Option(3, "--top", min=1, max=32, help="Top SAE features shown per token."),
                limit: int = typer.Option(50, "--limit", "-n", min=1, help="Requests listed (without --request).")) -> None:
    """List recorded requests (with text when a tokenizer is given), or show one request token by token."""
    rec = _open(directory)
    signals = _Signals(rec, config, sae, probes, layer) if (config or sae or probes or request) else None
    tok = _tokenizer(tokenizer or (signals.tokenizer_path if signals else None))
    from monitor.record import RecordingError

    try:
        if request is None:
            _list(rec, tok, limit)
        else:
            _one(rec, request, tok, signals, top)
    except RecordingError as exc:  # a shard found truncated or corrupt while reading it
        _fail(str(exc), 2)


def _text(tok, ids) -> str:
    ids = [int(i) for i in ids if i >= 0]
    return _clean(tok.decode(ids, skip_special_tokens=False)) if tok is not None and ids else ""


def _list(rec, tok, limit: int) -> None:
    table = Table("shard", "api request id", "reason", "prompt", "generated", "finish", "rules fired",
                  *(["generated text"] if tok is not None else []))
    shown = 0
    for r in rec.iter_requests(layers=[]):
        if shown >= limit:
            break
        shown += 1
        fired = ", ".join(f"{rule}@{p}" for rule, p in zip(r.rules_fired, r.fired_positions))
        extra = [escape(_text(tok, r.token_ids[r.generated])[:120])] if tok is not None else []
        table.add_row(str(r.shard), escape(r.api_request_id or r.request_id), r.reason, str(r.prompt_tokens),
                      str(r.generated_tokens), escape(r.finish_reason), escape(fired), *extra)
    console.print(table)
    console.print(f"{shown} of {rec.requests.num_rows} requests shown", highlight=False)


def _one(rec, request: str, tok, signals: _Signals, top: int) -> None:
    import torch

    found = list(rec.iter_requests(layers=signals.layers, request_ids=[request]))
    if not found:
        _fail(f"{rec.path}: no request {request[:120]!r} in the recording (ids: `featurewatch record show {rec.path}`)")
    r = found[0]
    console.print(f"[bold]{escape(r.api_request_id)}[/bold] ({escape(r.request_id)}) shard {r.shard}, {r.reason}, "
                  f"finish {escape(r.finish_reason or '-')}, metadata {escape(str(r.metadata))}", highlight=False)
    if r.rules_fired:
        console.print("rules fired: " + ", ".join(f"{escape(a)} at {p}" for a, p in zip(r.rules_fired, r.fired_positions)),
                      highlight=False)
    if tok is not None:
        console.print(f"prompt: {escape(_text(tok, r.token_ids[~r.generated]))}", highlight=False)
        console.print(f"generated: {escape(_text(tok, r.token_ids[r.generated]))}", highlight=False)
    columns, values = [], []
    with torch.no_grad():
        for name, at, sae in signals.saes:
            v, i = sae.encode_top(r.activations[at], top)
            columns.append(f"{name} (L{at}) top {top}")
            values.append([" ".join(f"{int(f)}:{float(x):.2f}" for f, x in zip(fi, vi) if x > 0) or "-"
                           for fi, vi in zip(i.tolist(), v.tolist())])
        for name, at, bank in signals.banks:
            scores = bank.score(r.activations[at])
            for j, probe in enumerate(bank.names):
                columns.append(f"{probe} (L{at})")
                values.append([f"{float(s):.3f}" for s in scores[:, j].tolist()])
    table = Table("pos", "", "token id", *(["token"] if tok is not None else []), *columns)
    fired_at = {}
    for rule, p in zip(r.rules_fired, r.fired_positions):
        fired_at.setdefault(p, []).append(rule)
    for k in range(r.n_tokens):
        pos = int(r.positions[k])
        mark = "G" if r.generated[k] else "P"
        token = [escape(repr(_text(tok, [r.token_ids[k]]))[1:-1])] if tok is not None else []
        row = [str(pos) + (" ⚑" if pos in fired_at else ""), mark, str(int(r.token_ids[k])), *token,
               *(escape(col[k]) for col in values)]
        table.add_row(*row)
    console.print(table)
