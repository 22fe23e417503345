"""The real sidecar receiving activations over a shared-memory ring: the same batches give the same
features, alerts and directives as over gRPC bytes; a descriptor naming a torn, overwritten,
foreign or out-of-range slot is rejected and counted, and the stream goes on."""

from __future__ import annotations

import json
import os
import stat
import time

import grpc
import numpy as np
import pytest

from monitor.protocol import pb, pb_grpc
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction, planted_rules
from tests.support.plugin_client import PluginClient
from tests.support.shm_sender import ShmSender
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, fixture_config, metric_value

D = 64
RULES = planted_rules("    window: {kind: count, n: 2}\n")
AUTH = [("authorization", f"Bearer {ADMIN_TOKEN}")]
RIDS = ["cmpl-a-0-1a2b3c4d", "cmpl-b-0-99999999", "cmpl-c-0-00000001"]
STEPS = 12
TOKENS = 9  # 3 per request per step


def start_sidecar(tmp, **overrides) -> SidecarProcess:
    (tmp / "rules.yaml").write_text(RULES)
    (tmp / "shm").mkdir()
    config = fixture_config(tmp, D, rules_file=str(tmp / "rules.yaml"), shm={"dir": str(tmp / "shm"), "slots": 4},
                            **overrides)
    return SidecarProcess(tmp, config)  # started by `with`


def step_batch(step: int):
    """Step ``step`` of the workload: 3 requests x 3 tokens, planted generated tokens in request a
    (steps 3, 7) and request c (step 9), all other rows noise."""
    rng = np.random.default_rng(step)
    x = rng.standard_normal((1, TOKENS, D)).astype(np.float32) * 0.05
    planted = {3: [2], 7: [0], 9: [8]}.get(step, [])
    for row in planted:
        x[0, row] += 10.0 * planted_direction(D)
    token_request = np.repeat(np.arange(3), 3)
    positions = (step - 1) * 3 + np.tile(np.arange(3), 3)
    generated = positions >= 6
    return x, token_request, positions, generated


def tail_alerts(sidecar) -> list[pb.AlertEvent]:
    stub = pb_grpc.AdminStub(grpc.insecure_channel(sidecar.tcp_address))
    return list(stub.TailAlerts(pb.TailAlertsRequest(last=200), metadata=AUTH, timeout=10))


