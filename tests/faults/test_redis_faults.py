"""Redis faults against the real sidecar: down at start, killed and restarted under ingest traffic.

The sidecar must serve whatever Redis does: start without it (on the rules file, or on no rules),
answer TailAlerts with UNAVAILABLE while it is away, reconcile when it returns, and buffer alert
events across an outage: none lost within the buffer bound, every one beyond it counted.
"""

from __future__ import annotations

import json
import threading

import grpc
import numpy as np
import pytest
import redis

from monitor.protocol import pb, pb_grpc
from monitor.stores.redis import RedisRuleStore
from tests.deploy.deploy_helpers import RedisProcess, need_binary, wait_for
from tests.support.dictionaries import planted_direction, planted_rules
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, fixture_config, metric_value

D = 64
AUTH = [("authorization", f"Bearer {ADMIN_TOKEN}")]
RULES = planted_rules()
PREFIX = "fwfault"
# One rule, alert + steer: each planted request makes exactly two events (alert, steering).
ONE_RULE = """rules:
  - name: planted_feature
    signal: {source: sae, feature: 3}
    above: 2.0
    actions:
      - alert: {}
      - steer: {clamp: {source: sae, feature: 3, value: 0}}
"""


@pytest.fixture
def redis_proc(tmp_path):
    """A redis-server with an append-only file: what it stored survives kill -9."""
    server = RedisProcess(need_binary("redis-server"), tmp_path / "redis", persist=True)
    server.start()
    yield server
    server.kill()


def store_config(server: RedisProcess, **extra) -> dict:
    return {"kind": "redis", "url": server.url, "prefix": PREFIX, "reconcile_interval_s": 0.5, **extra}


def sidecar(tmp_path, server: RedisProcess, rules: str | None = None, **store) -> SidecarProcess:
    extra = {}
    if rules is not None:
        (tmp_path / "rules.yaml").write_text(rules)
        extra["rules_file"] = str(tmp_path / "rules.yaml")
    config = fixture_config(tmp_path, D, store=store_config(server, **store), store_counters_interval_s=0.1, **extra)
    return SidecarProcess(tmp_path, config)


def metric(sc: SidecarProcess, name: str, **labels) -> float:
    return metric_value(sc.metrics(), name, **labels)


def planted(n: int = 1) -> np.ndarray:
    x = np.zeros((1, n, D), np.float32)
    x[0, -1] = 10 * planted_direction(D)
    return x


def steered(client: PluginClient, request_id: str) -> pb.SteeringDirective:
    """One planted request; returns its directive (so the sidecar evaluated it with rules in force)."""
    client.start_request(request_id)
    client.send(PluginClient.batch(1, [1], planted(), [request_id], [0], [0], [True]))
    return client.wait_for(lambda m: m.HasField("directive") and m.directive.request_id == request_id, timeout=60).directive


def tail(sc: SidecarProcess, last: int = 100) -> list[dict]:
    stub = pb_grpc.AdminStub(grpc.insecure_channel(sc.tcp_address))
    return [json.loads(e.json) for e in stub.TailAlerts(pb.TailAlertsRequest(last=last), metadata=AUTH, timeout=60)]


def assert_tail_unavailable(sc: SidecarProcess) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        tail(sc)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, (exc.value.code(), exc.value.details())
    assert "event store unavailable" in exc.value.details() and "redis" in exc.value.details()


def sidecar_events(server: RedisProcess) -> dict[str, dict]:
    """The sidecar's events in the stream by event_id (the rule store's own audit entries left out;
    delivery is at-least-once, so a duplicate counts once)."""
    r = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        entries = r.xrange("{" + PREFIX + "}:events")
    finally:
        r.close()
    out = {}
    for _, fields in entries:
        if not fields["event_id"].startswith("rules-"):
            out[fields["event_id"]] = json.loads(fields["data"])
    return out


def test_redis_down_at_start_then_the_stored_rules_come_into_force(tmp_path, redis_proc):
    # Redis holds v3 (three operator puts) when it goes down; the sidecar starts while it is away.
    admin = RedisRuleStore(redis_proc.url, prefix=PREFIX)
    for text in (ONE_RULE, RULES.replace("above: 2.0", "above: 3.0"), RULES):
        admin.put(text, "ops")
    admin.close()
    redis_proc.kill()
    with sidecar(tmp_path, redis_proc) as sc:  # serving: grpc.health says SERVING
        assert metric(sc, "featurewatch_rules_version") == 0
        assert_tail_unavailable(sc)
        client = PluginClient(sc.socket_address, D)
        try:
            assert client.plan().rules_version == 0
            redis_proc.start()  # with its data: the subscription reconnects and loads v3
            wait_for(lambda: metric(sc, "featurewatch_rules_version") == 3, 20, what="the stored v3 in force")
            plan = client.wait_for(lambda m: m.HasField("plan") and m.plan.rules_version == 3).plan
            assert [p.name for p in plan.policies] == ["tenant_b_suppress"]
            assert steered(client, "after-0-00000000").rule == "planted_feature"
        finally:
            client.close()
        wait_for(lambda: any(e.get("request_id") == "after-0-00000000" for e in tail(sc)), 20, what="the alert in TailAlerts")
    assert "Traceback" not in sc.log()


