"""RedisRuleStore / RedisEventStore against a real redis-server, including kill -9 and restart."""

from __future__ import annotations

import inspect
import json
import shutil
import threading
import time

import pytest
import redis

from tests.deploy.deploy_helpers import wait_for
from monitor.stores.base import EventStore, RuleStore, StoredRules
from monitor.stores.redis import (
    RedisEventStore,
    RedisRuleStore,
    RuleConflict,
    StoreUnavailable,
    open_redis_stores,
    redis_keys,
)

RULES_V1 = "rules:\n  - name: a\n    signal: {source: l2, feature: 1}\n    above: 1.0\n"
RULES_V2 = RULES_V1.replace("above: 1.0", "above: 2.0")
RULES_V3 = RULES_V1.replace("above: 1.0", "above: 3.0")

FAST = dict(reconcile_interval_s=0.3, backoff_initial_s=0.05, backoff_max_s=0.2, socket_timeout=0.5)
FAST_EVENTS = dict(backoff_initial_s=0.02, backoff_max_s=0.2, socket_timeout=0.5)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[StoredRules] = []
        self.lock = threading.Lock()

    def __call__(self, rules: StoredRules) -> None:
        with self.lock:
            self.seen.append(rules)

    @property
    def versions(self) -> list[int]:
        with self.lock:
            return [r.version for r in self.seen]

    def wait_version(self, version: int, timeout: float = 60.0) -> StoredRules:
        wait_for(lambda: version in self.versions, timeout, what=f"delivery of v{version} (got {self.versions})")
        return next(r for r in self.seen if r.version == version)


@pytest.fixture
def stores(redis_server):
    made: list = []

    def rules(**kw) -> RedisRuleStore:
        store = RedisRuleStore(redis_server.url, **{**FAST, **kw})
        made.append(store)
        return store

    def events(**kw) -> EventStore:
        store = RedisEventStore(redis_server.url, **{**FAST_EVENTS, **kw})
        made.append(store)
        return store

    yield rules, events
    for store in made:
        store.close(**({"timeout": 0.2} if isinstance(store, RedisEventStore) else {}))


def raw(server) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def test_protocols_and_keys(stores):
    rules, events = stores
    for store, protocol in ((rules(), RuleStore), (events(), EventStore)):
        for name, member in vars(protocol).items():
            if callable(member) and not name.startswith("_"):
                want = list(inspect.signature(member).parameters)
                have = list(inspect.signature(getattr(store, name)).parameters)
                assert have[: len(want) - 1] == want[1:], (protocol.__name__, name, have)
    keys = redis_keys("prod")
    assert keys == {
        "rules": "{prod}:rules",
        "version": "{prod}:rules:version",
        "channel": "{prod}:rules:changed",
        "events": "{prod}:events",
    }


def test_put_get_versions_and_audit_trail(stores, redis_server):
    rules, events = stores
    store = rules()
    assert store.get() == StoredRules("", 0)  # an empty store
    before = time.time()
    assert store.put(RULES_V1, "alice") == 1
    assert store.put(RULES_V2, "bob") == 2
    got = store.get()
    assert (got.yaml, got.version, got.author) == (RULES_V2, 2, "bob")
    assert before <= got.updated_unix_s <= time.time()

    # Every change is in the audit stream with who / when / version, readable by the event store.
    changes = [e for e in events().tail(10) if e["kind"] == "rules"]
    assert [(e["action"], e["version"], e["previous_version"], e["author"]) for e in changes] == [
        ("stored", 1, 0, "alice"), ("stored", 2, 1, "bob")]
    assert all(before - 1 <= e["unix_s"] <= time.time() + 1 for e in changes)
    assert [e["author"] for e in store.history()] == ["alice", "bob"]

    # Compare-and-set.
    with pytest.raises(RuleConflict) as err:
        store.put(RULES_V3, "carol", expected_version=1)
    assert err.value.current == 2
    assert store.put(RULES_V3, "carol", expected_version=2) == 3

    # Other prefixes are other fleets.
    assert rules(prefix="other").get().version == 0


