"""The permanent fault suite, sidecar side: the real sidecar process is killed (SIGKILL), hung
(SIGSTOP, then SIGCONT) and restarted (SIGTERM, start again) under greedy traffic to the real vLLM
OpenAI server with the plugin. Every request must succeed with exactly the tokens of the model
with no plugin (HF transformers, greedy), and telemetry must flow again afterwards. Each fault runs
on both paths the activations can take: the sidecar's shared-memory ring (where the hang also
fills the ring) and bytes on the gRPC stream (``FEATUREWATCH_SHM=0``).

Deterministic by construction: a fixed list of requests per fault, in three parts: *before*
(in flight when the fault lands), *during* (submitted once the fault is in force, all served
while it lasts) and *after* (once the plugin is connected again). The fault lands when the
sidecar has received ``N_RECEIVED`` batches of the *before* part: events, never the clock.
"""

from __future__ import annotations

import pytest

from tests.faults.support import (
    ALERT_RULES,
    WAIT_S,
    FaultySidecar,
    Traffic,
    VllmServer,
    reference,
    wait_until,
    workload,
)
from tests.plugin.tiny_model import build_tiny_llama
from tests.support.sidecar import fixture_config

pytestmark = pytest.mark.vllm

N_RECEIVED = 8
PARTS = (6, 6, 4)  # before, during, after
FAULTS = ("kill", "hang", "restart")


class Stack:
    def __init__(self, root, transport: str) -> None:
        self.root, self.transport = root, transport
        self.model = str(build_tiny_llama(root / "model"))
        (root / "sidecar").mkdir()
        rules = root / "rules.yaml"
        rules.write_text(ALERT_RULES)
        (root / "shm").mkdir()
        config = fixture_config(root / "sidecar", d_model=64, rules_file=str(rules),
                                shm={"dir": str(root / "shm")})
        self.sidecar = FaultySidecar(root / "sidecar", config)
        self.server: VllmServer | None = None
        self.requests = {f: workload(sum(PARTS), seed=i) for i, f in enumerate(FAULTS)}
        self.reference: dict[str, list[int]] = {}

    def start(self) -> None:
        self.sidecar.start()
        self.server = VllmServer(self.model, self.root / "vllm", self.sidecar.socket_address,
                                 self.sidecar.config["model_name"],
                                 {"FEATUREWATCH_SHM": "1" if self.transport == "shm" else "0"})
        # computed while vLLM starts
        self.reference = reference(self.model, [r for rs in self.requests.values() for r in rs])
        self.server.wait_ready()
        self.healthy()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.sidecar.proc is not None and self.sidecar.proc.poll() is None:
            self.sidecar.resume()
            self.sidecar.stop()

    def parts(self, fault: str):
        rs = self.requests[fault]
        a, b = PARTS[0], PARTS[0] + PARTS[1]
        return rs[:a], rs[a:b], rs[b:]

    def healthy(self) -> None:
        """The sidecar serves, the plugin is connected to it (start of every test)."""
        if self.sidecar.proc is None or self.sidecar.proc.poll() is not None:
            self.sidecar.start()
        wait_until(self.sidecar.healthy, "the sidecar to serve")
        wait_until(self.server.connected, "the plugin to connect")
        assert self.server.worker()["transport"] == self.transport


@pytest.fixture(scope="module", params=["shm", "grpc"])
def stack(tmp_path_factory, request):
    s = Stack(tmp_path_factory.mktemp(f"faults_{request.param}"), request.param)
    try:
        s.start()
        yield s
    finally:
        s.close()


def _land_fault_after_received(stack: Stack, traffic: Traffic, before) -> float:
    """Submit the *before* part; return once the sidecar has received N_RECEIVED of its batches
    (the count it had then)."""
    b0 = stack.sidecar.batches()
    traffic.submit(before)
    wait_until(lambda: stack.sidecar.batches() >= b0 + N_RECEIVED,
               f"the sidecar to receive {N_RECEIVED} batches")
    return stack.sidecar.batches()


