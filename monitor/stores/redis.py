"""Redis stores: rules shared by every sidecar replica, and the alert/audit event stream.

Keys (one Redis Cluster hash slot: the prefix is wrapped in a hash tag, ``{featurewatch}``):

``{prefix}:rules``          hash: ``yaml``, ``version``, ``author``, ``updated_unix_s``, ``sha256``
                            (+ ``reseeded_by`` when a replica wrote back its last good set)
``{prefix}:rules:version``  counter; a put takes ``max(INCR counter, version + 1)``
``{prefix}:rules:changed``  pub/sub channel; the message is the new version
``{prefix}:events``         stream (``XADD ... MAXLEN ~ maxlen``); fields ``kind``, ``event_id``,
                            ``data`` (the event as JSON)

A put is one Lua script: bump the version, replace the hash, append an audit event
(``kind: rules, action: stored``: who, when, version, previous version, digest) and PUBLISH the
change notice, atomically. A replica's write-back is audited as ``action: reseeded``.

Replicas (``RedisRuleStore.subscribe``) reconcile — fetch the hash and hand a new set to the
callbacks when (version, digest) differs from what they last delivered — on every change notice,
on every (re)connect and on a timer. While Redis is away they keep the last good set; if Redis
comes back empty (restarted without persistence) a replica writes its last good set back, keeping
its version, so the fleet does not fall back to "no rules". A replica's write-back never
overwrites a set an operator put; a newer write-back replaces an older one.

Events (``RedisEventStore.append``) never touch the network on the caller's thread: they go into a
bounded buffer that a background thread flushes in pipelines. Redis down: the buffer holds up to
``buffer_max`` events, then the oldest are dropped and counted. Delivery is at-least-once (a flush
cut by a failure is retried); each event carries the ``event_id`` that ``append`` returned.

Counters for the sidecar's metrics are plain attributes: ``errors`` (op -> count, maps to
``featurewatch_store_errors_total{store="redis", op}``) and, on the event store, ``dropped``
(reason -> count, maps to ``featurewatch_events_dropped_total{reason}``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections import defaultdict, deque
from typing import Any, Callable, Iterable

import redis as _redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from monitor.stores.base import StoredRules

log = logging.getLogger(__name__)

_CONN_ERRORS: tuple[type[BaseException], ...] = (
    _redis.ConnectionError,
    _redis.TimeoutError,
    OSError,
)

__all__ = [
    "RedisRuleStore",
    "RedisEventStore",
    "RuleConflict",
    "StoreUnavailable",
    "open_redis_stores",
    "redis_keys",
]


class StoreUnavailable(ConnectionError):
    """Redis could not be reached for an operation whose caller must know (put, tail)."""


class RuleConflict(RuntimeError):
    """``put(..., expected_version=v)`` found another version in the store."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"rules changed concurrently: expected version {expected}, store has {current}")
        self.expected = expected
        self.current = current


def redis_keys(prefix: str = "featurewatch") -> dict[str, str]:
    """The key names for a prefix (wrapped in a hash tag so a Lua script's keys share a slot)."""
    tag = prefix if "{" in prefix else "{" + prefix + "}"
    return {
        "rules": f"{tag}:rules",
        "version": f"{tag}:rules:version",
        "channel": f"{tag}:rules:changed",
        "events": f"{tag}:events",
    }


def _client(url: str, socket_timeout: float, retries: int = 1) -> _redis.Redis:
    # redis-py's default retries 10 times with backoff: far too long for a sidecar. One retry
    # covers the stale pooled connection after a Redis restart; the loops here do their own backoff.
    return _redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 1.0),
        retry=Retry(NoBackoff(), retries),
        decode_responses=True,
        health_check_interval=0,
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Backoff:
    """Jittered exponential backoff for the background loops."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


_PUT_LUA = """
-- KEYS: rules hash, version counter, events stream
-- ARGV: yaml, author, updated_unix_s, sha256, maxlen, channel, expected_version ('' = any)
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= cur then
  return {-1, cur}
end
local v = redis.call('INCR', KEYS[2])
if v <= cur then
  v = cur + 1
  redis.call('SET', KEYS[2], v)
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'yaml', ARGV[1], 'version', v, 'author', ARGV[2],
           'updated_unix_s', ARGV[3], 'sha256', ARGV[4])
local event = cjson.encode({kind = 'rules', action = 'stored', version = v,
                            previous_version = cur, author = ARGV[2], unix_s = tonumber(ARGV[3]),
                            sha256 = ARGV[4], bytes = string.len(ARGV[1])})
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
           'kind', 'rules', 'event_id', 'rules-stored-v' .. v, 'data', event)
