"""The event store in Redis: alert and audit events in a capped stream, written from a bounded
buffer by a background thread so that ``append`` never waits on or raises from Redis."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import defaultdict, deque
from typing import Iterable

import redis as _redis

from monitor.stores.base import StoreUnavailable
from monitor.stores.redis.connection import CONN_ERRORS, Backoff, connect, decode_entry, redis_keys, safe_url

log = logging.getLogger(__name__)


class RedisEventStore:
    """Alert and audit events in a Redis stream; ``append`` never blocks on or raises from Redis.

    Readers: ``tail``/``follow`` (a viewer such as ``featurewatch alerts tail``: no state in
    Redis) and ``consume``/``ack`` (consumer groups: each event handled once per group, pending
    events of a dead consumer claimed after ``claim_idle_ms``).
    """

    store_name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "featurewatch",
        maxlen: int = 100_000,
        buffer_max: int = 10_000,
        batch_size: int = 256,
        max_event_bytes: int = 256 * 1024,
        socket_timeout: float = 2.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        client: _redis.Redis | None = None,
    ) -> None:
        self.url = url
        self.keys = redis_keys(prefix)
        self.stream = self.keys["events"]
        self.maxlen = maxlen
        self.buffer_max = buffer_max
        self.batch_size = batch_size
        self.max_event_bytes = max_event_bytes
        self._socket_timeout = socket_timeout
        self._r = client or connect(url, socket_timeout)
        self._owns_client = client is None
        self._reader: _redis.Redis | None = None
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)

        self._buf: deque[tuple[int, str, str, str]] = deque()  # (seq, event_id, kind, json)
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._closed = False

        # Counters (monotonic) and state for the sidecar's metrics.
        self.appended = 0
        self.written = 0
        self.errors: dict[str, int] = defaultdict(int)
        self.dropped: dict[str, int] = defaultdict(int)  # buffer_full, too_large, unserializable, closed
        self.connected = True

        self._thread = threading.Thread(target=self._run, name="featurewatch-redis-events", daemon=True)
        self._thread.start()

    # ---- EventStore ------------------------------------------------------------------------

    def append(self, event: dict) -> str:
        """Queue an event for the stream and return its ``event_id``; never raises, never blocks."""
        event_id = uuid.uuid4().hex
        try:
            kind = str(event.get("kind", "event"))
            body = dict(event)
            body.setdefault("unix_s", time.time())
            body["event_id"] = event_id
            data = json.dumps(body, default=str, separators=(",", ":"))
        except Exception:  # noqa: BLE001 - a bad event is counted, not raised
            self.dropped["unserializable"] += 1
            return event_id
        if len(data) > self.max_event_bytes:
            self.dropped["too_large"] += 1
            return event_id
        with self._cond:
            if self._closed:
                self.dropped["closed"] += 1
                return event_id
            if len(self._buf) >= self.buffer_max:
                self._buf.popleft()
                self.dropped["buffer_full"] += 1
            self._seq += 1
            self._buf.append((self._seq, event_id, kind, data))
            self.appended += 1
            self._cond.notify_all()
        return event_id

    def tail(self, last: int) -> list[dict]:
        """The ``last`` newest events, oldest first. Raises ``StoreUnavailable`` if Redis is away."""
        if last <= 0:
            return []
        try:
            entries = self._r.xrevrange(self.stream, count=last)
        except CONN_ERRORS as exc:
            self._error("tail", exc)
            raise StoreUnavailable(f"redis at {safe_url(self.url)} unavailable: {exc}") from exc
        return [decode_entry(eid, fields) for eid, fields in reversed(entries)]

    def follow(self, after_id: str | None, block_ms: int, count: int = 1000) -> list[dict]:
        """Events after ``after_id`` (None: from the start of the stream), waiting up to ``block_ms``.

        Redis away: waits ``block_ms`` and returns [] (a tail loop survives a Redis restart)."""
        start = after_id or "0-0"
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        reader = self._reader_client()
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            block = min(remaining_ms, 1000) if remaining_ms > 0 else None  # BLOCK 0 = forever
            try:
                resp = reader.xread({self.stream: start}, count=count, block=block)
            except CONN_ERRORS as exc:
                self._error("follow", exc)
                self._stop.wait(max(0.0, min(deadline - time.monotonic(), 0.5)))
                if time.monotonic() >= deadline:
                    return []
                continue
            if resp:
                entries = resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]
                return [decode_entry(eid, fields) for eid, fields in entries]
            if time.monotonic() >= deadline:
                return []

    def close(self, timeout: float = 2.0) -> None:
        """Flush what Redis will take within ``timeout``; what is left is counted as dropped."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(timeout=5)
        with self._cond:
            if self._buf:
                self.dropped["closed"] += len(self._buf)
                self._buf.clear()
        if self._owns_client:
            self._r.close()
        if self._reader is not None:
            self._reader.close()

    # ---- extras ----------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every appended event is in Redis; False if some are still buffered."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return not self._buf
                self._cond.wait(remaining)
            return True

    def ensure_group(self, group: str, start_id: str = "$") -> None:
        """Create a consumer group (and the stream) if missing; ``start_id='0'`` reads history."""
        try:
            self._r.xgroup_create(self.stream, group, id=start_id, mkstream=True)
        except _redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def consume(
        self,
        group: str,
        consumer: str,
        count: int = 100,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
    ) -> list[dict]:
        """Events for this consumer: first pending ones idle for ``claim_idle_ms`` (a crashed
        consumer's), then new ones. ``ack`` each when handled. Redis away: returns []."""
        try:
            return self._consume(group, consumer, count, block_ms, claim_idle_ms)
        except _redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream was lost (Redis restarted without persistence): recreate and read it all.
            self.ensure_group(group, start_id="0")
            return self._consume(group, consumer, count, block_ms, claim_idle_ms)
        except CONN_ERRORS as exc:
            self._error("consume", exc)
            self._stop.wait(min(block_ms, 500) / 1000)
            return []

    def ack(self, group: str, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        try:
            return int(self._r.xack(self.stream, group, *ids))
        except CONN_ERRORS as exc:
            self._error("ack", exc)
            return 0

    # ---- internals -------------------------------------------------------------------------

    def _consume(self, group: str, consumer: str, count: int, block_ms: int, claim_idle_ms: int) -> list[dict]:
        reader = self._reader_client()
        if claim_idle_ms >= 0:
            claimed = reader.xautoclaim(self.stream, group, consumer, min_idle_time=claim_idle_ms, count=count)
            entries = [e for e in (claimed[1] if claimed else []) if e and e[1] is not None]
            if entries:
                return [decode_entry(eid, fields) for eid, fields in entries]
        resp = reader.xreadgroup(
            group, consumer, {self.stream: ">"}, count=count, block=min(block_ms, 1000) if block_ms > 0 else None
        )
        if not resp:
            return []
        entries = resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]
        return [decode_entry(eid, fields) for eid, fields in entries if fields is not None]

    def _reader_client(self) -> _redis.Redis:
        # Blocking reads get their own client whose socket timeout outlasts one 1 s BLOCK slice.
        if self._reader is None:
            self._reader = connect(self.url, self._socket_timeout + 1.5)
        return self._reader

    def _error(self, op: str, exc: BaseException) -> None:
        self.errors[op] += 1
        if self.connected:
            log.warning("redis event store: %s failed (%s); buffering events", op, exc)
        self.connected = False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._stop.is_set():
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                batch = list(self._buf)[: self.batch_size] if len(self._buf) > self.batch_size else list(self._buf)
            try:
                pipe = self._r.pipeline(transaction=False)
                for _seq, event_id, kind, data in batch:
                    pipe.xadd(
                        self.stream,
                        {"kind": kind, "event_id": event_id, "data": data},
                        maxlen=self.maxlen,
                        approximate=True,
                    )
                pipe.execute()
            except CONN_ERRORS as exc:
                self._error("append", exc)
                self._stop.wait(self._backoff.next())
                continue
            except Exception:  # noqa: BLE001 - e.g. a WRONGTYPE key: count, back off, keep going
                self.errors["append"] += 1
                log.exception("redis event store: flush failed")
                self._stop.wait(self._backoff.next())
                continue
            if not self.connected:
                log.info("redis event store: connected, flushing %d buffered events", len(self._buf))
            self.connected = True
            self._backoff.reset()
            last_seq = batch[-1][0]
            with self._cond:
                while self._buf and self._buf[0][0] <= last_seq:
                    self._buf.popleft()
                self.written += len(batch)
                self._cond.notify_all()
