"""The real sidecar process, driven by a real gRPC client over its Unix socket and TCP port."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time

import grpc
import numpy as np
import pytest

from monitor.protocol import pb, pb_grpc
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction, planted_rules
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, fixture_config, metric_value

D = 64
RULES = planted_rules("    window: {kind: count, n: 2}\n")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
AUTH = [("authorization", f"Bearer {ADMIN_TOKEN}")]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sidecar")
    (tmp / "rules.yaml").write_text(RULES)
    config = fixture_config(tmp, D, rules_file=str(tmp / "rules.yaml"), limits={"max_batch_bytes": 512 * 1024})
    proc = SidecarProcess(tmp, config)
    with proc:
        yield proc


def rows(n: int, planted: list[int], scale: float = 10.0, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((1, n, D)).astype(np.float32) * 0.05
    x[0, planted] += scale * planted_direction(D)
    return x


def admin(address: str):
    return pb_grpc.AdminStub(grpc.insecure_channel(address))


def test_alert_fires_and_steering_directive_comes_back(sidecar):
    client = PluginClient(sidecar.socket_address, D)
    try:
        plan = client.plan()
        assert list(plan.layers) == [1] and plan.steering_enabled
        assert [p.name for p in plan.policies] == ["tenant_b_suppress"]
        client.start_request("cmpl-abc-0-1a2b3c4d", "cmpl-abc", {"tenant": "a"}, TRACEPARENT)
        client.start_request("cmpl-other-0-99999999", "cmpl-other", {"tenant": "a"})
        # Two requests co-batched: 4 prompt tokens each, then the planted token only in the first.
        x = rows(8, planted=[1])  # a planted *prompt* token: out of scope for the feature rule
        client.send(PluginClient.batch(1, [1], x, ["cmpl-abc-0-1a2b3c4d", "cmpl-other-0-99999999"],
                                       [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2, 3], [False] * 8))
        x = rows(2, planted=[0], seed=1)
        client.send(PluginClient.batch(2, [1], x, ["cmpl-abc-0-1a2b3c4d", "cmpl-other-0-99999999"],
                                       [0, 1], [4, 4], [True, True]))
        directive = client.wait_for(lambda m: m.HasField("directive")).directive
        assert directive.request_id == "cmpl-abc-0-1a2b3c4d" and directive.rule == "planted_feature"
        assert directive.from_position == 5
        [action] = directive.actions
        assert action.layer == 1 and action.clamp.feature == PLANTED_FEATURE and action.clamp.value == 0
        np.testing.assert_allclose(np.frombuffer(action.clamp.decoder.data, np.float32), planted_direction(D), atol=1e-6)
        # The probe rule needs two tokens (the planted prompt token and the planted generated one).
        events = list(admin(sidecar.tcp_address).TailAlerts(pb.TailAlertsRequest(last=50), metadata=AUTH, timeout=10))
        deadline = time.monotonic() + 60
        while sum(e.kind == "alert" for e in events) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            events = list(admin(sidecar.tcp_address).TailAlerts(pb.TailAlertsRequest(last=50), metadata=AUTH, timeout=10))
        alerts = {e.rule: json.loads(e.json) for e in events if e.kind == "alert"}
        assert set(alerts) == {"planted_feature", "planted_probe"}
        feature_alert = alerts["planted_feature"]
        assert feature_alert["api_request_id"] == "cmpl-abc" and feature_alert["position"] == 4
        assert feature_alert["value"] == pytest.approx(9.0, abs=0.5)
        assert feature_alert["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert alerts["planted_probe"]["position"] == 4  # second planted token of the request
        assert any(e.kind == "steering" and e.rule == "planted_feature" for e in events)
        # The unplanted co-batched request got nothing.
        assert all(d.request_id != "cmpl-other-0-99999999" for d in client.directives())
        text = sidecar.metrics()
        assert metric_value(text, "featurewatch_alerts_total", rule="planted_feature", severity="critical") == 1
        assert metric_value(text, "featurewatch_steering_actions_total", rule="planted_feature", action="clamp") == 1
        assert metric_value(text, "featurewatch_tokens_processed_total", layer="1", scope="prompt") == 8
        assert metric_value(text, "featurewatch_tokens_processed_total", layer="1", scope="generated") == 2
        assert metric_value(text, "featurewatch_feature_active_tokens_total", feature=str(PLANTED_FEATURE)) == 2
        assert metric_value(text, "featurewatch_rule_info", rule="planted_feature", owner="trust-safety") == 1
        assert metric_value(text, "featurewatch_probe_score_count", probe="planted") == 10
        assert metric_value(text, "featurewatch_plugin_connected") == 1
    finally:
        client.close()


def test_malformed_and_oversized_batches_are_rejected_counted_and_the_stream_goes_on(sidecar):
    client = PluginClient(sidecar.socket_address, D)
    try:
        client.plan()
        before = sidecar.metrics()
        good = rows(2, planted=[])
        bad_shape = PluginClient.batch(10, [1], good, ["r"], [0, 0], [0, 1], [True, True])
        bad_shape.batch.activations.data = bad_shape.batch.activations.data[:-4]
        client.send(bad_shape)
        client.send(b"\x12\xff\xff\xff\xff\x0f")  # not protobuf at all: a batch field longer than the message
        client.send(PluginClient.batch(11, [1], good, ["r"], [0, 5], [0, 1], [True, True]))  # request index out of range
        client.send(PluginClient.batch(12, [7], good, ["r"], [0, 0], [0, 1], [True, True]))  # layer not in the plan
        huge = np.zeros((1, 4096, D), np.float32)  # 1 MiB > the 512 KiB limit this sidecar runs with
        client.send(PluginClient.batch(13, [1], huge, ["r"], [0] * 4096, range(4096), [True] * 4096))
        client.send(PluginClient.batch(14, [1], good, ["ok"], [0, 0], [0, 1], [True, True]))
        for step in (10, 11, 12, 13):
            ack = client.wait_for(lambda m, s=step: m.HasField("ack") and m.ack.step == s).ack
            assert ack.rejected_reason
        assert "oversized" in client.wait_for(lambda m: m.HasField("ack") and m.ack.step == 13).ack.rejected_reason
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            after = sidecar.metrics()
            if metric_value(after, "featurewatch_tokens_processed_total", scope="generated") >= \
                    metric_value(before, "featurewatch_tokens_processed_total", scope="generated") + 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the valid batch after the bad ones was not processed")
        for reason, n in (("malformed", 3), ("unknown_layer", 1), ("oversized", 1)):
            assert metric_value(after, "featurewatch_batches_dropped_total", reason=reason) - \
                metric_value(before, "featurewatch_batches_dropped_total", reason=reason) == n, reason
        assert sidecar.proc.poll() is None
    finally:
        client.close()


def test_bad_rules_are_rejected_and_the_last_good_rules_keep_working(sidecar):
    stub = admin(sidecar.tcp_address)
    v_before = stub.GetRules(pb.GetRulesRequest(), metadata=AUTH).version
    bad = RULES.replace("above: 2.0", "above: high")
    reply = stub.PutRules(pb.PutRulesRequest(yaml=bad, author="alice"), metadata=AUTH)
    assert not reply.ok and reply.errors[0].rule == "planted_feature" and reply.errors[0].field == "above"
    # A broken rules file on disk: the reloader counts the error and keeps the rules in force.
    rules_file = sidecar.tmp / "rules.yaml"
    rules_file.write_text(RULES.replace(f"feature: {PLANTED_FEATURE}}}", "feature: 4096}", 1))
    deadline = time.monotonic() + 60
    while metric_value(sidecar.metrics(), "featurewatch_rule_reloads_total", result="error") < 1:
        assert time.monotonic() < deadline, "file reload error not counted"
        time.sleep(0.1)
    assert stub.GetRules(pb.GetRulesRequest(), metadata=AUTH).version == v_before
    assert "out of range" in sidecar.log()
    client = PluginClient(sidecar.socket_address, D)
    try:
        client.plan()
        client.start_request("still-watched-0-00000000")
        client.send(PluginClient.batch(1, [1], rows(1, planted=[0]), ["still-watched-0-00000000"], [0], [0], [True]))
        directive = client.wait_for(lambda m: m.HasField("directive")).directive
        assert directive.request_id == "still-watched-0-00000000"
    finally:
        client.close()
        rules_file.write_text(RULES)
    # A good change through the admin API takes effect and is audited with its author.
    good = RULES.replace("above: 2.0", "above: 3.0")
    reply = stub.PutRules(pb.PutRulesRequest(yaml=good, author="alice"), metadata=AUTH)
    assert reply.ok and reply.version > v_before and reply.rules == 2
    events = [json.loads(e.json) for e in stub.TailAlerts(pb.TailAlertsRequest(last=200), metadata=AUTH)]
    assert any(e["kind"] == "rules" and e.get("author") == "alice" and e.get("action") == "put" for e in events)


def test_admin_requires_the_token_and_kill_switch_reaches_the_plugin(sidecar):
    with pytest.raises(grpc.RpcError) as exc:
        admin(sidecar.tcp_address).GetRules(pb.GetRulesRequest(), metadata=[("authorization", "Bearer wrong")])
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = PluginClient(sidecar.socket_address, D, engine="killswitch")
    stub = admin(sidecar.tcp_address)
    try:
        assert client.plan().steering_enabled
        stub.SetSteering(pb.KillSwitchRequest(steering_enabled=False, author="bob"), metadata=AUTH)
        plan = client.wait_for(lambda m: m.HasField("plan") and not m.plan.steering_enabled).plan
        assert list(plan.policies) == []
        client.start_request("killed-0-00000000")
        client.send(PluginClient.batch(1, [1], rows(1, planted=[0]), ["killed-0-00000000"], [0], [0], [True]))
        # A fence, without timing: the stats are handled on the pipeline thread after the batch ...
        client.send(pb.PluginMessage(stats=pb.PluginStats(enqueue_count=1)))
        deadline = time.monotonic() + 60
        while metric_value(sidecar.metrics(), "featurewatch_plugin_enqueued_batches_total", engine="killswitch") < 1:
            assert time.monotonic() < deadline, "stats not handled"
            time.sleep(0.05)
        # ... and a plan sent now leaves after any directive that batch could have caused
        stub.SetSteering(pb.KillSwitchRequest(steering_enabled=False, author="bob"), metadata=AUTH)
        client.wait_for(lambda _: sum(r.HasField("plan") and not r.plan.steering_enabled for r in client.received) >= 2)
        assert client.directives() == []
        assert metric_value(sidecar.metrics(), "featurewatch_steering_enabled") == 0
    finally:
        admin(sidecar.tcp_address).SetSteering(pb.KillSwitchRequest(steering_enabled=True), metadata=AUTH)
        client.close()


def test_socket_is_private_and_promtool_accepts_the_metrics(sidecar):
    mode = stat.S_IMODE(os.stat(sidecar.config["socket"]).st_mode)
    assert mode == 0o600
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by .ci/run (Debian package prometheus)"
    text = sidecar.metrics()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # the sidecar times its own garbage collections (start-up objects are frozen out of them)
    assert metric_value(text, "featurewatch_gc_pause_seconds_count", generation="0") > 0


def test_plugin_counters_travel_on_the_stream_and_are_exported_as_increases(sidecar):
    client = PluginClient(sidecar.socket_address, D, engine="7")
    try:
        client.plan()
        for dropped, reconnects in ((3, 1), (5, 1)):  # cumulative, as the plugin reports them
            client.send(pb.PluginMessage(stats=pb.PluginStats(batches_dropped_queue_full=dropped, reconnects=reconnects,
                                                              enqueue_seconds_sum=0.5, enqueue_count=10, queue_depth=2)))
        deadline = time.monotonic() + 60
        while metric_value(sidecar.metrics(), "featurewatch_plugin_batches_dropped_total", engine="7") < 5:
            assert time.monotonic() < deadline, "plugin stats not exported"
            time.sleep(0.1)
        text = sidecar.metrics()
        assert metric_value(text, "featurewatch_plugin_batches_dropped_total", engine="7") == 5
        assert metric_value(text, "featurewatch_plugin_reconnects_total", engine="7") == 1
        assert metric_value(text, "featurewatch_plugin_enqueued_batches_total", engine="7") == 10
        assert metric_value(text, "featurewatch_plugin_queue_depth", engine="7") == 2
    finally:
        client.close()
