"""The plugin's choice of path to a real sidecar: the shared-memory ring over a Unix socket when
the sidecar offers one, bytes otherwise or on any failure; a full ring (hung sidecar) drops steps
without waiting; a killed or restarted sidecar's new ring is attached again. Steps go through the
plugin's real ``harvest`` and ``SidecarClient``; the sidecar is the real process."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from monitor.plugin.client import Counters, SidecarClient
from monitor.plugin.config import PluginConfig
from monitor.plugin.harvest import harvest
from monitor.plugin.shm_writer import ShmPath, write_step
from monitor.protocol import pb
from monitor.protocol.shm_ring import RingReader, RingWriter
from tests.faults.support import FaultySidecar, wait_until
from tests.support.sidecar import fixture_config, metric_value

D = 64
TOKENS = 6
SLOTS = 4


@pytest.fixture
def sidecar(tmp_path):
    (tmp_path / "shm").mkdir()
    sc = FaultySidecar(tmp_path, fixture_config(tmp_path, D, shm={"dir": str(tmp_path / "shm"), "slots": SLOTS}))
    sc.start()
    yield sc
    if sc.proc.poll() is None:
        sc.resume()
        sc.stop()


class Worker:
    """The parts of the worker's Runtime that ``harvest`` reads, around a real client."""

    def __init__(self, address: str, shm: bool = True, lane: bool = True, hello_tokens: int = TOKENS) -> None:
        cfg = PluginConfig(address=address, shm=shm, shm_lane=lane, backoff_initial_s=0.05, backoff_max_s=0.2,
                           queue_batches=8, stats_interval_s=0.5)
        self.counters = Counters()
        self.client = SidecarClient(cfg, self.counters, hello=lambda: pb.Hello(
            model_name="test-model", d_model=D, available_layers=[1], dtype=pb.FLOAT32,
            max_tokens_per_step=hello_tokens),
            on_connect=lambda: [], on_message=lambda m: None, on_disconnect=lambda: None,
            stats=lambda: pb.PluginStats())
        tap = torch.zeros(1, TOKENS, D)
        self.rt = SimpleNamespace(client=self.client, counters=self.counters, step=0, d_model=D, requests={},
                                  scope=pb.TOKEN_SCOPE_ALL, plan_slots=[0], _plan_rows=slice(0, 1), plan_layers=[1],
                                  tables=SimpleNamespace(tap=tap, max_tokens=TOKENS, on_device=False))

    def step(self) -> None:
        """One model step: fill the tap buffer, harvest it as the worker does after the forward."""
        rt = self.rt
        rt.step += 1
        rt.tables.tap.copy_(torch.from_numpy(
            np.random.default_rng(rt.step).standard_normal((1, TOKENS, D)).astype(np.float32)))
        labels = SimpleNamespace(num_tokens=TOKENS, tok_req=np.repeat(np.arange(2), TOKENS // 2),
                                 positions=(rt.step - 1) * 3 + np.tile(np.arange(3), 2),
                                 req_ids=[f"req-{rt.step // 50}-a", f"req-{rt.step // 50}-b"], input_ids=None)
        harvest(rt, labels)

    def __enter__(self) -> "Worker":
        self.client.start()
        return self

    def __exit__(self, *exc) -> None:
        self.client.stop()


def processed(sidecar) -> float:
    return sum(metric_value(sidecar.metrics(), "featurewatch_tokens_processed_total", layer="1", scope=s)
               for s in ("prompt", "generated"))


def by_transport(sidecar, transport: str) -> float:
    return metric_value(sidecar.metrics(), "featurewatch_batches_by_transport_total", transport=transport)


def test_a_unix_socket_sidecar_with_a_ring_gets_the_activations_through_it(sidecar):
    with Worker(sidecar.socket_address) as w:
        wait_until(lambda: w.client.connected, "the plugin to connect")
        assert w.client.transport == "shm"
        status = w.client.shm.describe()
        assert status["ring"]["slots"] == SLOTS and status["ring"]["path"].startswith(str(sidecar.tmp / "shm"))
        for _ in range(10):
            w.step()
            wait_until(lambda: w.client.queue_depth == 0 and w.client.shm.writer.free_slots() == SLOTS,
                       "the sidecar to read the step and free its slot")
        wait_until(lambda: processed(sidecar) == 10 * TOKENS, "every token processed")
        assert w.counters.batches_sent_shm == w.counters.batches_sent == 10
        assert w.counters.lane_sent == 10 and w.client.shm.describe()["lane"]["open"]  # on the lane
        assert by_transport(sidecar, "shm") == 10 and by_transport(sidecar, "grpc") == 0
        assert metric_value(sidecar.metrics(), "featurewatch_lane_messages_total", kind="batch") == 10
        assert metric_value(sidecar.metrics(), "featurewatch_plugin_streams", transport="shm") == 1


def test_with_the_lane_off_the_descriptors_go_on_the_stream(sidecar):
    with Worker(sidecar.socket_address, lane=False) as w:
        wait_until(lambda: w.client.connected and w.client.transport == "shm", "the plugin on the ring")
        for _ in range(3):
            w.step()
            wait_until(lambda: w.client.shm.writer.free_slots() == SLOTS, "the step read and its slot freed")
        wait_until(lambda: processed(sidecar) == 3 * TOKENS, "every token processed")
        assert w.counters.batches_sent_shm == 3 and w.counters.lane_sent == 0
        assert w.client.shm.describe()["lane"] is None
        assert by_transport(sidecar, "shm") == 3
        assert metric_value(sidecar.metrics(), "featurewatch_lane_messages_total", kind="batch") == 0


def test_a_step_larger_than_a_slot_is_written_into_several_slots(sidecar):
    """The Hello promises 2-token steps (the sidecar sizes slots for them); 6-token steps come."""
    with Worker(sidecar.socket_address, hello_tokens=2) as w:
        wait_until(lambda: w.client.connected and w.client.transport == "shm", "the plugin on the ring")
        assert w.client.shm.writer.slot_bytes == 2 * D * 4
        for _ in range(4):
            w.step()
            wait_until(lambda: w.client.shm.writer.free_slots() == SLOTS, "the parts read and their slots freed")
        wait_until(lambda: processed(sidecar) == 4 * TOKENS, "every token of every step processed")
        assert w.counters.shm_steps_split == 4 and w.counters.shm_steps_as_bytes == 0
        assert w.counters.batches_sent_shm == w.counters.lane_sent == 4 * 3
        assert by_transport(sidecar, "shm") == 12 and by_transport(sidecar, "grpc") == 0
        assert metric_value(sidecar.metrics(), "featurewatch_batches_dropped_total") == 0


@pytest.mark.parametrize("how", ["tcp", "shm off"])
def test_tcp_or_shm_off_sends_bytes(sidecar, how):
    address = sidecar.tcp_address if how == "tcp" else sidecar.socket_address
    with Worker(address, shm=how != "shm off") as w:
        wait_until(lambda: w.client.connected, "the plugin to connect")
        assert w.client.transport == "grpc"
        for _ in range(3):
            w.step()
        wait_until(lambda: processed(sidecar) == 3 * TOKENS, "every token processed")
        assert by_transport(sidecar, "grpc") == 3 and w.counters.batches_sent_shm == 0
        assert metric_value(sidecar.metrics(), "featurewatch_plugin_streams", transport="grpc") == 1


def test_a_hung_sidecar_fills_the_ring_and_steps_are_dropped_without_waiting(sidecar):
    with Worker(sidecar.socket_address) as w:
        wait_until(lambda: w.client.connected and w.client.transport == "shm", "the plugin on the ring")
        sidecar.pause()  # SIGSTOP: nothing read, no slot freed
        try:
            for _ in range(SLOTS + 1):  # every call returns: the forward never waits
                w.step()
            assert w.counters.shm_ring_full == 1
            assert w.counters.batches_dropped_queue_full == 1
        finally:
            sidecar.resume()
        wait_until(lambda: processed(sidecar) == SLOTS * TOKENS, "the held steps processed after SIGCONT")
        wait_until(lambda: w.client.shm.writer.free_slots() == SLOTS, "every slot freed")
        w.step()
        wait_until(lambda: processed(sidecar) == (SLOTS + 1) * TOKENS, "a new step through the ring")


@pytest.mark.parametrize("fault", ["restart", "kill"])
def test_a_restarted_or_killed_sidecar_is_reattached(sidecar, fault):
    with Worker(sidecar.socket_address) as w:
        wait_until(lambda: w.client.connected and w.client.transport == "shm", "the plugin on the ring")
        first = w.client.shm.writer.geometry.path
        w.step()
        wait_until(lambda: processed(sidecar) == TOKENS, "the first step")
        if fault == "kill":
            sidecar.kill()
        else:
            assert sidecar.terminate() == 0
        wait_until(lambda: not w.client.connected, "the plugin to see the sidecar gone")
        assert w.client.transport == "grpc"
        for _ in range(3):  # the sidecar is away: dropped and counted, never an error
            w.step()
        assert w.counters.batches_dropped_disconnected >= 3
        sidecar.start()
        wait_until(lambda: w.client.connected and w.client.transport == "shm", "the plugin on the new ring")
        assert w.client.shm.writer.geometry.path != first
        w.step()
        wait_until(lambda: processed(sidecar) == TOKENS, "a step through the new sidecar's ring")
        rings = [p.name for p in (sidecar.tmp / "shm").iterdir()]
        assert rings == [w.client.shm.writer.name]  # the dead sidecar's ring was removed at start
        assert w.counters.shm_attaches == 2


def test_a_ring_the_plugin_cannot_attach_leaves_it_on_bytes(tmp_path):
    counters = Counters()
    path = ShmPath(PluginConfig(address=str(tmp_path / "fw.sock")), counters)
    assert path.allowed
    reader = RingReader.create(tmp_path, 2, 1024)
    g = reader.geometry
    for ring in (pb.ShmRing(path=str(tmp_path / "missing.ring"), slots=2, slot_bytes=1024, nonce=g.nonce),
                 pb.ShmRing(path=g.path, slots=2, slot_bytes=1024, nonce=b"\0" * 16)):
        path.on_plan(pb.TapPlan(shm_ring=ring))
        assert path.transport == "grpc" and path.last_error
    assert counters.shm_attach_failures == 2
    path.on_plan(pb.TapPlan(shm_ring=pb.ShmRing(path=g.path, slots=2, slot_bytes=1024, nonce=g.nonce)))
    assert path.transport == "shm" and counters.shm_attaches == 1
    path.on_plan(pb.TapPlan())  # a plan without a ring: back to bytes
    assert path.transport == "grpc"
    reader.close()
    assert not ShmPath(PluginConfig(address="127.0.0.1:50051"), counters).allowed


PLUGIN_PROCESS = """
import sys, time
from tests.plugin.test_shm_client import Worker
from tests.faults.support import wait_until
w = Worker(sys.argv[1])
w.client.start()
wait_until(lambda: w.client.connected and w.client.transport == "shm", "the plugin on the ring")
for _ in range(3):
    w.step()
wait_until(lambda: w.client.queue_depth == 0 and w.client._q.empty(), "the steps sent")
print("sent", w.client.shm.writer.name, flush=True)
time.sleep(600)  # until killed
"""


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_restarted_plugin_gets_a_fresh_ring_and_the_old_one_is_removed(sidecar, how):
    """vLLM restarted: the old stream's ring goes with it, the new process attaches a new one."""
    import subprocess
    import sys
    from pathlib import Path

    rings = sidecar.tmp / "shm"
    if how == "killed":  # SIGKILL: the sidecar sees the transport fail, never a goodbye
        proc = subprocess.Popen([sys.executable, "-c", PLUGIN_PROCESS, sidecar.socket_address],
                                stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
        try:
            line = proc.stdout.readline()
            assert line.startswith("sent "), line
            old = line.split()[1]
            # received before the kill (steps sent on the lane are read once LaneOpen, queued on
            # the stream, has reached the sidecar: a kill before that loses them, as it loses a queue)
            wait_until(lambda: processed(sidecar) == 3 * TOKENS, "the old plugin's steps")
        finally:
            proc.kill()
            proc.wait()
    else:
        with Worker(sidecar.socket_address) as w:
            wait_until(lambda: w.client.connected and w.client.transport == "shm", "the plugin on the ring")
            old = w.client.shm.writer.name
            for _ in range(3):
                w.step()
            wait_until(lambda: processed(sidecar) == 3 * TOKENS, "the steps before the plugin stops")
    wait_until(lambda: processed(sidecar) == 3 * TOKENS, "the old plugin's steps")
    wait_until(lambda: not (rings / old).exists(), "the old stream's ring removed")
    wait_until(lambda: metric_value(sidecar.metrics(), "featurewatch_plugin_streams", transport="shm") == 0,
               "the old stream gone")
    with Worker(sidecar.socket_address) as w:
        wait_until(lambda: w.client.connected and w.client.transport == "shm", "the new plugin on a ring")
        assert w.client.shm.writer.name != old
        w.rt.step = 100  # new requests (the old ones' positions would be deduplicated)
        w.step()
        wait_until(lambda: processed(sidecar) == 4 * TOKENS, "the new plugin's step")
    assert by_transport(sidecar, "shm") == 4


@pytest.mark.parametrize("rows", [slice(1, 3), torch.tensor([2, 0])], ids=["layer-slice", "layer-index"])
@pytest.mark.parametrize("tokens", [None, np.array([0, 3, 4])], ids=["all-tokens", "some-tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_step_gathers_the_planned_rows_and_tokens_into_the_slot(tmp_path, rows, tokens, dtype):
    """The one copy into the slot holds exactly the planned layers' (selected) tokens, in order,
    and the sidecar's side reads the same bytes back."""
    reader = RingReader.create(tmp_path, 2, 3 * TOKENS * D * 4)
    g = reader.geometry
    writer = RingWriter.attach(g.path, g.n_slots, g.slot_bytes, g.nonce)
    tap = torch.from_numpy(np.random.default_rng(7).standard_normal((3, TOKENS + 2, D)).astype(np.float32)).to(dtype)
    want = tap[rows, :5] if isinstance(rows, slice) else tap[:, :5][rows]
    if tokens is not None:
        want = want[:, torch.from_numpy(tokens)]
    ref = write_step(writer, tap, rows, 5, tokens, step=9)
    assert ref is not None and ref.rows.dtype == dtype and tuple(ref.rows.shape) == tuple(want.shape)
    assert torch.equal(ref.rows, want)
    view = reader.take(ref.slot, ref.sequence, 9, ref.nbytes)
    assert torch.equal(torch.from_numpy(view).view(dtype).view(want.shape), want)
    reader.close()
