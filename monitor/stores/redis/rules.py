"""The rule store in Redis: one versioned set shared by every replica, kept in sync by PUBLISH,
reconnects and a timer (see the package docstring for the keys and the write-back rules)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from typing import Any, Callable

import redis as _redis

from monitor.stores.base import StoredRules, StoreUnavailable
from monitor.stores.redis.connection import (
    CONN_ERRORS,
    Backoff,
    connect,
    decode_entry,
    digest,
    hostname,
    redis_keys,
    safe_url,
)

log = logging.getLogger(__name__)


class RuleConflict(RuntimeError):
    """``put(..., expected_version=v)`` found another version in the store."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"rules changed concurrently: expected version {expected}, store has {current}")
        self.expected = expected
        self.current = current


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
        self.replica = replica or f"{hostname()}:{uuid.uuid4().hex[:8]}"
        self._socket_timeout = socket_timeout
        self._r = client or connect(url, socket_timeout)
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
        self._reported_down = False  # the first failure is logged even before any connection

    # ---- RuleStore -------------------------------------------------------------------------

    def get(self) -> StoredRules:
        try:
            fetched = self._fetch()
        except CONN_ERRORS as exc:
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
                    digest(yaml),
                    self.events_maxlen,
                    self.keys["channel"],
                    "" if expected_version is None else int(expected_version),
                ],
            )
        except CONN_ERRORS as exc:
            self._error("put", exc)
            raise StoreUnavailable(f"redis at {safe_url(self.url)} unavailable: {exc}") from exc
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
        except CONN_ERRORS as exc:
            self._error("history", exc)
            raise StoreUnavailable(str(exc)) from exc
        out = [
            decode_entry(eid, fields)
            for eid, fields in entries
            if fields.get("kind") == "rules" and fields.get("event_id", "").startswith("rules-")
        ]
        return list(reversed(out[:last]))

    # ---- internals -------------------------------------------------------------------------

    def _fetch(self) -> StoredRules | None:
        """Read the stored set and adopt it as the last good one; None when there is nothing to
        adopt: Redis holds no rules, or only an older write-back than ours (both are written back)."""
        raw = self._r.hgetall(self.keys["rules"])
        if not self.connected:
            log.info("redis rule store: connected to %s", safe_url(self.url))
        self.connected, self._reported_down = True, False
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
            self._last_digest = raw.get("sha256") or digest(stored.yaml)
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
                    self._last_digest or digest(last.yaml),
                    self.replica,
                    self.events_maxlen,
                    self.keys["channel"],
                    repr(time.time()),
                ],
            )
        except CONN_ERRORS as exc:
            self._error("reseed", exc)
            return
        if int(wrote):
            self.reseeds += 1
            log.warning("redis held no rules: wrote back last good set v%s from %s", last.version, self.replica)

    def _error(self, op: str, exc: BaseException) -> None:
        self.errors[op] += 1
        if not self._reported_down:
            log.warning("redis rule store: %s failed (%s); keeping the last good rules", op, exc)
        self.connected, self._reported_down = False, True

    def _run(self) -> None:
        backoff = Backoff(*self._backoff)
        sub_client = connect(self.url, self._socket_timeout, retries=0) if self._owns_client else self._r
        try:
            while not self._stop.is_set():
                try:
                    self._listen(sub_client, backoff)
                except CONN_ERRORS as exc:
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

    def _listen(self, sub_client: _redis.Redis, backoff: Backoff) -> None:
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
