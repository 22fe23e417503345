"""Per-request evaluation state: dedupe by (request, layer, position), windows, fire-once verdicts.

Work is vectorised per batch; Python only runs per (request, rule) pair that matched, which is rare.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from monitor.evaluate.tokens import AFTER, BEFORE, TokenWindows, context_around

if TYPE_CHECKING:
    from monitor.evaluate.compiler import CompiledRule, CompiledRules


@dataclass
class RequestInfo:
    """What the plugin told us about a request when it started."""

    request_id: str
    api_request_id: str = ""
    metadata: dict = field(default_factory=dict)
    traceparent: str = ""
    stream: object = None  # the ingest stream that carries it (where directives go)
    steering_policy: str = ""


@dataclass
class RequestState:
    info: RequestInfo
    n_rules: int
    next_position: dict = field(default_factory=dict)  # layer -> first position not yet seen
    counts: np.ndarray = None
    ema: np.ndarray = None
    fired: np.ndarray = None
    touched: float = field(default_factory=time.monotonic)
    token_row: int = -1  # its row of the table's TokenWindows, once it sent token ids

    def __post_init__(self) -> None:
        self.resize(self.n_rules)

    def resize(self, n_rules: int) -> None:
        """A new rule set starts every window afresh for requests in flight."""
        self.n_rules = n_rules
        self.counts = np.zeros(n_rules, dtype=np.int64)
        self.ema = np.full(n_rules, np.nan)
        self.fired = np.zeros(n_rules, dtype=bool)


@dataclass(frozen=True)
class Verdict:
    """A rule fired for a request at a token."""

    rule: CompiledRule
    request: RequestInfo
    position: int
    value: float
    rules_version: int


@dataclass
class LayerBatch:
    """One layer's slice of a decoded activation batch, after dedupe."""

    layer: int
    request_ids: list
    token_request: np.ndarray  # [N] int index into request_ids
    positions: np.ndarray  # [N] int64
    generated: np.ndarray  # [N] bool
    states: list | None = None  # RequestState per request_ids entry, looked up once per batch


