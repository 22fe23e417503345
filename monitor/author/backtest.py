"""Backtest: a recording replayed through the compiled evaluator, scored against labels and
compared with the alerts the live sidecar recorded for the same requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from monitor.author import replay as rp
from monitor.author.sets import Catalog, Entry, labelled
from monitor.author.stats import precision_recall
from monitor.evaluate.compiler import CompiledRules


@dataclass
class Result:
    catalog: Catalog  # the replayed requests (no activations), with what the live sidecar recorded
    fired: dict[str, list[rp.Fired]] = field(default_factory=dict)  # request_id -> replayed verdicts

    @property
    def n_requests(self) -> int:
        return len(self.catalog.entries)


def backtest(rules: CompiledRules, requests: Iterable, progress=None, source: str = "<recording>") -> Result:
    entries: list[Entry] = []

    def keep(requests):
        for r in requests:
            entries.append(Catalog.of([r]).entries[0])
            yield r

    fired = rp.replay(rules, keep(requests), progress)
    return Result(Catalog(entries, source), fired)


def truth_for_rules(rules: CompiledRules, catalog: Catalog, labels_path) -> dict[str, tuple[set, set]]:
    """``rule -> (positive request ids, labelled request ids)``: a request is positive for a rule when
    its label is true/1, or names the rule or the rule's ``labels.concept``."""
    names = labelled(catalog, labels_path)
    universe = set(names)
    out = {}
    for rule in rules.rules:
        keys = {"", rule.name, rule.labels.get("concept", rule.name)}
        out[rule.name] = ({rid for rid, got in names.items() if got & keys}, universe)
    return out


def summarise(rules: CompiledRules, result: Result, truth=None) -> list[dict]:
    n = result.n_requests
    rows = []
    for rule in rules.rules:
        fired = {rid for rid, fs in result.fired.items() if any(f.rule == rule.name for f in fs)}
        live = {e.request_id for e in result.catalog.entries if rule.name in e.rules_fired}
        row = {"rule": rule.name, "fired": len(fired), "rate": len(fired) / n if n else float("nan"), "live_fired": len(live)}
        if truth is not None:
            positive, universe = truth[rule.name]
            tp, fp, fn, precision, recall = precision_recall(fired, positive, universe)
            row.update(tp=tp, fp=fp, fn=fn, precision=precision, recall=recall, labelled=len(universe))
        rows.append(row)
    return rows


@dataclass
class Mismatch:
    request_id: str
    api_request_id: str
    rule: str
    live_position: int | None  # None: the live sidecar did not fire it
    replay_position: int | None  # None: the replay did not fire it

    def describe(self) -> str:
        who = self.api_request_id or self.request_id
        if self.live_position is None:
            return f"{who}: {self.rule} fired in the replay at position {self.replay_position}, not live"
        if self.replay_position is None:
            return f"{who}: {self.rule} fired live at position {self.live_position}, not in the replay"
        return f"{who}: {self.rule} fired live at position {self.live_position}, in the replay at {self.replay_position}"


def compare_live(rules: CompiledRules, result: Result) -> list[Mismatch]:
    """Every (request, rule of this file) where the replay and the live sidecar disagree on whether
    or where the rule fired. Rules the file does not have are not compared."""
    known = {r.name for r in rules.rules}
    out = []
    for e in result.catalog.entries:
        live = {name: pos for name, pos in zip(e.rules_fired, e.fired_positions or [None] * len(e.rules_fired)) if name in known}
        replayed = {f.rule: f.position for f in result.fired.get(e.request_id, [])}
        for name in sorted(set(live) | set(replayed)):
            a, b = live.get(name), replayed.get(name)
            if name not in live or name not in replayed or a != b:
                out.append(Mismatch(e.request_id, e.api_request_id, name, a if name in live else None,
                                    b if name in replayed else None))
    return out
