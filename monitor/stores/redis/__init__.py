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

Modules: ``rules`` (RedisRuleStore and its Lua scripts), ``events`` (RedisEventStore),
``connection`` (key names, clients, backoff, entry decoding). Every public name is importable from
``monitor.stores.redis``.

Counters for the sidecar's metrics are plain attributes: ``errors`` (op -> count, maps to
``featurewatch_store_errors_total{store="redis", op}``) and, on the event store, ``dropped``
(reason -> count, maps to ``featurewatch_events_dropped_total{reason}``).
"""

from __future__ import annotations

from typing import Any

from monitor.stores.base import StoreUnavailable
from monitor.stores.redis.connection import redis_keys
from monitor.stores.redis.events import RedisEventStore
from monitor.stores.redis.rules import RedisRuleStore, RuleConflict

__all__ = [
    "RedisRuleStore",
    "RedisEventStore",
    "RuleConflict",
    "StoreUnavailable",
    "open_redis_stores",
    "redis_keys",
]


def open_redis_stores(store_config: Any, **kwargs: Any) -> tuple[RedisRuleStore, RedisEventStore]:
    """Both Redis stores from a ``StoreConfig`` (``url``, ``prefix``, ``events_maxlen``,
    ``events_buffer_max``, ``reconcile_interval_s``); ``kwargs`` go to both constructors where they apply."""
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
        **{"buffer_max": getattr(store_config, "events_buffer_max", 10_000),
           **{k: v for k, v in kwargs.items() if k in ("buffer_max", "batch_size")}},
    )
    return rules, events