def _check(stack: Stack, traffic: Traffic, fault: str, counters_before: dict) -> dict:
    outputs, failures = traffic.results()
    traffic.close()
    assert failures == {}, failures
    want = {r.name: stack.reference[r.name] for r in stack.requests[fault]}
    changed = sorted(n for n in want if outputs[n] != want[n])
    assert not changed, f"{len(changed)} of {len(want)} outputs differ from no plugin: {changed}"
    # telemetry flows again: the (new or resumed) sidecar receives batches of the *after* part
    wait_until(lambda: stack.sidecar.batches() > 0, "batches to reach the sidecar again")
    # the plugin saw every request finish (the engine core flushes finished ids with one step)
    done = counters_before["requests_finished"] + len(want)
    return wait_until(lambda: (c := stack.server.counters())["requests_finished"] >= done and c,
                      "the plugin to see every request finish")


def test_sidecar_killed_under_traffic(stack):
    stack.healthy()
    before, during, after = stack.parts("kill")
    c0 = stack.server.counters()
    traffic = Traffic(stack.server.base)
    _land_fault_after_received(stack, traffic, before)
    stack.sidecar.kill()
    wait_until(lambda: not stack.server.connected(), "the plugin to see the sidecar gone")
    for f in traffic.submit(during):  # all served with the sidecar dead
        f.result(timeout=WAIT_S)
    stack.sidecar.start()
    wait_until(stack.server.connected, "the plugin to reconnect")
    traffic.submit(after)
    c1 = _check(stack, traffic, "kill", c0)
    assert c1["reconnects"] > c0["reconnects"]
    if stack.transport == "shm":  # the new process's ring, attached again, and its lane opened
        assert c1["shm_attaches"] > c0["shm_attaches"] and stack.server.worker()["transport"] == "shm"
        _lane_carried_the_after_part(stack, c0)


def test_sidecar_hung_under_traffic(stack):
    stack.healthy()
    before, during, after = stack.parts("hang")
    c0 = stack.server.counters()
    traffic = Traffic(stack.server.base)
    received = _land_fault_after_received(stack, traffic, before)
    stack.sidecar.pause()  # SIGSTOP: the socket stays open, nothing is read or answered
    try:
        served = [f.result(timeout=WAIT_S) for f in traffic.submit(during)]
    finally:
        stack.sidecar.resume()  # bounded: as soon as the part is served (or the wait failed)
    assert len(served) == len(during)
    wait_until(stack.sidecar.healthy, "the sidecar to serve after SIGCONT")
    wait_until(stack.server.connected, "the plugin to be connected after SIGCONT")
    traffic.submit(after)
    c1 = _check(stack, traffic, "hang", c0)
    wait_until(lambda: stack.sidecar.batches() > received, "batches after the hang")
    if stack.transport == "shm":  # MAX_TOKENS decode steps while stopped > the ring's 16 slots
        assert c1["shm_ring_full"] > c0["shm_ring_full"]
        assert stack.server.worker()["transport"] == "shm"
        _lane_carried_the_after_part(stack, c0)


def _lane_carried_the_after_part(stack: Stack, c0: dict) -> None:
    """The descriptors and requests went on the ring's lane (the forward thread's socket), and the
    lane in use now is open."""
    worker = stack.server.worker()
    assert worker["counters"]["lane_sent"] > c0["lane_sent"]
    assert worker["shm"]["lane"] is not None and worker["shm"]["lane"]["open"]


def test_sidecar_restarted_under_traffic(stack):
    stack.healthy()
    before, during, after = stack.parts("restart")
    c0 = stack.server.counters()
    traffic = Traffic(stack.server.base)
    _land_fault_after_received(stack, traffic, before)
    assert stack.sidecar.terminate() == 0  # SIGTERM: drains and exits cleanly
    stack.sidecar.start()
    traffic.submit(during)  # while the plugin finds the new process
    wait_until(stack.server.connected, "the plugin to reconnect to the new sidecar")
    traffic.submit(after)
    c1 = _check(stack, traffic, "restart", c0)
    assert c1["reconnects"] > c0["reconnects"]
    if stack.transport == "shm":  # the new process's ring, attached again, and its lane opened
        assert c1["shm_attaches"] > c0["shm_attaches"] and stack.server.worker()["transport"] == "shm"
        _lane_carried_the_after_part(stack, c0)
