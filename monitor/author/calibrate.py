"""Rule thresholds at a target per-request false-positive rate on benign recorded traffic.

For each rule and request, the *critical value* is the lowest ``above`` at which the rule would
not fire on it: with the rule's scope, on the rows the pipeline keeps, and with its window —
``token``: the largest in-scope value; ``count n``: the n-th largest (NaN below n tokens: never
fires); ``ema``: the largest value of the request's EMA trace (``state.segmented_ema``, the
evaluator's own function). The chosen ``above`` is the ``(⌊fpr·n⌋+1)``-th largest benign critical
value, so at most ``⌊fpr·n⌋`` benign requests lie strictly above it. The result is then checked
by replaying the benign requests through the compiled evaluator with the new thresholds
(``replay``), and nudged up one float32 step while it fires on more (rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from monitor.author import replay as rp
from monitor.author.errors import AuthorError
from monitor.author.stats import above_at_fpr, allowed_fires, needed
from monitor.evaluate.compiler import CompiledRules
from monitor.evaluate.state import segmented_ema

SCOPE_GENERATED = {0: None, 1: False, 2: True}  # CompiledRule.scope -> generated flag (None: all)


def critical_values(rules: CompiledRules, chunk: rp.Chunk) -> np.ndarray:
    """``[n_requests, n_rules]``: each request's critical value for each rule (NaN: never fires)."""
    out = np.full((len(chunk.requests), len(rules.rules)), np.nan)
    for rule in rules.rules:
        values = chunk.signals[rule.layer][:, rule.column].astype(np.float64)
        mask = chunk.finite[rule.layer].copy()
        want = SCOPE_GENERATED[rule.scope]
        if want is not None:
            mask &= chunk.generated == want
        for i in range(len(chunk.requests)):
            a, b = chunk.offsets[i], chunk.offsets[i + 1]
            v = values[a:b][mask[a:b]]
            if v.size == 0:
                continue
            if rule.window == "token":
                out[i, rule.index] = v.max()
            elif rule.window == "count":
                if v.size >= rule.count_n:
                    out[i, rule.index] = np.partition(v, v.size - rule.count_n)[v.size - rule.count_n]
            else:
                trace = segmented_ema(v, np.array([0]), rule.ema_alpha, np.array([np.nan]))
                out[i, rule.index] = trace.max()
    return out


@dataclass
class Calibrated:
    rule: str
    window: str
    old_above: float
    above: float
    benign: int
    allowed: int
    benign_fired: int  # by the compiled evaluator with the new threshold
    other: int
    other_fired: int


def check_size(n_benign: int, fpr: float, where: str) -> None:
    need = needed(fpr)
    if n_benign < need:
        raise AuthorError(f"{where}: {n_benign} benign requests are too few for a {fpr:.2%} target: at least "
                          f"{need} are needed (at {fpr:.2%}, one benign request in {need} may fire); record "
                          f"longer or raise --fpr")


def calibrate(setup: rp.Setup, requests, benign: set[str], fpr: float, source: str,
              progress=None, only: list[str] | None = None, ids: list[str] | None = None) -> tuple[list[Calibrated], str]:
    """New thresholds for every rule of ``setup`` (or the rules named in ``only``) and the rules
    text with them written in.

    ``requests``: a list of recorded requests, or a function returning a fresh iterator over them
    (a recording is read once per pass instead of held in memory); ``ids``: the recording's request
    ids, so a recording too small is refused before any encoding."""
    from monitor.author.rewrite import set_thresholds

    if not 0 < fpr < 1:
        raise AuthorError(f"--fpr must lie strictly between 0 and 1, got {fpr}")
    rules = setup.rules
    names = [r.name for r in rules.rules]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise AuthorError(f"{setup.rules_path}: no rule {unknown[0]!r} (has: {names[:20]})")
    selected = [r for r in rules.rules if not only or r.name in only]
    passes = requests if callable(requests) else (lambda: iter(requests))
    if ids is None:
        ids = [r.request_id for r in passes()]
    n_benign = sum(i in benign for i in ids)
    check_size(n_benign, fpr, source)
    crit, is_benign = [], []
    for group in rp.chunks(passes()):
        chunk = rp.encode(rules, group)
        crit.append(critical_values(rules, chunk))
        is_benign.extend(rid in benign for rid in chunk.ids)
        if progress is not None:
            progress(len(group))
    values = np.concatenate(crit) if crit else np.zeros((0, len(rules.rules)))
    is_benign = np.asarray(is_benign, dtype=bool)
    chosen: dict[str, float] = {}
    for rule in selected:
        above = above_at_fpr(values[is_benign, rule.index], fpr)
        if math.isnan(above):
            raise AuthorError(f"{source}: rule {rule.name!r} has no in-scope tokens in any benign request "
                              f"(scope {'all prompt generated'.split()[rule.scope]}): nothing to calibrate on")
        chosen[rule.name] = above
    benign_requests = lambda: (r for r in passes() if r.request_id in benign)  # noqa: E731
    allowed = allowed_fires(n_benign, fpr)
    for _ in range(8):  # the evaluator is the judge; float32 rounding may need a step up
        text = set_thresholds(setup.text, chosen, str(setup.rules_path))
        compiled = rp.recompile(text, setup.dictionaries, setup.config, setup.rules_path)
        fired = _fired_counts(compiled, benign_requests())
        over = [name for name, n in fired.items() if n > allowed and name in chosen]
        if not over:
            break
        for name in over:
            chosen[name] = float(np.nextafter(np.float32(chosen[name]), np.float32(np.inf)))
    else:
        raise AuthorError(f"{source}: could not reach {fpr:.2%} for {over} (the evaluator disagrees with the "
                          f"critical values); please report this")
    fired_other = _fired_counts(compiled, (r for r in passes() if r.request_id not in benign))
    report = [Calibrated(rule.name, rule.window, rule.above, chosen[rule.name], n_benign, allowed, fired[rule.name],
                         len(ids) - n_benign, fired_other[rule.name]) for rule in selected]
    return report, text


def _fired_counts(rules: CompiledRules, requests) -> dict[str, int]:
    counts = {r.name: 0 for r in rules.rules}
    for fired in rp.replay(rules, requests).values():
        for f in fired:
            counts[f.rule] += 1
    return counts

