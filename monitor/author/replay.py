"""A recording replayed through exactly the sidecar's compiled evaluator.

The rules are compiled by ``monitor.evaluate.compiler`` against the dictionaries the sidecar
config names; each recorded request's rows go through the pipeline's steps in its order: dedupe
(``RequestTable.dedupe``), the compiled rules' encode (``CompiledRules.encode.compute``, the one
stacked product the pipeline runs), non-finite rows dropped (``pipeline.finite_rows``), then
``RequestTable.evaluate`` with its windows. Nothing about windows or scopes is re-implemented
here, so a backtest raises the alerts the live sidecar raised on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from monitor.evaluate.compiler import CompiledRules, compile_rules
from monitor.evaluate.rules import read_rules_text
from monitor.evaluate.state import LayerBatch, RequestInfo, RequestTable, Verdict
from monitor.pipeline import finite_rows

CHUNK_TOKENS = 8192  # rows encoded at a time: bounded memory whatever the recording's size


@dataclass
class Setup:
    """A sidecar config's dictionaries and a rules file compiled against them."""

    config: object  # SidecarConfig
    dictionaries: object  # Dictionaries
    rules: CompiledRules
    rules_path: Path
    text: str


def load_setup(rules_path: str | Path, config_path: str | Path, text: str | None = None) -> Setup:
    """Compile ``rules_path`` (or ``text``) as the sidecar with ``config_path`` would.

    Raises ConfigError, SAEFormatError or RulesInvalid (each names its file)."""
    from monitor.config import load_config
    from monitor.encode.stage import Dictionaries

    cfg = load_config(config_path)
    dictionaries = Dictionaries(cfg.sources)
    rules_path = Path(rules_path)
    text = read_rules_text(rules_path) if text is None else text
    return Setup(cfg, dictionaries, recompile(text, dictionaries, cfg, rules_path), rules_path, text)


def recompile(text: str, dictionaries, cfg, rules_path: Path) -> CompiledRules:
    return compile_rules(text, dictionaries, 0, str(rules_path), layers=cfg.layers(),
                         direction_dirs=cfg.direction_roots(rules_file=rules_path))


@dataclass
class Chunk:
    """Consecutive recorded requests encoded together: rows of request ``i`` are
    ``[offsets[i], offsets[i+1])`` (sorted by position, as recorded)."""

    requests: list
    offsets: np.ndarray
    token_request: np.ndarray
    positions: np.ndarray
    generated: np.ndarray
    signals: dict = field(default_factory=dict)  # layer -> [N, K] float32 (CompiledRules.encode columns)
    finite: dict = field(default_factory=dict)  # layer -> bool [N]: rows the pipeline keeps (finite)

    @property
    def ids(self) -> list[str]:
        return [r.request_id for r in self.requests]


def chunks(requests: Iterable, max_tokens: int = CHUNK_TOKENS) -> Iterator[list]:
    batch, n = [], 0
    for r in requests:
        batch.append(r)
        n += len(r.positions)
        if n >= max_tokens:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def encode(rules: CompiledRules, requests: list) -> Chunk:
    """The compiled encode of every layer the rules read, for a list of recorded requests."""
    lengths = np.array([len(r.positions) for r in requests], dtype=np.int64)
    chunk = Chunk(list(requests), np.r_[0, np.cumsum(lengths)],
                  np.repeat(np.arange(len(requests)), lengths),
                  np.concatenate([np.asarray(r.positions, dtype=np.int64) for r in requests]) if requests else np.zeros(0, np.int64),
                  np.concatenate([np.asarray(r.generated, dtype=bool) for r in requests]) if requests else np.zeros(0, bool))
    for layer in rules.layers:
        x = torch.cat([r.activations[layer].float() for r in requests]) if requests else torch.zeros(0)
        bad = finite_rows(x)
        signals = rules.encode.compute(layer, x)
        ok = np.ones(len(x), dtype=bool) if bad is None else bad
        if signals.shape[1] and not np.isfinite(signals).all():
            ok &= np.isfinite(signals).all(axis=1)
        chunk.signals[layer], chunk.finite[layer] = signals, ok
    return chunk


def evaluate(rules: CompiledRules, chunk: Chunk, table: RequestTable | None = None) -> list[Verdict]:
    """The verdicts the sidecar's evaluator gives on the chunk's requests (each from its first token)."""
    table = table or fresh_table(rules)
    for r in chunk.requests:
        table.start(RequestInfo(r.request_id, r.api_request_id, dict(r.metadata or {})))
    verdicts: list[Verdict] = []
    for layer in rules.layers:
        lb = LayerBatch(layer, chunk.ids, chunk.token_request, chunk.positions, chunk.generated)
        keep = table.dedupe(lb) & chunk.finite[layer]
        verdicts.extend(table.evaluate(rules, lb, chunk.signals[layer], keep))
    for r in chunk.requests:
        table.finish(r.request_id)
    return verdicts


def fresh_table(rules: CompiledRules) -> RequestTable:
    table = RequestTable(max_requests=1 << 30, idle_timeout_s=float("inf"))
    table.reset_rules(len(rules.rules))
    return table


@dataclass(frozen=True)
class Fired:
    rule: str
    position: int
    value: float


def replay(rules: CompiledRules, requests: Iterable, progress=None) -> dict[str, list[Fired]]:
    """``request_id -> rules fired`` (each rule once, at its firing token) for every request."""
    out: dict[str, list[Fired]] = {}
    table = fresh_table(rules)
    for group in chunks(requests):
        chunk = encode(rules, group)
        for rid in chunk.ids:
            out.setdefault(rid, [])
        for v in evaluate(rules, chunk, table):
            out[v.request.request_id].append(Fired(v.rule.name, v.position, v.value))
        if progress is not None:
            progress(len(group))
    return out
