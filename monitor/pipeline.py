"""The pipeline one batch goes through: encode -> evaluate -> export -> act.

Runs on one thread (PipelineThread, below) so per-request state needs no locks and verdicts keep token order;
the rule set is an immutable object swapped atomically by the reloader.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np
import torch

from monitor.evaluate.compiler import CompiledRules
from monitor.evaluate.state import LayerBatch, RequestInfo, RequestTable, Verdict
from monitor.export.events import EventSink
from monitor.export.metrics import SidecarMetrics
from monitor.export.tracing import Tracing, trace_id_of
from monitor.act.steering import SteeringController
from monitor.receive.batch import BatchGroup, DecodedBatch

log = logging.getLogger(__name__)

SCOPE_NAMES = ("prompt", "generated")


class Pipeline:
    def __init__(self, rules: CompiledRules, requests: RequestTable, metrics: SidecarMetrics, events: EventSink,
                 tracing: Tracing, steering: SteeringController, model_name: str) -> None:
        self.rules = rules
        self.requests = requests
        self.metrics = metrics
        self.events = events
        self.tracing = tracing
        self.steering = steering
        self.model_name = model_name
        self._evicted_exported = 0
        requests.on_drop = steering.forget  # evicted or idle requests leave the steering table too

    def swap_rules(self, rules: CompiledRules) -> None:
        self.rules = rules
        self.requests.reset_rules(len(rules.rules))
        self.metrics.set_rules(rules)

    # ------------------------------------------------------------------ requests
    def request_started(self, info: RequestInfo, prompt_tokens: int, cached_tokens: int) -> None:
        self.requests.start(info)
        self.metrics.requests.labels(self.model_name).inc()
        if info.steering_policy:
            for name in info.steering_policy.split(","):  # the policies the plugin applied
                self.metrics.steering_actions.labels(self.model_name, name, "policy", "policy", "enforce").inc()
            self.events.emit("steering", trigger="policy", mode="enforce", policy=info.steering_policy,
                             request_id=info.request_id, api_request_id=info.api_request_id, metadata=info.metadata)
        for name, actions in self.steering.shadow_policies(self.rules.shadow_policies, info.metadata):
            self.metrics.steering_actions.labels(self.model_name, name, "policy", "policy", "shadow").inc()
            self.events.emit("steering", trigger="policy", mode="shadow", policy=name, actions=[a.WhichOneof("kind") for a in actions],
                             request_id=info.request_id, api_request_id=info.api_request_id, metadata=info.metadata)

    def request_finished(self, request_id: str) -> None:
        self.requests.finish(request_id)
        self.steering.forget(request_id)

    # ------------------------------------------------------------------ batches
    def process(self, batch: DecodedBatch | BatchGroup, stream, send: Callable) -> list[Verdict]:
        """Encode and evaluate every layer of a batch (or a group of one stream's consecutive
        batches, evaluated as one); export verdicts and send directives."""
        rules = self.rules
        parts = batch.parts if isinstance(batch, BatchGroup) else [batch]
        verdicts: list[Verdict] = []
        matched = np.zeros(len(rules.rules), dtype=np.int64)  # per rule: in-scope tokens its window matched
        unsteered = None  # rows the residual norm may be measured on, once per batch (_measure_norms)
        for i, layer in enumerate(batch.layers):
            lb = LayerBatch(layer, batch.request_ids, batch.token_request, batch.positions, batch.generated)
            if len(parts) == 1:
                keep = self.requests.dedupe(lb)
            else:  # part by part, so a token re-sent in a later part is dropped as it would be alone
                keep = np.concatenate([self.requests.dedupe(LayerBatch(layer, p.request_ids, p.token_request, p.positions,
                                                                       p.generated)) for p in parts])
            if i == 0:  # each request's recent token ids: an alert's context
                self._note_tokens(lb, parts, batch)
            if layer not in rules.encode.layers:
                self._count_tokens(layer, keep, batch.generated)
                unsteered = self._measure_norms(layer, i, parts, batch, keep, unsteered)
                continue
            xs = [part.activations[i].float() for part in parts]
            finite = [finite_rows(x) for x in xs]  # first: the encode then reads x from cache
            started = time.perf_counter()
            blocks = [rules.encode.compute(layer, x) for x in xs]
            signals = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
            self.metrics.encode_seconds.labels(str(layer)).observe(time.perf_counter() - started)
            keep = self._drop_nonfinite(xs, finite, signals, keep)
            self._count_tokens(layer, keep, batch.generated)
            unsteered = self._measure_norms(layer, i, parts, batch, keep, unsteered)
            self._export_signals(rules, layer, signals, keep)
            verdicts.extend(self.requests.evaluate(rules, lb, signals, keep, matched))
        for index in np.nonzero(matched)[0].tolist():
            self.metrics.rule_matched.labels(self.model_name, rules.rules[index].name).inc(int(matched[index]))
        now = time.time()
        for part in parts:
            if part.captured_unix_s:
                self.metrics.token_to_verdict.observe(max(0.0, now - part.captured_unix_s))
        for verdict in verdicts:
            self._act(verdict, batch, stream, send)
        self.metrics.requests_tracked.set(len(self.requests))
        if self.requests.evicted > self._evicted_exported:
            self.metrics.requests_evicted.labels("table_full").inc(self.requests.evicted - self._evicted_exported)
            self._evicted_exported = self.requests.evicted
        return verdicts

    def _note_tokens(self, lb: LayerBatch, parts: list, batch) -> None:
        ids = getattr(batch, "token_ids", None)
        if ids is not None:
            self.requests.note_tokens(lb, ids)
        elif len(parts) > 1:  # a group whose parts do not all carry ids: the parts that do
            for p in parts:
                if p.token_ids is not None:
                    self.requests.note_tokens(LayerBatch(lb.layer, p.request_ids, p.token_request, p.positions,
                                                         p.generated), p.token_ids)

    def _drop_nonfinite(self, xs: list, finite: list, signals: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """``keep`` without the rows whose activations (NaN, ±Inf: ``finite``, from :func:`finite_rows`)
        or signals (a finite row so large that a feature overflows) are not finite: they never reach
        a metric, a window or an alert."""
        bad_signals = signals.shape[1] and not np.isfinite(signals).all()
        if bad_signals or any(f is not None for f in finite):  # rare
            mask = np.concatenate([np.ones(len(x), bool) if f is None else f for x, f in zip(xs, finite)])
            if bad_signals:
                mask &= np.isfinite(signals).all(axis=1)
            dropped = int((keep & ~mask).sum())
            if dropped:
                self.metrics.tokens_dropped.labels("nonfinite").inc(dropped)
            keep = keep & mask
        return keep

    def _measure_norms(self, layer: int, i: int, parts: list, batch, keep: np.ndarray,
                       unsteered: np.ndarray | None) -> np.ndarray | None:
        """The layer's residual norm (featurewatch_residual_norm, the unit of `scale_unit:
        residual_norm`) from a sample of the kept rows of requests that no steering touches (of a
        group: its first part). Returns the per-token mask of such rows, computed once per batch."""
        norms = self.steering.norms
        if not norms.due(layer):
            return unsteered
        if unsteered is None:
            steered = self.steering.steered

            def touched(rid: str) -> bool:
                state = self.requests.get(rid)
                return rid in steered or bool(state is not None and state.info.steering_policy)

            skip = np.array([touched(rid) for rid in batch.request_ids], dtype=bool)
            unsteered = ~skip[batch.token_request] if skip.any() else np.ones(len(batch.token_request), bool)
        first = parts[0]
        n = len(first.positions)
        median = norms.observe(layer, first.activations[i], np.flatnonzero(keep[:n] & unsteered[:n]))
        if median is not None:
            self.metrics.residual_norm.labels(self.model_name, str(layer)).set(median)
        return unsteered

    def _count_tokens(self, layer: int, keep: np.ndarray, generated: np.ndarray) -> None:
        n_gen = int((keep & generated).sum())
        n_prompt = int(keep.sum()) - n_gen
        for scope, n in zip(SCOPE_NAMES, (n_prompt, n_gen)):
            if n:
                self.metrics.tokens_processed.labels(self.model_name, str(layer), scope).inc(n)
        dropped = int((~keep).sum())
        if dropped:
            self.metrics.tokens_deduplicated.labels(self.model_name).inc(dropped)

    def _export_signals(self, rules: CompiledRules, layer: int, signals: np.ndarray, keep: np.ndarray) -> None:
        columns = rules.encode.layers[layer].columns
        kept = signals[keep]
        if kept.shape[0] == 0:
            return
        active = (kept > 0).sum(axis=0)
        for j, key in enumerate(columns):
            if key.feature is not None:
                if active[j]:
                    self.metrics.feature_active.labels(self.model_name, key.source, str(key.feature)).inc(int(active[j]))
            else:
                self.metrics.probe_score.observe_many((self.model_name, key.probe), kept[:, j])

    def _act(self, verdict: Verdict, batch: DecodedBatch | BatchGroup, stream, send: Callable) -> None:
        rule, request = verdict.rule, verdict.request
        event = dict(rule=rule.name, severity=rule.severity, labels=rule.labels, request_id=request.request_id,
                     api_request_id=request.api_request_id, position=verdict.position, value=verdict.value,
                     signal=f"{rule.key.source}:{rule.key.label}", rules_version=verdict.rules_version,
                     metadata=request.metadata, trace_id=trace_id_of(request.traceparent))
        span = self.requests.context_ids(request.request_id, verdict.position, batch)
        if span is not None:  # decoded to text on the event sink's thread, with a tokenizer
            event["context_start"], event["context_token_ids"] = span
        if rule.alert:
            exemplar = {"trace_id": event["trace_id"]} if event["trace_id"] else None
            self.metrics.alerts.labels(self.model_name, rule.name, rule.severity).inc(exemplar=exemplar)
            self.events.emit("alert", **event)
            self.tracing.alert(verdict)
        shadow = self.steering.directive(request.request_id, rule.name, verdict.position, rule.shadow_steering, shadow=True)
        if shadow is not None:  # mode: shadow — counted and audited, never sent
            for action in shadow.actions:
                self.metrics.steering_actions.labels(self.model_name, rule.name, action.WhichOneof("kind"), "rule", "shadow").inc()
            self.events.emit("steering", trigger="rule", mode="shadow", from_position=shadow.from_position,
                             actions=[a.WhichOneof("kind") for a in shadow.actions], **event)
        directive = self.steering.directive(request.request_id, rule.name, verdict.position, rule.steering)
        if directive is None:
            return
        if send(request.stream or stream, directive):
            for action in directive.actions:
                self.metrics.steering_actions.labels(self.model_name, rule.name, action.WhichOneof("kind"), "rule", "enforce").inc()
            if batch.captured_unix_s:
                self.metrics.steering_decision.observe(max(0.0, time.time() - batch.captured_unix_s))
            self.events.emit("steering", trigger="rule", mode="enforce", from_position=directive.from_position,
                             actions=[a.WhichOneof("kind") for a in directive.actions], **event)
            self.tracing.steering(verdict, directive)


def finite_rows(x: torch.Tensor) -> np.ndarray | None:
    """None when every row of ``x [N, d]`` is finite, else the mask of finite rows.

    One sum is the cheap test: NaN and ±Inf propagate into it (~75 us for 256 x 2304 float32 out of
    cache here, against ~1 ms for ``isfinite(x).all()``). Only when it is not finite (or a finite
    but huge batch overflowed it) are row sums, then the suspect rows element by element, checked."""
    if bool(torch.isfinite(x.sum())):
        return None
    suspect = ~torch.isfinite(x.sum(dim=-1))
    rows = torch.nonzero(suspect).flatten()
    mask = np.ones(x.shape[0], dtype=bool)
    mask[rows.numpy()] = torch.isfinite(x[rows]).all(dim=-1).numpy()
    return None if mask.all() else mask


class PipelineThread:
    """The one thread the pipeline runs on, so per-request state needs no locks and verdicts keep
    token order. The event loop hands items over through a thread-safe queue: no future and no
    loop wake-up per batch (the handoff cost that starved the pipeline at full ingest).

    When batches wait, up to ``group_batches`` consecutive ones of the same stream and layers are
    handed to the pipeline as one :class:`BatchGroup` (adaptive batching: the per-batch work is
    paid once, so a pipeline that fell behind catches up; an idle one sees single batches)."""

    _STOP = object()

    def __init__(self, handle, done, init, group_batches: int = 1) -> None:
        self._handle, self._done, self._init = handle, done, init
        self.group_batches = group_batches
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # items put and not yet handled (read by drain)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="featurewatch-pipeline", daemon=True)
        self._thread.start()

    def put(self, stream, item) -> None:
        with self._lock:
            self._pending += 1
        self._inbox.put((stream, item))

    def call(self, fn) -> Future:
        """Run ``fn()`` on the pipeline thread, after what is queued (housekeeping on its state)."""
        future: Future = Future()
        if threading.current_thread() is self._thread:
            future.set_result(fn())
            return future
        self.put(None, (fn, future))
        return future

    @property
    def pending(self) -> int:
        return self._pending

    def _take_group(self, stream, first: DecodedBatch):
        """``first`` and the batches right behind it that can join it; the item that cannot."""
        parts, carry = [first], None
        while len(parts) < self.group_batches:
            try:
                nxt = self._inbox.get_nowait()
            except queue.Empty:
                break
            if nxt[0] is stream and isinstance(nxt[1], DecodedBatch) and nxt[1].layers == first.layers:
                parts.append(nxt[1])
            else:
                carry = nxt
                break
        return parts, carry

    def _run(self) -> None:
        self._init()
        carry = None
        while True:
            stream, item = carry if carry is not None else self._inbox.get()
            carry = None
            if item is self._STOP:
                return
            parts = [item]
            if isinstance(item, tuple):
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)
                failed = False
            else:
                if isinstance(item, DecodedBatch) and self.group_batches > 1:
                    parts, carry = self._take_group(stream, item)
                try:
                    self._handle(stream, parts[0] if len(parts) == 1 else BatchGroup.of(parts))
                    failed = False
                except Exception:
                    log.exception("pipeline failed on %d item(s); dropped", len(parts))
                    failed = True
            for part in parts:
                self._done(part, failed=failed)
            with self._lock:
                self._pending -= len(parts)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._inbox.put((None, self._STOP))
        self._thread.join(timeout_s)
