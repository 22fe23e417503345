"""Alert and audit events, written to the event store off the hot path.

A bounded queue and one writer thread: a slow or absent store (Redis down) costs the pipeline
nothing but counted drops when the queue is full. With a tokenizer, the writer thread also turns an
event's ``context_token_ids`` into its ``context`` text (monitor/export/context.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

log = logging.getLogger(__name__)


class EventSink:
    def __init__(self, store, metrics, capacity: int = 10_000, context=None) -> None:
        self.store, self.metrics = store, metrics
        self.context = context  # a ContextText, or None: events keep only the ids
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        metrics.queue_capacity.labels("events").set(capacity)
        self._depth = metrics.queue_depth.labels("events")
        self._thread = threading.Thread(target=self._run, name="featurewatch-events", daemon=True)
        self._stopped = threading.Event()
        self._thread.start()

    def emit(self, kind: str, **fields) -> None:
        event = {"kind": kind, "unix_s": time.time(), **fields}
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.metrics.events_dropped.labels("queue_full").inc()
        self._depth.set(self._queue.qsize())

    def _run(self) -> None:
        while not (self._stopped.is_set() and self._queue.empty()):
            try:
                event = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._depth.set(self._queue.qsize())
            self._add_context(event)
            try:
                self.store.append(event)
                self.metrics.events.labels(event["kind"]).inc()
            except Exception as exc:  # a store must not take the sidecar down
                log.warning("event store append failed: %s", exc)
                self.metrics.events_dropped.labels("store_error").inc()
                self.metrics.store_errors.labels(type(self.store).__name__, "append").inc()

    def _add_context(self, event: dict) -> None:
        if self.context is None or "context_token_ids" not in event:
            return
        try:
            text = self.context.describe(event)
        except Exception as exc:  # noqa: BLE001 - an undecodable context costs the event nothing
            log.debug("alert context not decoded: %s", exc)
            return
        if text is not None:
            event["context"] = text

    def flush(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.flush()
        self._stopped.set()
        self._thread.join(timeout=5)