def test_replicas_hot_reload_on_publish(stores):
    rules, _ = stores
    admin = rules()
    admin.put(RULES_V1, "alice")
    replicas = [rules(reconcile_interval_s=60) for _ in range(2)]  # no timer help: PUBLISH only
    recorders = []
    for replica in replicas:
        assert replica.get().version == 1  # what the sidecar loads at start
        rec = Recorder()
        replica.subscribe(rec)
        recorders.append(rec)
    wait_for(lambda: all(r.reconciles["connect"] for r in replicas), what="subscriptions")

    admin.put(RULES_V2, "bob")
    for rec in recorders:
        assert rec.wait_version(2).yaml == RULES_V2
    # v1 was applied from get() before subscribing: not delivered again.
    assert all(rec.versions == [2] for rec in recorders)
    assert all(r.reconciles["notice"] >= 1 for r in replicas)


def test_timer_reconcile_catches_a_missed_notice(stores, redis_server):
    rules, _ = stores
    replica = rules(reconcile_interval_s=0.2)
    rec = Recorder()
    replica.subscribe(rec)
    wait_for(lambda: replica.reconciles["connect"], what="subscription")
    # A writer that bypasses the script (no PUBLISH): only the timer can notice.
    keys = replica.keys
    raw(redis_server).hset(keys["rules"], mapping={"yaml": RULES_V1, "version": 7, "author": "manual"})
    assert rec.wait_version(7, timeout=60).author == "manual"
    assert replica.reconciles["timer"] >= 1


def test_callback_errors_are_counted_not_raised(stores):
    rules, _ = stores
    replica = rules()
    good = Recorder()

    def bad(_: StoredRules) -> None:
        raise ValueError("invalid rules")

    replica.subscribe(bad)
    replica.subscribe(good)
    rules().put(RULES_V1, "alice")
    good.wait_version(1)
    rules().put(RULES_V2, "alice")
    good.wait_version(2)
    assert replica.callback_errors == 2


def test_events_append_tail_follow(stores):
    _, events = stores
    store = events()
    reader = events()
    assert reader.follow(None, block_ms=0) == []
    ids = [store.append({"kind": "alert", "rule": "a", "request_id": f"r{i}", "labels": {"tenant": "acme"}}) for i in range(5)]
    assert store.flush(60)
    got = reader.tail(3)
    assert [e["request_id"] for e in got] == ["r2", "r3", "r4"]
    assert [e["event_id"] for e in got] == ids[2:]
    assert got[0]["labels"] == {"tenant": "acme"} and got[0]["kind"] == "alert" and "unix_s" in got[0]
    assert [e["request_id"] for e in reader.follow(None, block_ms=0)] == [f"r{i}" for i in range(5)]

    # follow blocks until something newer than after_id arrives (what `alerts tail` loops on).
    last = got[-1]["id"]
    assert reader.follow(last, block_ms=100) == []
    # A block far longer than any test: had follow not woken on the append, it would return [].
    threading.Timer(0.2, lambda: store.append({"kind": "steering", "action": "clamp"})).start()
    newer = reader.follow(last, block_ms=600_000)
    assert [e["kind"] for e in newer] == ["steering"]
    assert store.flush(60)
    assert store.appended == 6 and store.written == 6 and store.dropped_total == 0


def test_events_stream_is_capped(stores, redis_server):
    _, events = stores
    store = events(maxlen=100)
    for i in range(1000):
        store.append({"kind": "alert", "n": i})
    assert store.flush(60)
    length = raw(redis_server).xlen(store.stream)
    assert 100 <= length < 1000  # MAXLEN ~ trims whole macro nodes
    assert store.tail(1)[0]["n"] == 999


def test_bad_events_are_counted_not_raised(stores):
    _, events = stores
    store = events(max_event_bytes=1000)
    store.append({"kind": "alert", "blob": "x" * 5000})
    store.append(["not", "a", "dict"])  # type: ignore[arg-type]
    store.append({"kind": "alert", "obj": object()})  # default=str serialises it
    assert store.flush(60)
    assert store.dropped == {"too_large": 1, "unserializable": 1}
    assert len(store.tail(10)) == 1