def test_redis_down_at_start_serves_the_rules_file_and_publishes_it_on_return(tmp_path, redis_proc):
    redis_proc.kill()
    with sidecar(tmp_path, redis_proc, rules=RULES) as sc:
        # The file's rules are in force without Redis (not from the store: version 0)...
        client = PluginClient(sc.socket_address, D)
        try:
            assert [p.name for p in client.plan().policies] == ["tenant_b_suppress"]
            assert steered(client, "early-0-00000000").rule == "planted_feature"
        finally:
            client.close()
        assert_tail_unavailable(sc)
        assert metric(sc, "featurewatch_rule_reloads_total", result="error") == 0
        # ...and are stored once Redis is back: every replica then runs this set.
        redis_proc.start()
        wait_for(lambda: metric(sc, "featurewatch_rules_version") >= 1, 20, what="the file's rules stored and in force")
        stored = redis.Redis.from_url(redis_proc.url, decode_responses=True).hgetall("{" + PREFIX + "}:rules")
        assert stored["yaml"] == RULES and stored["author"].startswith("file:")
        assert metric(sc, "featurewatch_rules_version") == int(stored["version"])
        # The alert raised while Redis was away was buffered, then written.
        wait_for(lambda: any(e.get("request_id") == "early-0-00000000" and e["kind"] == "alert" for e in tail(sc)),
                 20, what="the buffered alert")
    assert "Traceback" not in sc.log()


class Background:
    """Ingest traffic that makes no events (unplanted rows), sent until stopped."""

    def __init__(self, address: str) -> None:
        self.client = PluginClient(address, D, engine="bg")
        self.client.plan()
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        self.client.start_request("bg-0-00000000")
        while not self.stop.wait(0.005):
            x = (rng.standard_normal((1, 4, D)) * 0.05).astype(np.float32)
            pos = [4 * self.sent + i for i in range(4)]
            self.client.send(PluginClient.batch(self.sent + 1, [1], x, ["bg-0-00000000"], [0] * 4, pos, [True] * 4))
            self.sent += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert self.client.error is None, self.client.error
        self.client.close()


def test_alerts_are_buffered_across_a_redis_restart_and_losses_beyond_the_bound_counted(tmp_path, redis_proc):
    bound = 20
    sc = sidecar(tmp_path, redis_proc, rules=ONE_RULE, events_buffer_max=bound).start()
    background = client = None
    try:
        wait_for(lambda: metric(sc, "featurewatch_rules_version") == 1, 20, what="the file's rules stored")
        wait_for(lambda: len(sidecar_events(redis_proc)) == 1, 20, what="the rules event written")  # action: put
        background = Background(sc.socket_address)
        client = PluginClient(sc.socket_address, D)
        client.plan()

        def outage(requests: list[str]) -> float:
            """Kill Redis, make two events per request while it is away, start it again."""
            redis_proc.kill()
            tokens = metric(sc, "featurewatch_tokens_processed_total")
            events = metric(sc, "featurewatch_events_total")
            for rid in requests:
                assert steered(client, rid).rule == "planted_feature"  # steering is unaffected
            wait_for(lambda: metric(sc, "featurewatch_events_total") == events + 2 * len(requests), 20,
                     what="every event handed to the store")
            wait_for(lambda: metric(sc, "featurewatch_tokens_processed_total") > tokens, 20, what="ingest during the outage")
            wait_for(lambda: metric(sc, "featurewatch_store_errors_total", store="redis", op="append") > 0, 20,
                     what="the outage seen by the event store")
            dropped = metric(sc, "featurewatch_events_dropped_total")
            redis_proc.start()
            return dropped

        # Within the bound (16 events <= 20): every one is written once Redis is back.
        first = [f"in-{i}-00000000" for i in range(bound // 2 - 2)]
        assert outage(first) == 0
        wait_for(lambda: len(sidecar_events(redis_proc)) == 1 + 2 * len(first), 20, what="the buffered events")
        written = sidecar_events(redis_proc).values()
        assert sorted(e["request_id"] for e in written if e["kind"] == "alert") == sorted(first)
        assert sorted(e["request_id"] for e in written if e["kind"] == "steering") == sorted(first)

        # Beyond it (60 events > 20): the newest 20 are written, the other 40 counted as dropped.
        second = [f"over-{i}-00000000" for i in range(30)]
        outage(second)
        wait_for(lambda: metric(sc, "featurewatch_events_dropped_total", reason="store_buffer_full") == 2 * len(second) - bound,
                 20, what="the overflow counted")
        total = 1 + 2 * len(first) + bound
        wait_for(lambda: len(sidecar_events(redis_proc)) == total, 20, what="the newest events written")
        kept = [e for e in sidecar_events(redis_proc).values() if e.get("request_id", "").startswith("over-")]
        assert sorted({e["request_id"] for e in kept}) == sorted(second[-bound // 2:])
        assert metric(sc, "featurewatch_events_dropped_total") == 2 * len(second) - bound  # no other loss
        assert metric(sc, "featurewatch_events_total") == total + 2 * len(second) - bound
        assert sc.healthy() and background.sent > 0
    finally:
        for c in (background, client):
            if c is not None:
                c.close()
        sc.stop()
    assert "Traceback" not in sc.log()
