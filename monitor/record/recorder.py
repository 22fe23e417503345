"""The flight recorder's thread: takes references from the pipeline, copies rows, writes shards.

The pipeline thread only hands over references (a decoded batch's tensors are views on received
bytes that nothing mutates), the verdicts and request start/finish events; a full queue drops and
counts. Everything else happens here: the rows of requests that may be recorded are copied into
per-request buffers (bounded by ``buffer_bytes``), finished requests that qualify (sampled, or one
of ``on_rules`` fired) are assembled into shards written whole, and old shards are rotated out.
A disk error never reaches the sidecar: it is counted and logged once per kind.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from monitor.record.config import RecordConfig
from monitor.record.format import DTYPE_NAMES, Manifest, warm_up
from monitor.record.metrics import RecordMetrics
from monitor.record.writer import IncompatibleRecording, RecordingDir, ShardBuilder, request_row

log = logging.getLogger("featurewatch.record")
CONTROL_LIMIT = 65_536  # start/finish/lost events waiting (they are small; beyond, dropped)
TICK_S = 1.0
IDLE_CHECK_S = 10.0


def sampled(key: str, rate: float) -> bool:
    """Whether a request is in the uniform sample: a hash of its id, the same on every replica."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < rate * 2.0**64


@dataclass
class _Request:
    request_id: str
    api_request_id: str = ""
    metadata: dict = field(default_factory=dict)
    prompt_tokens: int = 0
    started_unix_s: float = 0.0
    sampled: bool = False
    ruled: bool = False
    lost: str = ""  # why its tokens are incomplete (buffer_full, queue_full, ...): never written then
    fired: list = field(default_factory=list)  # (rule, position)
    chunks: list = field(default_factory=list)  # (acts [L, n, d], positions, token_ids, generated)
    next_position: int = 0
    nbytes: int = 0
    touched: float = field(default_factory=time.monotonic)

    @property
    def qualified(self) -> bool:
        return self.sampled or self.ruled