def test_consumer_groups(stores):
    _, events = stores
    store = events()
    store.ensure_group("webhook")
    store.ensure_group("webhook")  # idempotent
    for i in range(6):
        store.append({"kind": "alert", "n": i})
    assert store.flush(60)
    a = store.consume("webhook", "a", count=3, block_ms=100)
    b = store.consume("webhook", "b", count=10, block_ms=100)
    assert sorted(e["n"] for e in a + b) == list(range(6))
    assert store.ack("webhook", [e["id"] for e in b]) == len(b)
    # "a" died without acking: after claim_idle_ms its events go to "c".
    time.sleep(0.05)
    c = store.consume("webhook", "c", count=10, block_ms=100, claim_idle_ms=10)
    assert sorted(e["n"] for e in c) == sorted(e["n"] for e in a)
    store.ack("webhook", [e["id"] for e in c])
    assert store.consume("webhook", "c", count=10, block_ms=50, claim_idle_ms=10) == []


def test_redis_killed_and_restarted_mid_run(stores, redis_server):
    """kill -9 Redis (no persistence) under load, then start it again on the same port."""
    rules, events = stores
    admin = rules()
    admin.put(RULES_V1, "alice")
    admin.put(RULES_V2, "bob")
    replica_a, replica_b = rules(replica="a"), rules(replica="b")
    rec_a, rec_b = Recorder(), Recorder()
    for replica, rec in ((replica_a, rec_a), (replica_b, rec_b)):
        assert replica.get().version == 2
        replica.subscribe(rec)
    wait_for(lambda: replica_a.reconciles["connect"] and replica_b.reconciles["connect"], what="subscriptions")
    sink = events(buffer_max=50)
    for i in range(10):
        sink.append({"kind": "alert", "n": i})
    assert sink.flush(60)

    redis_server.kill()

    # Rules: the last good set is served; a put fails loudly (the operator must know).
    assert replica_a.get() == replica_a.last_good and replica_a.get().version == 2
    with pytest.raises(StoreUnavailable):
        admin.put(RULES_V3, "carol")
    assert admin.errors["put"] == 1 and replica_a.errors["get"] >= 1

    # Events: append never raises and never waits on the network; they are buffered.
    for i in range(10, 40):
        sink.append({"kind": "alert", "n": i})
    wait_for(lambda: sink.errors["append"] >= 1 and not sink.connected, what="the event flusher to notice")
    assert 0 < sink.buffered <= 30
    wait_for(lambda: not replica_a.connected and replica_a.errors["subscribe"] >= 1, what="the rule sync to notice")

    redis_server.start()  # same port, empty: it had no persistence

    # Events buffered while Redis was away are flushed once it is back.
    assert sink.flush(60), f"still buffered: {sink.buffered}, errors {dict(sink.errors)}"
    assert sorted(e["n"] for e in sink.tail(100) if e["kind"] == "alert") == list(range(10, 40))
    assert sink.dropped_total == 0

    # Rules survive: a replica writes its last good set back with its version...
    wait_for(lambda: admin.get().version == 2, timeout=60, what="write-back of the last good rules")
    stored = raw(redis_server).hgetall(admin.keys["rules"])
    assert stored["yaml"] == RULES_V2 and stored["reseeded_by"] in ("a", "b")
    assert replica_a.reseeds + replica_b.reseeds >= 1
    assert any(e["kind"] == "rules" and e["action"] == "reseeded" for e in sink.tail(100))
    # ...and nobody was told to reload the same set.
    assert rec_a.versions == [] and rec_b.versions == []

    # Reconciled after the restart: the next put reaches both replicas, version after the old one.
    assert admin.put(RULES_V3, "carol") == 3
    assert rec_a.wait_version(3).yaml == RULES_V3
    assert rec_b.wait_version(3).author == "carol"
    assert replica_a.reconciles["connect"] >= 2 and replica_a.connected


