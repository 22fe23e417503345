"""Two real sidecar replicas sharing one real Redis: rule sync, Redis killed and restarted mid-run."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from monitor.protocol import pb, pb_grpc
from tests.deploy.deploy_helpers import wait_for
from tests.sidecar.test_sidecar_grpc import RULES
from tests.support.dictionaries import planted_direction
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, fixture_config, metric_value

D = 64
AUTH = [("authorization", f"Bearer {ADMIN_TOKEN}")]


def planted(n: int = 1) -> np.ndarray:
    x = np.zeros((1, n, D), np.float32)
    x[0, -1] = 10 * planted_direction(D)
    return x


def admin(sc: SidecarProcess):
    return pb_grpc.AdminStub(grpc.insecure_channel(sc.tcp_address))


def directive_for(sc: SidecarProcess, request_id: str) -> pb.SteeringDirective:
    client = PluginClient(sc.socket_address, D)
    try:
        client.plan()
        client.start_request(request_id)
        client.send(PluginClient.batch(1, [1], planted(), [request_id], [0], [0], [True]))
        return client.wait_for(lambda m: m.HasField("directive"), timeout=60).directive
    finally:
        client.close()


def test_replicas_sync_rules_and_keep_serving_while_redis_is_away(tmp_path, redis_server):
    store = {"kind": "redis", "url": redis_server.url, "prefix": "fwtest", "reconcile_interval_s": 0.5}
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = fixture_config(tmp_path / name, D, store=store, store_counters_interval_s=0.2)
        replicas.append(SidecarProcess(tmp_path / name, config).start())
    a, b = replicas
    try:
        # A rule set put on replica a reaches replica b through Redis (version + PUBLISH).
        reply = admin(a).PutRules(pb.PutRulesRequest(yaml=RULES, author="alice"), metadata=AUTH, timeout=10)
        assert reply.ok and reply.version == 1
        wait_for(lambda: admin(b).GetRules(pb.GetRulesRequest(), metadata=AUTH).version == 1, 10, what="b synced")
        assert directive_for(b, "r1-0-00000000").rule == "planted_feature"

        # Redis dies: both replicas keep the last good rules; a put is refused with a clear error.
        redis_server.kill()
        assert directive_for(a, "r2-0-00000000").rule == "planted_feature"
        with pytest.raises(grpc.RpcError) as exc:
            admin(a).PutRules(pb.PutRulesRequest(yaml=RULES.replace("above: 2.0", "above: 3.0")), metadata=AUTH, timeout=30)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "rules in force unchanged (v1)" in exc.value.details()
        wait_for(lambda: metric_value(a.metrics(), "featurewatch_store_errors_total") > 0, 15, what="store errors exported")
        assert a.proc.poll() is None and b.proc.poll() is None

        # Redis comes back empty: the replicas write their last good set back; new puts flow again.
        redis_server.start()
        wait_for(lambda: admin(b).GetRules(pb.GetRulesRequest(), metadata=AUTH).version >= 1, 20, what="reseeded")
        reply = admin(b).PutRules(pb.PutRulesRequest(yaml=RULES.replace("above: 2.0", "above: 3.0"), author="bob"),
                                  metadata=AUTH, timeout=10)
        assert reply.ok
        # GetRules answers the rules in force on that replica (versions restart with an emptied Redis: wait for the text)
        in_force = lambda: admin(a).GetRules(pb.GetRulesRequest(), metadata=AUTH)  # noqa: E731
        wait_for(lambda: in_force().version == reply.version and "above: 3.0" in in_force().yaml, 15, what="a synced")
        # Alerts of both replicas land in the one Redis stream (after the restart).
        directive_for(a, "r3-0-00000000")
        events = [json.loads(e.json) for e in admin(b).TailAlerts(pb.TailAlertsRequest(last=100), metadata=AUTH)]
        assert any(e["kind"] == "alert" and e.get("request_id") == "r3-0-00000000" for e in events)
    finally:
        for sc in replicas:
            sc.stop()