class RequestTable:
    """Bounded table of requests in flight (LRU eviction counted), with the evaluation logic."""

    def __init__(self, max_requests: int, idle_timeout_s: float) -> None:
        self.max_requests = max_requests
        self.idle_timeout_s = idle_timeout_s
        self._states: OrderedDict[str, RequestState] = OrderedDict()
        self.evicted = 0
        # called with the id of each request dropped without a RequestFinish (evicted, idle), so what
        # other stages keep per request (the steering table) goes with it
        self.on_drop: Callable[[str], None] | None = None
        self.deduplicated_tokens = 0
        self._n_rules = 0
        self.tokens = TokenWindows(max_requests + 1)  # +1: a new request is in before the evict

    def __len__(self) -> int:
        return len(self._states)

    def get(self, request_id: str) -> RequestState | None:
        return self._states.get(request_id)

    def start(self, info: RequestInfo) -> RequestState:
        state = self._states.get(info.request_id)
        if state is None:
            state = RequestState(info, self._n_rules)
            self._states[info.request_id] = state
            self._evict()
        else:
            state.info = info
        return state

    def finish(self, request_id: str) -> RequestState | None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self.tokens.release(state.token_row)
        return state

    def reset_rules(self, n_rules: int) -> None:
        self._n_rules = n_rules
        for state in self._states.values():
            state.resize(n_rules)

    def expire_idle(self) -> int:
        cutoff = time.monotonic() - self.idle_timeout_s
        stale = [rid for rid, s in self._states.items() if s.touched < cutoff]
        for rid in stale:
            self.tokens.release(self._states.pop(rid).token_row)
            self._dropped(rid)
        return len(stale)

    def _evict(self) -> None:
        while len(self._states) > self.max_requests:
            rid, state = self._states.popitem(last=False)
            self.tokens.release(state.token_row)
            self.evicted += 1
            self._dropped(rid)

    def _dropped(self, request_id: str) -> None:
        if self.on_drop is not None:
            self.on_drop(request_id)

    def _state_for(self, request_id: str, now: float | None = None) -> RequestState:
        state = self._states.get(request_id)
        if state is None:  # batch before RequestStart (or after a sidecar restart): track anyway
            state = self.start(RequestInfo(request_id))
        self._states.move_to_end(request_id)
        state.touched = time.monotonic() if now is None else now
        return state

    def _states_of(self, batch: LayerBatch) -> list[RequestState]:
        """The batch's request states, looked up (and LRU-touched) once per batch."""
        if batch.states is None:
            now = time.monotonic()
            batch.states = [self._state_for(rid, now) for rid in batch.request_ids]
        return batch.states

    def note_tokens(self, batch: LayerBatch, token_ids: np.ndarray) -> None:
        """Keep the batch's token ids in each request's window (an alert's context)."""
        states = self._states_of(batch)
        rows = np.empty(len(states), dtype=np.int64)
        for k, state in enumerate(states):  # per request, as dedupe: a row once per request
            if state.token_row < 0:
                state.token_row = self.tokens.acquire()
            rows[k] = state.token_row
        self.tokens.note(rows, batch.token_request, batch.positions, token_ids)

    def context_ids(self, request_id: str, position: int, batch=None) -> tuple[int, list[int]] | None:
        """``(first position, ids)`` of the known tokens around ``position`` of a request: from its
        window and from ``batch`` (request_ids, token_request, positions, token_ids: a prefill
        longer than the window), or None when the token's own id is unknown. Runs per alert."""
        state = self._states.get(request_id)
        known = self.tokens.known(state.token_row) if state is not None else {}
        ids = getattr(batch, "token_ids", None)
        if ids is not None and request_id in batch.request_ids:
            mine = batch.token_request == batch.request_ids.index(request_id)
            near = mine & (batch.positions >= position - BEFORE) & (batch.positions <= position + AFTER)
            known.update(zip(batch.positions[near].tolist(), ids[near].tolist()))
        return context_around(position, known)

    def dedupe(self, batch: LayerBatch) -> np.ndarray:
        """Mask of tokens not seen before for their (request, layer); advances the high-water mark."""
        states = self._states_of(batch)
        floor = np.array([s.next_position.get(batch.layer, 0) for s in states], dtype=np.int64)
        keep = batch.positions >= floor[batch.token_request] if len(states) else np.zeros(0, bool)
        if len(batch.positions):
            high = np.full(len(states), -1, dtype=np.int64)
            np.maximum.at(high, batch.token_request, batch.positions)
            layer = batch.layer
            advanced = np.nonzero(high >= floor)[0]
            for k, top in zip(advanced.tolist(), high[advanced].tolist()):
                state = states[k]  # (max: a request listed twice in one batch must not move back)
                state.next_position[layer] = max(state.next_position.get(layer, 0), top + 1)
        self.deduplicated_tokens += int((~keep).sum())
        return keep

    def evaluate(self, rules: CompiledRules, batch: LayerBatch, signals: np.ndarray, keep: np.ndarray,
                 matched: np.ndarray | None = None) -> list[Verdict]:
        """Update windows for every rule on this layer and return the rules that fired now.

        ``matched[rule.index]`` (when given) grows by the rule's matched tokens in this batch: the
        in-scope tokens on which its window's condition held (the value above the threshold; for an
        EMA window, the running average above it), so a per-rule metric means what the rule means."""
        verdicts: list[Verdict] = []
        scope_masks = {0: keep, 1: keep & ~batch.generated, 2: keep & batch.generated}
        for rule in rules.rules_on(batch.layer):
            in_scope = scope_masks[rule.scope]
            if not in_scope.any():
                continue
            values = signals[:, rule.column]
            if rule.window == "ema":
                verdicts.extend(self._ema(rules.version, rule, batch, values, in_scope, matched))
                continue
            hits = np.nonzero(in_scope & (values > rule.above))[0]
            if hits.size == 0:
                continue
            if matched is not None:
                matched[rule.index] += hits.size
            states = self._states_of(batch)
            for req in np.unique(batch.token_request[hits]):
                state = states[req]
                mine = hits[batch.token_request[hits] == req]
                before = state.counts[rule.index]
                state.counts[rule.index] += mine.size
                if not state.fired[rule.index] and state.counts[rule.index] >= rule.count_n:
                    state.fired[rule.index] = True
                    at = mine[rule.count_n - before - 1]
                    verdicts.append(Verdict(rule, state.info, int(batch.positions[at]), float(values[at]), rules.version))
        return verdicts

    def _ema(self, version: int, rule: CompiledRule, batch: LayerBatch, values: np.ndarray, in_scope: np.ndarray,
             matched: np.ndarray | None = None) -> list[Verdict]:
        """EMA windows for every request of the batch at once (decode steps carry one token per
        request, so a per-request Python loop would cost a loop per token)."""
        idx = np.nonzero(in_scope)[0]
        idx = idx[np.lexsort((batch.positions[idx], batch.token_request[idx]))]  # by request, then position
        reqs, starts = np.unique(batch.token_request[idx], return_index=True)
        every = self._states_of(batch)
        states = [every[r] for r in reqs]
        i = rule.index
        seeds = np.array([st.ema[i] for st in states])
        trace = segmented_ema(values[idx].astype(np.float64), starts, rule.ema_alpha, seeds)
        ends = np.r_[starts[1:], len(idx)] - 1
        for st, last in zip(states, trace[ends].tolist()):
            st.ema[i] = last
        above = trace > rule.above
        if matched is not None:
            matched[rule.index] += int(above.sum())
        verdicts = []
        for k in np.nonzero(np.logical_or.reduceat(above, starts))[0]:  # requests with a value above: few
            st = states[k]
            if st.fired[i]:
                continue
            first = starts[k] + int(np.argmax(above[starts[k]:ends[k] + 1]))
            st.fired[i] = True
            verdicts.append(Verdict(rule, st.info, int(batch.positions[idx[first]]), float(trace[first]), version))
        return verdicts