def wait(pred, what: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def run_workload(sidecar, shm: bool, lane: bool = False) -> dict:
    """Send the workload over one path (``lane``: the ring, with the requests and descriptors on
    its lane, as the plugin does); what the sidecar made of it."""
    client = PluginClient(sidecar.socket_address, D, shm_capable=shm)
    try:
        plan = client.plan()
        assert plan.HasField("shm_ring") == shm
        sender = ShmSender(plan.shm_ring, lane=lane) if shm else None
        send = client.send if sender is None or sender.lane is None else sender.send_on_lane
        if lane:
            client.send(sender.lane_open())
        for rid in RIDS:
            send(PluginClient.start_message(rid, rid.rsplit("-", 1)[0]))
        for step in range(1, STEPS + 1):
            x, token_request, positions, generated = step_batch(step)
            if sender is None:
                msg = PluginClient.batch(step, [1], x, RIDS, token_request, positions, generated)
            else:  # the ring has 4 slots: wait for the sidecar to free one (the real plugin drops instead)
                msg = wait(lambda: sender.batch(step, [1], x, RIDS, token_request, positions, generated),
                           "a free slot")
            send(msg)
        want = STEPS * TOKENS
        wait(lambda: sum(metric_value(sidecar.metrics(), "featurewatch_tokens_processed_total", layer="1", scope=s)
                         for s in ("prompt", "generated")) >= want, "every token processed")
        wait(lambda: sum(e.kind == "alert" for e in tail_alerts(sidecar)) >= 3, "the alerts")
        directives = sorted((d.request_id, d.rule, d.from_position, d.actions[0].clamp.feature)
                            for d in wait(client.directives, "the directives"))
        alerts = sorted((e.rule, e.request_id, json.loads(e.json)["position"], round(json.loads(e.json)["value"], 4))
                        for e in tail_alerts(sidecar) if e.kind == "alert")
        text = sidecar.metrics()
        out = {
            "directives": directives, "alerts": alerts,
            "tokens": {s: metric_value(text, "featurewatch_tokens_processed_total", layer="1", scope=s)
                       for s in ("prompt", "generated")},
            "feature_active": metric_value(text, "featurewatch_feature_active_tokens_total", feature=str(PLANTED_FEATURE)),
            "probe_scores": metric_value(text, "featurewatch_probe_score_count", probe="planted"),
            "probe_sum": round(metric_value(text, "featurewatch_probe_score_sum", probe="planted"), 4),
            "dropped": metric_value(text, "featurewatch_batches_dropped_total"),
        }
        transport = "shm" if shm else "grpc"
        assert metric_value(text, "featurewatch_batches_by_transport_total", transport=transport) == STEPS
        assert metric_value(text, "featurewatch_plugin_streams", transport=transport) == 1
        return out
    finally:
        client.close()


def test_shm_gives_the_same_features_alerts_and_directives_as_bytes(tmp_path):
    results = {}
    for shm in (False, True):
        root = tmp_path / ("shm" if shm else "bytes")
        root.mkdir()
        with start_sidecar(root) as sc:
            results[shm] = run_workload(sc, shm)
            if shm:  # the stream is gone: its ring file too
                wait(lambda: metric_value(sc.metrics(), "featurewatch_plugin_streams", transport="shm") == 0,
                     "the stream to end")
                assert not any(p.name.endswith(".ring") for p in (root / "shm").iterdir())
    assert results[False]["dropped"] == 0
    assert len(results[False]["directives"]) >= 2 and len(results[False]["alerts"]) >= 3
    assert results[True] == results[False]


def test_bad_descriptors_are_rejected_and_counted_and_the_stream_goes_on(tmp_path):
    with start_sidecar(tmp_path) as sc:
        client = PluginClient(sc.socket_address, D, shm_capable=True)
        try:
            plan = client.plan()
            ring = plan.shm_ring
            assert stat.S_IMODE(os.stat(ring.path).st_mode) == 0o600
            sender = ShmSender(ring)
            x, tr, pos, gen = step_batch(1)
            good = pb.PluginMessage.FromString(sender.batch(1, [1], x, RIDS, tr, pos, gen))

            def variant(**slot) -> pb.PluginMessage:
                m = pb.PluginMessage()
                m.CopyFrom(good)
                for k, v in slot.items():
                    setattr(m.batch.shm_slot, k, v)
                return m

            slot, seq = good.batch.shm_slot.slot, good.batch.shm_slot.sequence
            x3, tr3, pos3, gen3 = step_batch(3)
            bad_shape = pb.PluginMessage.FromString(sender.batch(3, [1], x3, RIDS, tr3, pos3, gen3))
            bad_shape.batch.activations.shape[:] = [1, TOKENS + 1, D]  # more rows than its slot holds
            torn = sender.writer.acquire(x.nbytes)  # written, never published: a torn slot
            torn_msg = variant(slot=torn[0], sequence=torn[1])
            sent = [variant(slot=99), variant(segment="featurewatch-ring-1-deadbeef.ring"), variant(nbytes=1 << 30),
                    variant(sequence=seq + 7), bad_shape, torn_msg, good, variant()]  # good twice: the 2nd is spent
            for m in sent:
                client.send(m)
            x2, tr2, pos2, gen2 = step_batch(2)
            client.send(wait(lambda: sender.batch(2, [1], x2, RIDS, tr2, pos2, gen2), "a free slot"))
            wait(lambda: metric_value(sc.metrics(), "featurewatch_tokens_processed_total", layer="1") >= 2 * TOKENS,
                 "the good batches processed")
            text = sc.metrics()
            dropped = {r: metric_value(text, "featurewatch_batches_dropped_total", reason=r)
                       for r in ("malformed", "shm_overwritten", "shm_torn")}
            # slot 99, foreign segment, 1 GiB, shape: malformed; sequence+7: overwritten;
            # the unpublished slot and the spent descriptor: torn
            assert dropped == {"malformed": 4, "shm_overwritten": 1, "shm_torn": 2}
            rejected = [m.ack for m in client.received if m.HasField("ack") and m.ack.rejected_reason]
            assert len(rejected) == 7
            assert sc.healthy() and metric_value(text, "featurewatch_plugin_streams", transport="shm") == 1
            assert slot != torn[0]
        finally:
            client.close()


def test_tcp_plugins_and_old_plugins_get_no_ring(tmp_path):
    with start_sidecar(tmp_path) as sc:
        for address, capable in ((sc.tcp_address, True), (sc.socket_address, False)):
            client = PluginClient(address, D, shm_capable=capable)
            try:
                assert not client.plan().HasField("shm_ring")
            finally:
                client.close()
        assert not any((tmp_path / "shm").iterdir())


def test_unusable_shm_dir_leaves_the_stream_on_bytes(tmp_path):
    with start_sidecar(tmp_path) as sc:
        pass
    config = dict(sc.config, shm={"dir": str(tmp_path / "missing")})
    root = tmp_path / "second"
    root.mkdir()
    with SidecarProcess(root, config) as sc2:
        client = PluginClient(sc2.socket_address, D, shm_capable=True)
        try:
            assert not client.plan().HasField("shm_ring")
            x, tr, pos, gen = step_batch(1)
            client.send(PluginClient.batch(1, [1], x, RIDS, tr, pos, gen))
            wait(lambda: metric_value(sc2.metrics(), "featurewatch_batches_by_transport_total", transport="grpc") == 1,
                 "the bytes batch")
            assert metric_value(sc2.metrics(), "featurewatch_shm_ring_errors_total") == 1
        finally:
            client.close()