def test_events_dropped_when_buffer_full(stores, redis_server):
    _, events = stores
    sink = events(buffer_max=10)
    redis_server.kill()
    for i in range(25):
        sink.append({"kind": "alert", "n": i})
    assert sink.dropped == {"buffer_full": 15}
    assert sink.buffered == 10
    redis_server.start()
    assert sink.flush(60)
    # The newest events are kept: an incident's latest alerts matter most.
    assert [e["n"] for e in sink.tail(100)] == list(range(15, 25))

    # Events still buffered at close are counted, not silently lost.
    redis_server.kill()
    sink.append({"kind": "alert", "n": 99})
    sink.close(timeout=0.2)
    assert sink.dropped["closed"] == 1


def test_reconcile_on_reconnect_picks_up_a_changed_store(stores, redis_server, redis_factory, tmp_path):
    """Redis comes back from a snapshot holding a newer set (failover / restore): no PUBLISH is
    ever sent, yet every replica converges as soon as it reconnects."""
    rules, _ = stores
    rules().put(RULES_V1, "alice")
    replica = rules(reconcile_interval_s=60)  # only the reconnect can find it
    rec = Recorder()
    replica.get()
    replica.subscribe(rec)
    wait_for(lambda: replica.reconciles["connect"], what="subscription")

    # Build a snapshot with v5 elsewhere.
    other = redis_factory("snapshot")
    builder = RedisRuleStore(other.url, **FAST)
    for text in (RULES_V1, RULES_V2, RULES_V3, RULES_V2, RULES_V3):
        builder.put(text, "restore")
    builder.close()
    raw(other).save()
    redis_server.kill()
    shutil.copy(other.dir / "dump.rdb", redis_server.dir / "dump.rdb")
    redis_server.start()

    got = rec.wait_version(5, timeout=60)
    assert got.yaml == RULES_V3 and got.author == "restore"
    assert replica.reconciles["connect"] >= 2 and replica.reconciles["notice"] == 0
    assert replica.reseeds == 0  # the restored set was an operator's: never overwritten


def test_write_back_never_overrides_an_operator_put(stores, redis_server):
    rules, _ = stores
    old, new = rules(replica="old"), rules(replica="new")
    r = raw(redis_server)
    keys = old.keys
    r.hset(keys["rules"], mapping={"yaml": RULES_V1, "version": 4, "author": "x"})
    old.get()
    r.hset(keys["rules"], mapping={"yaml": RULES_V2, "version": 6, "author": "y"})
    new.get()
    r.delete(keys["rules"], keys["version"])  # Redis lost everything

    assert old.get().version == 4  # writes back v4
    assert r.hget(keys["rules"], "reseeded_by") == "old"
    assert new.get().version == 6  # a newer write-back replaces an older one
    assert r.hget(keys["rules"], "reseeded_by") == "new"
    assert old.get().version == 6  # never goes back
    assert rules().put(RULES_V3, "ops") == 7  # versions keep growing after a write-back
    assert r.hget(keys["rules"], "reseeded_by") is None
    new._last_good = StoredRules(RULES_V1, 99)  # even a "newer" write-back never beats an operator's put
    new._reseed(new._last_good)
    assert r.hget(keys["rules"], "version") == "7"


def test_open_from_store_config(redis_server):
    from monitor.config import StoreConfig

    cfg = StoreConfig(kind="redis", url=redis_server.url, prefix="fleet1", events_maxlen=500, reconcile_interval_s=2)
    rules, events = open_redis_stores(cfg)
    try:
        assert rules.reconcile_interval_s == 2 and events.maxlen == 500
        assert rules.keys["rules"] == "{fleet1}:rules" and events.stream == "{fleet1}:events"
        assert rules.put(RULES_V1, "a") == 1 and events.tail(1)[0]["action"] == "stored"
    finally:
        rules.close()
        events.close()


def test_cli_alerts_tail_reads_the_stream(stores, redis_server):
    from typer.testing import CliRunner

    from monitor.cli import app

    rules, events = stores
    rules().put(RULES_V1, "alice")
    sink = events()
    for i in range(3):
        sink.append({"kind": "alert", "rule": "a", "severity": "warning", "n": i})
    assert sink.flush(60)
    result = CliRunner().invoke(app, ["alerts", "tail", "--redis", redis_server.url, "--last", "3", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [e["n"] for e in lines] == [0, 1, 2] and all(e["kind"] == "alert" for e in lines)