CHUNK = 32  # tokens per closed-form step: d^-t stays finite in float64 for alpha <= 0.999


def segmented_ema(values: np.ndarray, starts: np.ndarray, alpha: float, seeds: np.ndarray) -> np.ndarray:
    """EMA after each value, restarting at each segment start (one segment per request).

    `seeds[k]` is segment k's EMA before this batch (NaN: seeded by its first value). Within a
    chunk of CHUNK tokens the closed form e_t = d^t (e_0 + sum_s alpha v_s d^-s), d = 1 - alpha,
    is vectorised over all segments; the Python loop runs once per chunk, not per token or request.
    """
    n = len(values)
    out = np.empty(n)
    if n == 0:
        return out
    lengths = np.diff(np.r_[starts, n])
    seg = np.repeat(np.arange(len(starts)), lengths)
    local = np.arange(n) - np.repeat(starts, lengths)  # index of each token within its segment
    prev = np.where(np.isnan(seeds), values[starts], seeds)  # a NaN seed: the first value itself
    decay = 1.0 - alpha
    for c in range(int(lengths.max() + CHUNK - 1) // CHUNK):
        sel = np.nonzero(local // CHUNK == c)[0]
        if decay == 0.0:
            out[sel] = values[sel]
        else:
            # one row per segment present in this chunk, so cumulative sums never cross segments
            rows, row_of = np.unique(seg[sel], return_inverse=True)
            col = local[sel] % CHUNK
            terms = np.zeros((len(rows), CHUNK))
            terms[row_of, col] = alpha * values[sel] * decay ** -(col + 1.0)
            csum = np.cumsum(terms, axis=1)[row_of, col]
            out[sel] = decay ** (col + 1.0) * (prev[seg[sel]] + csum)
        last = np.r_[seg[sel][1:] != seg[sel][:-1], True]
        prev[seg[sel][last]] = out[sel][last]
    return out


def ema_trace(values: np.ndarray, alpha: float, start: float) -> np.ndarray:
    """One request's EMA trace (see segmented_ema)."""
    return segmented_ema(values, np.array([0]), alpha, np.array([start], dtype=np.float64))