redis.call('PUBLISH', ARGV[6], v)
return {v, cur}
"""

_RESEED_LUA = """
-- KEYS: rules hash, version counter, events stream
-- ARGV: yaml, version, author, updated_unix_s, sha256, replica, maxlen, channel, now
-- Write a replica's last good set back when the hash is missing, or when it holds an older
-- write-back (never over a set an operator put).
if redis.call('EXISTS', KEYS[1]) == 1 then
  local by = redis.call('HGET', KEYS[1], 'reseeded_by')
  local have = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
  if (not by) or have >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'yaml', ARGV[1], 'version', ARGV[2], 'author', ARGV[3],
           'updated_unix_s', ARGV[4], 'sha256', ARGV[5], 'reseeded_by', ARGV[6])
local c = tonumber(redis.call('GET', KEYS[2]) or '0')
if c < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
end
local event = cjson.encode({kind = 'rules', action = 'reseeded', version = tonumber(ARGV[2]),
                            author = ARGV[3], replica = ARGV[6], unix_s = tonumber(ARGV[9]),
                            sha256 = ARGV[5]})
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*',
           'kind', 'rules', 'event_id', 'rules-reseeded-v' .. ARGV[2], 'data', event)
redis.call('PUBLISH', ARGV[8], ARGV[2])
return 1
"""


class RedisRuleStore:
    """Rules and policies in a Redis hash plus a version counter, shared by every replica.

    ``get`` returns the stored set, or the last good one while Redis is away (an empty version-0
    set if this process never read one). ``put`` raises ``StoreUnavailable`` when Redis is away:
    the operator must know the change did not land. ``subscribe`` starts one background thread
    that reconciles and calls every callback with each new set (exceptions from callbacks are
    logged and counted in ``callback_errors``, never propagated).
    """

    store_name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "featurewatch",
        reconcile_interval_s: float = 10.0,
        events_maxlen: int = 100_000,
        reseed_when_empty: bool = True,
        replica: str | None = None,
        socket_timeout: float = 2.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        client: _redis.Redis | None = None,
    ) -> None:
        self.url = url
        self.keys = redis_keys(prefix)
        self.reconcile_interval_s = reconcile_interval_s
        self.events_maxlen = events_maxlen
        self.reseed_when_empty = reseed_when_empty
        self.replica = replica or f"{_hostname()}:{uuid.uuid4().hex[:8]}"
        self._socket_timeout = socket_timeout
        self._r = client or _client(url, socket_timeout)
        self._owns_client = client is None
        self._put_script = self._r.register_script(_PUT_LUA)
        self._reseed_script = self._r.register_script(_RESEED_LUA)
        self._backoff = (backoff_initial_s, backoff_max_s)

        self._lock = threading.RLock()
        self._last_good: StoredRules | None = None
        self._last_digest: str | None = None
        self._delivered: tuple[int, str] | None = None
        self._callbacks: list[Callable[[StoredRules], None]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pubsub: Any = None

        # Counters (read by the sidecar's metrics; monotonic).
        self.errors: dict[str, int] = defaultdict(int)
        self.reconciles: dict[str, int] = defaultdict(int)  # by reason: connect, notice, timer, manual
        self.deliveries = 0
        self.reseeds = 0
        self.callback_errors = 0
        self.connected = False

    # ---- RuleStore -------------------------------------------------------------------------

    def get(self) -> StoredRules:
        try:
            fetched = self._fetch()
        except _CONN_ERRORS as exc:
            self._error("get", exc)
            fetched = None
        if fetched is not None:
            return fetched
        with self._lock:
            return self._last_good or StoredRules(yaml="", version=0)

    def put(self, yaml: str, author: str, *, expected_version: int | None = None) -> int:
        """Store a new rule set; returns its version. ``expected_version`` makes it a compare-and-set."""
        now = time.time()
        try:
            version, current = self._put_script(
                keys=[self.keys["rules"], self.keys["version"], self.keys["events"]],
                args=[
                    yaml,
                    author,
                    repr(now),
                    _digest(yaml),
                    self.events_maxlen,
                    self.keys["channel"],
                    "" if expected_version is None else int(expected_version),
                ],
            )
        except _CONN_ERRORS as exc:
            self._error("put", exc)
            raise StoreUnavailable(f"redis at {_safe_url(self.url)} unavailable: {exc}") from exc
        if int(version) < 0:
            raise RuleConflict(int(expected_version or 0), int(current))
        log.info("rules v%s stored by %s (was v%s)", version, author, current)
        return int(version)

    def subscribe(self, callback: Callable[[StoredRules], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
            if self._delivered is None and self._last_good is not None:
                # The caller applied what get() returned before subscribing: do not re-deliver it.
                self._delivered = (self._last_good.version, self._last_digest or "")
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="featurewatch-redis-rules", daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._stop.set()
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._callbacks.clear()
        if self._owns_client:
            self._r.close()

    # ---- extras ----------------------------------------------------------------------------

    @property
    def last_good(self) -> StoredRules | None:
        """The newest set read from Redis (what ``get`` returns while Redis is away)."""
        return self._last_good

    def reconcile(self, reason: str = "manual") -> bool:
        """Fetch the stored set and deliver it if it differs from the last delivered one.

        Returns True when callbacks were called. Raises redis connection errors (the loop counts
        them and reconnects)."""
        self.reconciles[reason] += 1
        fetched = self._fetch()
        if fetched is None:
            return False
        key = (fetched.version, self._last_digest or "")
        with self._lock:
            if key == self._delivered:
                return False
            self._delivered = key
            callbacks = list(self._callbacks)
        self.deliveries += 1
        for callback in callbacks:
            try:
                callback(fetched)
            except Exception:  # noqa: BLE001 - a bad callback must not stop the sync loop
                self.callback_errors += 1
                log.exception("rule store subscriber failed on version %s", fetched.version)
        return True

    def history(self, last: int = 20) -> list[dict]:
        """The most recent rule-store audit events (action stored / reseeded: who, when, version)."""
        try:
            entries = self._r.xrevrange(self.keys["events"], count=max(last * 20, 200))
        except _CONN_ERRORS as exc:
            self._error("history", exc)
            raise StoreUnavailable(str(exc)) from exc
        out = [
            _decode_entry(eid, fields)
            for eid, fields in entries
            if fields.get("kind") == "rules" and fields.get("event_id", "").startswith("rules-")
        ]
        return list(reversed(out[:last]))

    # ---- internals -------------------------------------------------------------------------

    def _fetch(self) -> StoredRules | None:
        """Read the stored set and adopt it as the last good one; None when there is nothing to
        adopt: Redis holds no rules, or only an older write-back than ours (both are written back)."""
        raw = self._r.hgetall(self.keys["rules"])
        self.connected = True
        with self._lock:
            last = self._last_good
        stored = None
        if raw and "version" in raw:
            stored = StoredRules(
                yaml=raw.get("yaml", ""),
                version=int(raw["version"]),
                author=raw.get("author", ""),
                updated_unix_s=float(raw.get("updated_unix_s") or 0.0),
            )
        if last is not None and (
            stored is None or (raw.get("reseeded_by") and stored.version < last.version)
        ):
            if self.reseed_when_empty:
                self._reseed(last)  # its PUBLISH brings the fleet back to one set
            return None
        if stored is None:
            return None
        with self._lock:
            self._last_good = stored
            self._last_digest = raw.get("sha256") or _digest(stored.yaml)
        return stored

    def _reseed(self, last: StoredRules) -> None:
        try:
            wrote = self._reseed_script(
                keys=[self.keys["rules"], self.keys["version"], self.keys["events"]],
                args=[
                    last.yaml,
                    last.version,
                    last.author,
                    repr(last.updated_unix_s),
                    self._last_digest or _digest(last.yaml),
                    self.replica,
                    self.events_maxlen,
                    self.keys["channel"],
                    repr(time.time()),
                ],
            )
        except _CONN_ERRORS as exc:
            self._error("reseed", exc)
            return
        if int(wrote):
            self.reseeds += 1
            log.warning("redis held no rules: wrote back last good set v%s from %s", last.version, self.replica)

    def _error(self, op: str, exc: BaseException) -> None:
        self.errors[op] += 1
        if self.connected:
            log.warning("redis rule store: %s failed (%s); keeping the last good rules", op, exc)
        self.connected = False

    def _run(self) -> None:
        backoff = _Backoff(*self._backoff)
        sub_client = _client(self.url, self._socket_timeout, retries=0) if self._owns_client else self._r
        try:
            while not self._stop.is_set():
                try:
                    self._listen(sub_client, backoff)
                except _CONN_ERRORS as exc:
                    if self._stop.is_set():
                        break  # close() shut the connection under us
                    self._error("subscribe", exc)
                    self._stop.wait(backoff.next())
                except Exception:  # noqa: BLE001 - keep syncing whatever happens
                    if self._stop.is_set():
                        break
                    self.errors["subscribe"] += 1
                    log.exception("redis rule sync loop error")
                    self._stop.wait(backoff.next())
        finally:
            if sub_client is not self._r:
                sub_client.close()

    def _listen(self, sub_client: _redis.Redis, backoff: _Backoff) -> None:
        pubsub = sub_client.pubsub(ignore_subscribe_messages=True)
        self._pubsub = pubsub
        try:
            pubsub.subscribe(self.keys["channel"])
            # Subscribed first, then read: a change between the two is seen either way.
            self.reconcile("connect")
            backoff.reset()
            next_timer = time.monotonic() + self.reconcile_interval_s
            while not self._stop.is_set():
                wait = max(0.0, min(0.5, next_timer - time.monotonic()))
                message = pubsub.get_message(timeout=wait)
                if message and message.get("type") == "message":
                    with self._lock:
                        delivered = self._delivered
                    try:
                        announced = int(message["data"])
                    except (TypeError, ValueError):
                        announced = -1
                    if delivered is None or announced != delivered[0]:
                        self.reconcile("notice")
                if time.monotonic() >= next_timer:
                    self.reconcile("timer")
                    next_timer = time.monotonic() + self.reconcile_interval_s
        finally:
            self._pubsub = None
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001
                pass


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
        self._r = client or _client(url, socket_timeout)
        self._owns_client = client is None
        self._reader: _redis.Redis | None = None
        self._backoff = _Backoff(backoff_initial_s, backoff_max_s)

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
        except _CONN_ERRORS as exc:
            self._error("tail", exc)
            raise StoreUnavailable(f"redis at {_safe_url(self.url)} unavailable: {exc}") from exc
        return [_decode_entry(eid, fields) for eid, fields in reversed(entries)]

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
            except _CONN_ERRORS as exc:
                self._error("follow", exc)
                self._stop.wait(max(0.0, min(deadline - time.monotonic(), 0.5)))
                if time.monotonic() >= deadline:
                    return []
                continue
            if resp:
                entries = resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]
                return [_decode_entry(eid, fields) for eid, fields in entries]
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
        except _CONN_ERRORS as exc:
            self._error("consume", exc)
            self._stop.wait(min(block_ms, 500) / 1000)
            return []

    def ack(self, group: str, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        try:
            return int(self._r.xack(self.stream, group, *ids))
        except _CONN_ERRORS as exc:
            self._error("ack", exc)
            return 0

    # ---- internals -------------------------------------------------------------------------

    def _consume(self, group: str, consumer: str, count: int, block_ms: int, claim_idle_ms: int) -> list[dict]:
        reader = self._reader_client()
        if claim_idle_ms >= 0:
            claimed = reader.xautoclaim(self.stream, group, consumer, min_idle_time=claim_idle_ms, count=count)
            entries = [e for e in (claimed[1] if claimed else []) if e and e[1] is not None]
            if entries:
                return [_decode_entry(eid, fields) for eid, fields in entries]
        resp = reader.xreadgroup(
            group, consumer, {self.stream: ">"}, count=count, block=min(block_ms, 1000) if block_ms > 0 else None
        )
        if not resp:
            return []
        entries = resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]
        return [_decode_entry(eid, fields) for eid, fields in entries if fields is not None]

    def _reader_client(self) -> _redis.Redis:
        # Blocking reads get their own client whose socket timeout outlasts one 1 s BLOCK slice.
        if self._reader is None:
            self._reader = _client(self.url, self._socket_timeout + 1.5)
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
            except _CONN_ERRORS as exc:
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


def _decode_entry(entry_id: str, fields: dict[str, str]) -> dict:
    try:
        event = json.loads(fields.get("data") or "{}")
        if not isinstance(event, dict):
            event = {"data": event}
    except ValueError:
        event = {"data": fields.get("data")}
    event.setdefault("kind", fields.get("kind", "event"))
    if "event_id" in fields:
        event.setdefault("event_id", fields["event_id"])
    event["id"] = entry_id
    return event


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _safe_url(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def open_redis_stores(store_config: Any, **kwargs: Any) -> tuple[RedisRuleStore, RedisEventStore]:
    """Both Redis stores from a ``StoreConfig`` (``url``, ``prefix``, ``events_maxlen``,
    ``reconcile_interval_s``); ``kwargs`` go to both constructors where they apply."""
    common = {k: v for k, v in kwargs.items() if k in ("socket_timeout",)}
    rules = RedisRuleStore(
        store_config.url,
        prefix=store_config.prefix,
        reconcile_interval_s=store_config.reconcile_interval_s,
        events_maxlen=store_config.events_maxlen,
        **common,
        **{k: v for k, v in kwargs.items() if k in ("replica", "reseed_when_empty")},
    )
    events = RedisEventStore(
        store_config.url,
        prefix=store_config.prefix,
        maxlen=store_config.events_maxlen,
        **common,
        **{k: v for k, v in kwargs.items() if k in ("buffer_max", "batch_size")},
    )
    return rules, events