class Recorder:
    def __init__(self, config: RecordConfig, model_name: str, metrics: RecordMetrics, layers: list[int],
                 sidecar_info: Callable[[], dict] | None = None, idle_timeout_s: float = 600.0) -> None:
        self.config = config
        self.model_name = model_name
        self.metrics = metrics
        self.layers = sorted(config.layers if config.layers is not None else layers)
        self.sidecar_info = sidecar_info or (lambda: {})
        self.idle_timeout_s = idle_timeout_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued_batches = 0
        self._queued_bytes = 0
        self._queued_control = 0
        # state owned by the recorder thread
        self._requests: dict[str, _Request] = {}
        self._pending: dict[str, _Request] = {}  # unqualified requests holding buffers, oldest first
        self._skip: dict[str, bool] = {}  # requests not recorded (not sampled, no on_rules), so not tracked
        self._buffered = 0
        self._builder = ShardBuilder(self.layers)
        self._builder_since = 0.0
        self._dir: RecordingDir | None = None
        self._d_model: int | None = None
        self._dtype: torch.dtype | None = None
        self._logged: set[str] = set()
        self._last_idle_check = time.monotonic()
        self._layer_index: dict[tuple, torch.Tensor | None] = {}
        warm_up()
        self._thread = threading.Thread(target=self._run, name="featurewatch-recorder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ pipeline thread: hand over references
    def request_started(self, info, prompt_tokens: int, started_unix_s: float = 0.0) -> None:
        self._control(("start", info.request_id, info.api_request_id, dict(info.metadata), int(prompt_tokens),
                       started_unix_s or time.time()))

    def request_finished(self, request_id: str, generated_tokens: int = 0, finish_reason: str = "") -> None:
        self._control(("finish", request_id, int(generated_tokens), finish_reason, time.time()))

    def batch(self, batch, verdicts) -> None:
        """A processed batch (or BatchGroup) and its verdicts: references only, never a copy here."""
        parts = getattr(batch, "parts", None) or [batch]
        nbytes = sum(p.nbytes for p in parts)
        fired = [(v.request.request_id, v.rule.name, int(v.position)) for v in verdicts] if verdicts else []
        cfg = self.config
        with self._lock:
            fits = self._queued_batches < cfg.queue_batches and self._queued_bytes + nbytes <= cfg.queue_bytes
            if fits:
                self._queued_batches += 1
                self._queued_bytes += nbytes
        if fits:
            self._inbox.put(("batch", parts, fired, nbytes))
            return
        self.metrics.batches_dropped.labels("queue_full").inc()
        self._control(("lost", [rid for p in parts for rid in p.request_ids], fired))

    def _control(self, item) -> None:
        with self._lock:
            full = self._queued_control >= CONTROL_LIMIT
            if not full:
                self._queued_control += 1
        if full:
            self.metrics.batches_dropped.labels("control_full").inc()
            return
        self._inbox.put(item)

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Write what finished so far (tests, shutdown); True once done."""
        done = threading.Event()
        self._inbox.put(("flush", done))
        return done.wait(timeout_s)

    def call(self, fn) -> None:
        """Run ``fn()`` on the recorder's thread after what is queued."""
        self._inbox.put(("call", fn))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write finished requests and those in flight that qualify (finish_reason "unfinished")."""
        if self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ recorder thread
    def _run(self) -> None:
        torch.set_num_threads(1)
        self._open_dir()
        while True:
            try:
                item = self._inbox.get(timeout=TICK_S)
            except queue.Empty:
                item = None
            try:
                if item is not None and item[0] == "stop":
                    self._finish_all("unfinished")
                    self._write_shard()
                    if self._dir is not None:
                        self._dir.close()
                    return
                if item is not None:
                    self._dispatch(item)
                self._housekeeping()
            except Exception as exc:  # noqa: BLE001 - the recorder never takes the sidecar down
                self._log_once(f"internal:{type(exc).__name__}", "recorder error (item skipped): %s: %s",
                               type(exc).__name__, exc)

    def _dispatch(self, item) -> None:
        kind = item[0]
        if kind == "batch":
            _, parts, fired, nbytes = item
            try:
                for part in parts:
                    self._take(part)
                self._fired(fired)
            finally:
                with self._lock:
                    self._queued_batches -= 1
                    self._queued_bytes -= nbytes
                    depth = self._queued_batches
                self.metrics.queue_depth.set(depth)
            return
        if kind == "flush":
            self._write_shard()
            item[1].set()
            return
        if kind == "call":  # run a function on this thread (tests hold the thread with it)
            item[1]()
            return
        with self._lock:
            self._queued_control -= 1
        if kind == "start":
            self._start(*item[1:])
        elif kind == "finish":
            self._finish(*item[1:])
        elif kind == "lost":
            for rid in item[1]:
                state = self._state(rid)
                if state is not None and not state.lost:
                    self._lose(state, "queue_full")
            self._fired(item[2])

    # requests ---------------------------------------------------------------------------------
    def _start(self, rid: str, api_id: str, metadata: dict, prompt_tokens: int, started: float) -> None:
        if self.config.excludes(metadata):
            self.metrics.requests_dropped.labels("excluded").inc()
            self._skip[rid] = True
            self._drop_state(rid)
            return
        state = self._state(rid, create=True, key=api_id or rid)
        if state is not None:
            state.api_request_id, state.metadata = api_id, metadata
            state.prompt_tokens, state.started_unix_s = prompt_tokens, started

    def _state(self, rid: str, create: bool = True, key: str | None = None) -> _Request | None:
        state = self._requests.get(rid)
        if state is not None or not create or self._skip.get(rid):
            return state
        is_sampled = sampled(key or rid, self.config.sample)
        if not is_sampled and not self.config.on_rules:
            if len(self._skip) > 1_000_000:
                self._skip.clear()
            self._skip[rid] = True
            return None
        state = self._requests[rid] = _Request(rid, sampled=is_sampled, started_unix_s=time.time())
        if not is_sampled:
            self._pending[rid] = state
        return state

    def _fired(self, fired: list) -> None:
        for rid, rule, position in fired:
            state = self._requests.get(rid)
            if state is None:
                continue
            state.fired.append((rule, position))
            if not state.ruled and self.config.records_rule(rule):
                state.ruled = True
                self._pending.pop(rid, None)

    def _finish(self, rid: str, generated_tokens: int, finish_reason: str, finished: float) -> None:
        self._skip.pop(rid, None)
        state = self._requests.get(rid)
        if state is None:
            return
        del self._requests[rid]
        self._pending.pop(rid, None)
        if state.qualified and state.lost:
            self.metrics.requests_dropped.labels(state.lost).inc()
        if not state.qualified or state.lost or not state.chunks:  # (no chunks: nothing of it was tapped)
            self._free(state)
            return
        self._add_to_shard(state, generated_tokens, finish_reason, finished)  # frees its buffer

    def _drop_state(self, rid: str) -> None:
        state = self._requests.pop(rid, None)
        self._pending.pop(rid, None)
        if state is not None:
            self._free(state)

    def _free(self, state: _Request) -> None:
        self._buffered -= state.nbytes
        state.chunks, state.nbytes = [], 0
        self.metrics.buffer_bytes.set(self._buffered)

    def _lose(self, state: _Request, reason: str) -> None:
        state.lost = reason
        self._pending.pop(state.request_id, None)
        self._free(state)

    def _finish_all(self, reason: str) -> None:
        for rid in list(self._requests):
            self._finish(rid, 0, reason, time.time())

    # tokens -------------------------------------------------------------------------------------
    def _take(self, part) -> None:
        """Copy the rows of the tracked requests of one decoded batch into their buffers."""
        rows_of = {}
        for j, rid in enumerate(part.request_ids):
            state = self._state(rid)
            if state is not None and not state.lost:
                rows_of[j] = state
        if not rows_of:
            return
        acts = part.activations
        if self._d_model is None:
            self._d_model, self._dtype = int(acts.shape[-1]), acts.dtype
        if int(acts.shape[-1]) != self._d_model:
            for state in rows_of.values():
                self._lose(state, "incompatible")
            return
        index = self._layers_in(tuple(part.layers))
        if index is False:
            for state in rows_of.values():
                self._lose(state, "layer_missing")
            return
        order = np.argsort(part.token_request, kind="stable")
        counts = np.bincount(part.token_request, minlength=len(part.request_ids))
        starts = np.concatenate([[0], np.cumsum(counts)])
        now = time.monotonic()
        for j, state in rows_of.items():
            rows = order[starts[j]:starts[j + 1]]
            positions = part.positions[rows]
            fresh = positions >= np.maximum.accumulate(np.concatenate([[state.next_position], positions[:-1] + 1]))
            if not fresh.all():  # re-sent (preemption, recompute): keep each position once
                rows, positions = rows[fresh], positions[fresh]
            state.touched = now
            if rows.size == 0:
                continue
            idx = torch.from_numpy(rows)
            x = acts.index_select(1, idx) if index is None else acts.index_select(0, index).index_select(1, idx)
            if x.dtype != self._dtype:
                x = x.to(self._dtype)
            token_ids = part.token_ids[rows] if part.token_ids is not None else np.full(rows.size, -1, np.int64)
            size = x.element_size() * x.numel() + rows.size * 17
            if not self._room(state, size):
                continue
            state.chunks.append((x, positions, token_ids, part.generated[rows]))
            state.nbytes += size
            self._buffered += size
            state.next_position = int(positions[-1]) + 1
        self.metrics.buffer_bytes.set(self._buffered)

    def _layers_in(self, layers: tuple):
        """Index of the recorded layers in a batch's layers: None (all of them, in order), a tensor,
        or False when one is missing."""
        if layers not in self._layer_index:
            if list(layers) == self.layers:
                self._layer_index[layers] = None
            elif set(self.layers) <= set(layers):
                self._layer_index[layers] = torch.tensor([layers.index(layer) for layer in self.layers])
            else:
                self._layer_index[layers] = False
        return self._layer_index[layers]

    def _room(self, state: _Request, size: int) -> bool:
        """Make room for ``size`` more bytes: a qualified request evicts unqualified ones, oldest
        first; a request that still does not fit loses its buffer (counted if it qualifies)."""
        limit = self.config.buffer_bytes
        while state.qualified and self._buffered + size > limit and self._pending:
            victim = next(iter(self._pending.values()))
            self._lose(victim, "buffer_full")
        if self._buffered + size > limit:
            self._lose(state, "buffer_full")
            return False
        return True

    # shards -------------------------------------------------------------------------------------
    def _add_to_shard(self, state: _Request, generated_tokens: int, finish_reason: str, finished: float) -> None:
        acts = [c[0] for c in state.chunks]  # row blocks, written as they are (no copy)
        positions = np.concatenate([c[1] for c in state.chunks])
        token_ids = np.concatenate([c[2] for c in state.chunks]).astype(np.int64)
        generated = np.concatenate([c[3] for c in state.chunks]).astype(bool)
        if positions.size > 1 and (np.diff(positions) <= 0).any():  # rare: chunks out of order
            order = np.argsort(positions, kind="stable")
            acts = [torch.cat(acts, dim=1)[:, torch.from_numpy(order)]]
            positions, token_ids, generated = positions[order], token_ids[order], generated[order]
        self._free(state)
        if finish_reason == "unfinished":
            generated_tokens = int(generated.sum())
        row = request_row(state.request_id, state.api_request_id, state.metadata, state.prompt_tokens, generated_tokens,
                          finish_reason, [r for r, _ in state.fired], [p for _, p in state.fired],
                          "sample" if state.sampled else "rule", state.started_unix_s, finished)
        if not self._builder:
            self._builder_since = time.monotonic()
        self._builder.add(row, acts, positions, token_ids, generated)
        if self._builder.nbytes >= self.config.shard_bytes:
            self._write_shard()

    def _open_dir(self) -> bool:
        if self._dir is not None:
            return True
        try:
            self._dir = RecordingDir(self.config.dir).open()
        except Exception as exc:  # noqa: BLE001 - OSError, another writer, a foreign manifest
            self._log_once(f"open:{type(exc).__name__}", "recording directory %s unusable (recording dropped and "
                           "counted until it is): %s", self.config.dir, exc)
            return False
        self.metrics.disk_bytes.set(self._dir.disk_bytes)
        return True

    def _write_shard(self) -> None:
        builder = self._builder
        if not builder:
            return
        self._builder = ShardBuilder(self.layers)
        reason = ""
        try:
            if not self._open_dir():
                reason = "write_error"
            else:
                self._dir.ensure_manifest(self._manifest())
                info = self._dir.write(builder, fsync=self.config.fsync)
        except IncompatibleRecording as exc:
            reason = "incompatible"
            self._log_once("incompatible", "not recording: %s", exc)
        except Exception as exc:  # noqa: BLE001 - disk full, permissions, ...: counted, logged once per kind
            reason = "write_error"
            self._log_once(f"write:{type(exc).__name__}:{getattr(exc, 'errno', '')}", "writing a shard to %s failed "
                           "(its requests dropped and counted): %s: %s", self.config.dir, type(exc).__name__, exc)
        if reason:
            self.metrics.requests_dropped.labels(reason).inc(len(builder))
            return
        self.metrics.shards.inc()
        self.metrics.bytes_written.inc(info.nbytes)
        self.metrics.tokens.inc(builder.n_tokens)
        for r in builder.requests:
            self.metrics.requests.labels(r["reason"]).inc()
        self._rotate()

    def _manifest(self) -> Manifest:
        info = self.sidecar_info() or {}
        return Manifest(model_name=self.model_name, d_model=self._d_model or 0, layers=self.layers,
                        dtype=DTYPE_NAMES[self._dtype or torch.float32], created_unix_s=time.time(), sidecar=info)

    def _rotate(self) -> None:
        if self._dir is None:
            return
        try:
            for _, reason in self._dir.rotate(self.config.max_bytes, self.config.max_age_s):
                self.metrics.shards_rotated.labels(reason).inc()
        except OSError as exc:
            self._log_once(f"rotate:{exc.errno}", "rotating shards in %s failed: %s", self.config.dir, exc)
        self.metrics.disk_bytes.set(self._dir.disk_bytes)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self._builder and now - self._builder_since >= self.config.flush_interval_s:
            self._write_shard()
        if now - self._last_idle_check >= IDLE_CHECK_S:
            self._last_idle_check = now
            cutoff = now - self.idle_timeout_s
            for rid in [rid for rid, s in self._requests.items() if s.touched < cutoff]:
                self._finish(rid, 0, "unfinished", time.time())
            self._rotate()

    def _log_once(self, key: str, message: str, *args) -> None:
        if key not in self._logged and len(self._logged) < 64:
            self._logged.add(key)
            log.error(message, *args)


def recorder_for(config, metrics_registry, rules_version: Callable[[], int]) -> Recorder | None:
    """The sidecar's recorder, or None without ``record:`` in its config."""
    if config.record is None:
        return None
    sources = {s.name: {"kind": s.kind, "layer": s.layer, "path": str(Path(s.path))} for s in config.sources}
    return Recorder(config.record, config.model_name, RecordMetrics(metrics_registry), config.layers(),
                    lambda: {"rules_version": rules_version(), "sources": sources},
                    idle_timeout_s=config.limits.request_idle_timeout_s)
