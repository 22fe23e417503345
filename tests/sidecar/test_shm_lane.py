"""The real sidecar reading a stream's lane (monitor/receive/lane.py): requests and descriptors sent
on it give the same features, alerts and directives as bytes on the stream, in the order sent;
bad packets and bad LaneOpens are counted and the stream goes on; the lane's file is private and
gone once the plugin connected."""

from __future__ import annotations

import os
import stat

import pytest

from monitor.plugin.lane import LaneSender
from monitor.protocol import pb
from tests.sidecar.test_shm_ingest import D, RIDS, STEPS, TOKENS, run_workload, start_sidecar, step_batch, wait
from tests.support.plugin_client import PluginClient
from tests.support.shm_sender import ShmSender
from tests.support.sidecar import metric_value


def processed(sc) -> float:
    return metric_value(sc.metrics(), "featurewatch_tokens_processed_total", layer="1")


def test_the_lane_gives_the_same_features_alerts_and_directives_as_bytes(tmp_path):
    results = {}
    for lane in (False, True):
        root = tmp_path / ("lane" if lane else "bytes")
        root.mkdir()
        with start_sidecar(root) as sc:
            results[lane] = run_workload(sc, shm=lane, lane=lane)
            if lane:
                text = sc.metrics()
                assert metric_value(text, "featurewatch_lane_messages_total", kind="batch") == STEPS
                assert metric_value(text, "featurewatch_lane_messages_total", kind="request_start") == len(RIDS)
                wait(lambda: metric_value(sc.metrics(), "featurewatch_plugin_streams", transport="shm") == 0,
                     "the stream to end")
                assert list((root / "shm").iterdir()) == []  # ring and lane both removed
    assert results[False]["dropped"] == 0
    assert len(results[False]["directives"]) >= 2 and len(results[False]["alerts"]) >= 3
    assert results[True] == results[False]


def test_requests_finish_after_their_last_batch_on_the_lane(tmp_path):
    """Starts, batches and finishes sent back to back on the lane are handled in that order: when a
    new request's batch comes after them, the sidecar tracks that request alone (a batch handled
    after its request's finish would have tracked the finished request again)."""
    with start_sidecar(tmp_path) as sc:
        client = PluginClient(sc.socket_address, D, shm_capable=True)
        try:
            plan = client.plan()
            lane_path = plan.shm_ring.lane
            assert lane_path and stat.S_IMODE(os.lstat(lane_path).st_mode) == 0o600
            sender = ShmSender(plan.shm_ring, lane=True)
            client.send(sender.lane_open())
            for rid in RIDS:
                sender.send_on_lane(PluginClient.start_message(rid))
            for step in range(1, 4):  # 3 steps: they fit the 4 slots, nothing waits
                x, tr, pos, gen = step_batch(step)
                sender.send_on_lane(sender.batch(step, [1], x, RIDS, tr, pos, gen))
            for rid in RIDS:
                sender.send_on_lane(pb.PluginMessage(request_finish=pb.RequestFinish(request_id=rid)))
            new = "cmpl-d-0-0000000d"
            sender.send_on_lane(PluginClient.start_message(new))
            x, _, _, gen = step_batch(4)
            sender.send_on_lane(sender.batch(4, [1], x, [new], [0] * TOKENS, list(range(TOKENS)), gen))
            wait(lambda: processed(sc) == 4 * TOKENS, "the batches processed")
            text = sc.metrics()
            assert metric_value(text, "featurewatch_lane_messages_total", kind="request_finish") == 3
            assert metric_value(text, "featurewatch_requests_tracked") == 1
            assert metric_value(text, "featurewatch_batches_dropped_total") == 0
            assert not os.path.exists(lane_path)  # unlinked once the plugin's connection was accepted
        finally:
            client.close()


def test_bad_packets_on_the_lane_are_counted_and_the_lane_goes_on(tmp_path):
    with start_sidecar(tmp_path) as sc:
        client = PluginClient(sc.socket_address, D, shm_capable=True)
        try:
            sender = ShmSender(client.plan().shm_ring, lane=True)
            client.send(sender.lane_open())
            sender.send_on_lane(b"\xff\xff\xff not protobuf")
            sender.send_on_lane(pb.PluginMessage(hello=pb.Hello(model_name="x", d_model=D)))  # not a lane message
            sender.send_on_lane(sender.lane_open())  # nor is this
            x, tr, pos, gen = step_batch(1)
            sender.send_on_lane(sender.batch(1, [1], x, RIDS, tr, pos, gen))
            wait(lambda: processed(sc) == TOKENS, "the good batch after the bad packets")
            text = sc.metrics()
            assert metric_value(text, "featurewatch_batches_dropped_total", reason="malformed") == 3
            assert metric_value(text, "featurewatch_lane_messages_total", kind="hello") == 1
            assert sc.healthy() and metric_value(text, "featurewatch_plugin_streams", transport="shm") == 1
        finally:
            client.close()


@pytest.mark.parametrize("how", ["another path", "no connection"])
def test_a_lane_open_that_names_no_waiting_lane_is_counted_and_the_stream_goes_on(tmp_path, how):
    with start_sidecar(tmp_path) as sc:
        client = PluginClient(sc.socket_address, D, shm_capable=True)
        try:
            ring = client.plan().shm_ring
            sender = ShmSender(ring)  # the ring only: nobody connects to the lane
            path = str(tmp_path / "elsewhere.lane") if how == "another path" else ring.lane
            client.send(pb.PluginMessage(lane_open=pb.LaneOpen(lane=path)))
            reason = "not_announced" if how == "another path" else "accept"
            wait(lambda: metric_value(sc.metrics(), "featurewatch_lane_errors_total", reason=reason) == 1,
                 "the bad LaneOpen counted")
            x, tr, pos, gen = step_batch(1)  # descriptors on the stream still work
            client.send(sender.batch(1, [1], x, RIDS, tr, pos, gen))
            wait(lambda: processed(sc) == TOKENS, "the batch sent on the stream")
            if how == "no connection":  # the lane is closed: nobody can connect to it later
                with pytest.raises(OSError):
                    LaneSender.connect(ring.lane)
        finally:
            client.close()
