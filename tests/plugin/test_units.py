"""Plugin pieces without an engine: the tap/steer op against an independent reference, the
steering table, per-request state, policy decisions, ids, config, the sidecar client's queue and
reconnects."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from monitor.plugin import ops
from monitor.plugin.client import BatchItem, Counters, SidecarClient
from monitor.plugin.config import PluginConfig, grpc_target
from monitor.plugin.hooks import LayerHook, attach_buffers
from monitor.plugin.actions import parse_action
from monitor.plugin.steering import (
    PolicyView,
    SteeringState,
    api_request_id,
    flat_metadata,
    view_from_plan,
)
from monitor.plugin.table import SteeringTable, TableFull
from monitor.protocol import pb
from tests.plugin.fake_sidecar import FakeSidecar, add_action, clamp_action
from tests.plugin.helpers import RefAdd, RefClamp, apply_actions

D = 16


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(D).astype(np.float32)
    return v / np.linalg.norm(v)


def _tables(rows=4, clamps=3, layers=2, max_tokens=32, dtype=torch.float32):
    return ops.SteerTables(num_layers=layers, d_model=D, rows=rows, clamps=clamps,
                           max_tokens=max_tokens, device=torch.device("cpu"), dtype=dtype,
                           do_tap=True)


CLAMP = RefClamp(0, _vec(1), _vec(2), bias=0.1, threshold=0.05, value=2.0)
GATED = RefClamp(0, _vec(3), _vec(4), bias=0.0, threshold=0.0, value=-1.0,
                 gate_encoder=_vec(5), gate_bias=0.1)
ADD = RefAdd(0, _vec(6), 1.5)
OTHER_LAYER = RefAdd(7, _vec(7), 3.0)


def _actions(refs):
    return tuple(parse_action(r.pb(), D) for r in refs)


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("live", [True, False])
def test_tap_steer_matches_reference_and_row0_is_bit_identical(live):
    t = _tables()
    table = SteeringTable(t, [0, 7])
    row = table.acquire(_actions([CLAMP, GATED, ADD, OTHER_LAYER]))
    assert row != 0
    torch.manual_seed(0)
    n = 10
    hidden, residual = torch.randn(n, D), torch.randn(n, D)
    idx = torch.tensor([row if i % 2 else 0 for i in range(n)])
    t.steer_idx[:n] = idx
    ops.set_step_live(True)
    out = torch.ops.featurewatch.tap_steer(hidden, residual, *t.layer_args(0), True)
    x = hidden + residual
    want = apply_actions(x, [CLAMP, GATED, ADD])
    steered = idx != 0
    torch.testing.assert_close(hidden[steered] + out[steered], want[steered], atol=1e-5, rtol=0)
    assert torch.equal(out[~steered], residual[~steered])  # row 0: the same bits
    assert torch.equal(t.tap[0, :n], hidden + out)
    # layer 7 has only the add; its row entry leaves clamps alone
    out7 = torch.ops.featurewatch.tap_steer(hidden, residual, *t.layer_args(1), True)
    torch.testing.assert_close(out7[steered], residual[steered] + 3.0 * torch.from_numpy(_vec(7)))
    if not live:  # no steered token: the fast path copies, the values are the same bits
        t.steer_idx.zero_()
        ops.set_step_live(False)
        fast = torch.ops.featurewatch.tap_steer(hidden, residual, *t.layer_args(0), True)
        assert torch.equal(fast, residual) and fast.data_ptr() != residual.data_ptr()
    ops.set_step_live(False)


def test_bf16_steering_and_more_tokens_than_buffers():
    t = _tables(max_tokens=4, dtype=torch.bfloat16)
    row = SteeringTable(t, [0, 7]).acquire(_actions([ADD]))
    hidden = torch.randn(6, D, dtype=torch.bfloat16)
    residual = torch.randn(6, D, dtype=torch.bfloat16)
    t.steer_idx[:4] = row
    ops.set_step_live(True)
    out = torch.ops.featurewatch.tap_steer(hidden, residual, *t.layer_args(0), True)
    ops.set_step_live(False)
    assert out.dtype == torch.bfloat16 and out.shape == residual.shape
    assert torch.equal(out[4:], residual[4:])  # beyond the static buffers: unsteered
    want = (residual[:4].float() + 1.5 * torch.from_numpy(_vec(6))).to(torch.bfloat16)
    assert torch.equal(out[:4], want)


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x, residual):
        return self.lin(x), x + residual


def test_hook_eager_and_under_torch_compile():
    torch.manual_seed(1)
    t = _tables()
    table = SteeringTable(t, [0, 7])
    row = table.acquire(_actions([CLAMP, ADD]))
    layer = _Layer()
    attach_buffers(layer, t, 0)
    layer.register_forward_hook(LayerHook(0, 0, t))
    x, r = torch.randn(5, D), torch.randn(5, D)
    with torch.no_grad():
        plain_h, plain_r = layer.lin(x), x + r
        # eager, nothing steered: output untouched, tap written
        t.tap.zero_()
        h, res = layer(x, r)
        assert torch.equal(res, plain_r) and torch.equal(t.tap[0, :5], plain_h + plain_r)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
        for live in (False, True):
            t.steer_idx[:5] = row if live else 0
            ops.set_step_live(live)
            t.tap.zero_()
            h, res = compiled(x, r)
            want = apply_actions(plain_h + plain_r, [CLAMP, ADD]) if live else plain_h + plain_r
            torch.testing.assert_close(h + res, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(t.tap[0, :5], want, atol=1e-5, rtol=0)
    ops.set_step_live(False)


# ---------------------------------------------------------------- table and state


def test_table_dedupes_rows_and_clamp_slots_and_reports_full():
    t = _tables(rows=3, clamps=2)
    table = SteeringTable(t, [0])
    a = table.acquire(_actions([CLAMP]))
    assert table.acquire(_actions([CLAMP])) == a  # same program, same row
    b = table.acquire(_actions([CLAMP, ADD]))  # shares CLAMP's slot
    assert b != a and len(table.clamps[0]) == 1
    with pytest.raises(TableFull):  # rows: 0 is the no-op, 1 and 2 are taken
        table.acquire(_actions([GATED]))
    assert table.acquire(_actions([OTHER_LAYER])) == 0  # nothing on a hooked layer: row 0
    for _ in range(2):
        table.release(_actions([CLAMP]))
    table.release(_actions([CLAMP, ADD]))
    assert table.rows_in_use == 0 and not table.clamps[0]
    assert not t.row_on.any() and not t.active.any()


def _state(rows=8):
    c = Counters()
    return SteeringState(SteeringTable(_tables(rows=rows), [0, 7]), D, c), c


def _plan(failure_mode="open", enabled=True):
    return pb.TapPlan(layers=[0], steering_enabled=enabled, steering_failure_mode=failure_mode,
                      policies=[pb.SteeringPolicy(name="p", selector={"tenant": "acme"},
                                                  actions=[ADD.pb()])])


def _rows(st, rid, positions):
    qsl = np.array([0, len(positions)])
    return st.rows_for_step({rid: 0}, qsl, np.array(positions), len(positions))


def test_policies_directives_segments_and_cancel():
    st, c = _state()
    st.apply_plan(_plan())
    assert st.start_request("r1", None, None, {"tenant": "acme"}) == ["p"]
    assert st.start_request("r2", None, None, {"tenant": "other"}) == []
    policy_row = _rows(st, "r1", [0, 1, 2])[0]
    assert policy_row != 0 and _rows(st, "r2", [0, 1]) is None
    d = pb.SteeringDirective(directive_id="d1", request_id="r1", rule="x", from_position=5,
                             actions=[CLAMP.pb()])
    assert st.apply_directive(d, {"r1": 1}) is None
    rows = _rows(st, "r1", [3, 4, 5, 6])
    assert rows[0] == rows[1] == policy_row and rows[2] == rows[3] != policy_row
    assert st.apply_directive(pb.SteeringDirective(request_id="r1", rule="x", cancel=True),
                              {"r1": 1}) is None
    assert list(_rows(st, "r1", [5, 6])) == [policy_row, policy_row]
    assert st.apply_directive(pb.SteeringDirective(request_id="zz", actions=[ADD.pb()]), {}) \
        == "unknown request"
    bad = pb.SteeringDirective(request_id="r1", actions=[add_action(0, np.ones(3), 1.0)])
    assert "expected 16" in st.apply_directive(bad, {"r1": 1})
    st.finish_request("r1")
    assert st.table.rows_in_use == 0


def test_kill_switch_and_failure_modes():
    st, _ = _state()
    st.apply_plan(_plan(enabled=False))
    assert st.start_request("r", None, None, {"tenant": "acme"}) == []  # policies off
    st.apply_plan(_plan())
    st.start_request("r", None, None, {"tenant": "acme"})
    st.local_override = False
    assert _rows(st, "r", [0]) is None
    st.local_override = None
    assert _rows(st, "r", [0]) is not None
    st.apply_plan(_plan(failure_mode="closed"))
    st.on_disconnect()
    assert _rows(st, "r", [0]) is not None  # closed: keep the last state
    st.apply_plan(_plan(failure_mode="open"))
    st.on_disconnect()
    assert _rows(st, "r", [0]) is None and st.table.rows_in_use == 0 and not st.policies


def test_upstream_decision_with_stale_hash_is_not_applied():
    st, c = _state()
    st.apply_plan(_plan())
    h = st.policies["p"].hash
    assert st.start_request("a", ["p"], {"p": h}, {}) == ["p"]
    assert st.start_request("b", ["p"], {"p": "stale"}, {}) == []
    assert c.policy_mismatch == 1


def test_policy_view_decides_and_round_trips():
    view = view_from_plan(_plan())
    names, salt = view.decide({"tenant": "acme", "x": "1"})
    assert names == ["p"] and len(salt) == 16
    assert view.decide({"tenant": "no"}) == ([], "")
    assert PolicyView.from_json(view.to_json()) == view
    assert view_from_plan(_plan(enabled=False)).decide({"tenant": "acme"}) == ([], "")
    # a different policy content gives a different salt
    other = _plan()
    other.policies[0].actions[0].add.scale = 2.0
    assert view_from_plan(other).decide({"tenant": "acme"})[1] != salt


def test_ids_metadata_and_config():
    assert api_request_id("chatcmpl-abc-1a2b3c4d") == "chatcmpl-abc"
    assert api_request_id("cmpl-abc-0-1a2b3c4d") == "cmpl-abc"
    assert api_request_id("x", "cmpl-req-7-0") == "cmpl-req-7"
    assert api_request_id("7-deadbeef") == "7" and api_request_id("plain") == "plain"
    assert flat_metadata({"a": "s", "n": 3, "f": 1.5, "b": True, "l": [1, "x"],
                          "_featurewatch": {}, "kv_transfer_params": {}}) == \
        {"a": "s", "n": "3", "f": "1.5", "b": "true", "l": '[1, "x"]'}
    cfg = PluginConfig(address="x")
    assert cfg.resolve_layers(8, 1) == list(range(8))
    assert PluginConfig(address="x", tap_budget_bytes=3).resolve_layers(9, 1) == [0, 4, 8]
    assert PluginConfig(address="x", tap_budget_bytes=1).resolve_layers(9, 1) == [4]
    assert PluginConfig(address="x", layers="1,3-5").resolve_layers(8, 1) == [1, 3, 4, 5]
    assert PluginConfig(address="x", layers="every:3").resolve_layers(8, 1) == [0, 3, 6]
    with pytest.raises(ValueError):
        PluginConfig(address="x", layers="9").resolve_layers(8, 1)
    assert grpc_target("/tmp/s.sock") == "unix:///tmp/s.sock"
    assert grpc_target("localhost:5") == "localhost:5"


def test_clamp_action_parsing():
    a = parse_action(clamp_action(2, np.ones(D), np.ones(D), value=1.0), D)
    assert a.layer == 2 and a.gate_encoder is None
    with pytest.raises(ValueError):
        parse_action(pb.SteeringAction(layer=1), D)
    nan = np.ones(D)
    nan[0] = np.nan
    with pytest.raises(ValueError):
        parse_action(add_action(0, nan, 1.0), D)


# ---------------------------------------------------------------- the client


def _item(n=4, layers=(0, 1)):
    host = torch.randn(len(layers), n, D)
    return BatchItem(step=1, layers=list(layers), host=host, event=None,
                     request_ids=["a", "b"], token_request_index=np.arange(n) * 2 // n,
                     positions=np.arange(n), is_generated=np.zeros(n, bool),
                     captured_unix_s=time.time())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_encoded_batch_equals_protobuf(dtype):
    item = _item(n=300)  # a varint length above 127 bytes everywhere
    item.host = item.host.to(dtype)
    (raw,) = list(item.messages(max_bytes=0))
    got = pb.PluginMessage.FromString(raw).batch
    host = item.host.view(torch.int16) if dtype == torch.bfloat16 else item.host
    want = pb.ActivationBatch(
        step=1, layers=[0, 1], request_ids=["a", "b"],
        token_request_index=item.token_request_index.tolist(),
        positions=list(range(300)), is_generated=[False] * 300,
        captured_unix_s=item.captured_unix_s,
        activations=pb.Tensor(dtype=pb.BFLOAT16 if dtype == torch.bfloat16 else pb.FLOAT32,
                              shape=[2, 300, D], data=host.numpy().tobytes()))
    assert got == want


def test_batch_is_split_under_max_batch_bytes():
    item = _item()
    msgs = [pb.PluginMessage.FromString(m) for m in item.messages(max_bytes=2 * D * 4 * 2)]
    assert len(msgs) == 2
    assert [list(m.batch.request_ids) for m in msgs] == [["a"], ["b"]]
    assert all(list(m.batch.token_request_index) == [0, 0] for m in msgs)
    assert list(msgs[1].batch.positions) == [2, 3]


def _client(address, **cfg):
    counters = Counters()
    base = dict(address=address, backoff_initial_s=0.05, backoff_max_s=0.2,
                stats_interval_s=0.2)
    base.update(cfg)
    c = SidecarClient(PluginConfig(**base), counters,
                      hello=lambda: pb.Hello(model_name="m", d_model=D),
                      on_connect=lambda: [], on_message=lambda m: None,
                      on_disconnect=lambda: None,
                      stats=lambda: pb.PluginStats(reconnects=counters.reconnects))
    return c, counters


class _Gate:
    """Stands in for a BatchItem's CUDA event: the sender thread blocks in ``synchronize()`` until
    the test opens the gate, so the client is stuck exactly as behind a slow device copy."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def synchronize(self) -> None:
        self.entered.set()
        assert self.open.wait(120), "gate never opened"


def test_client_drops_when_full_never_blocks_and_reconnects(tmp_path):
    address = f"unix://{tmp_path}/s.sock"
    sidecar = FakeSidecar(address).start()
    client, counters = _client(address, queue_batches=2)
    client.start()
    gate = _Gate()
    try:
        assert sidecar.wait_for(lambda: client.connected)
        stuck = _item()
        stuck.event = gate
        assert client.offer(stuck)
        assert gate.entered.wait(120)  # the sender holds the first item: the queue cannot drain
        accepted = [client.offer(_item()) for _ in range(49)]
        # the held item still counts against queue_batches=2: exactly one more fits
        assert accepted == [True] + [False] * 48
        assert counters.batches_enqueued == 2 and counters.batches_dropped_queue_full == 48
        assert client.queue_depth == 2
        gate.open.set()
        assert sidecar.wait_for(lambda: len(sidecar.batches) == 2)
        assert sidecar.wait_for(lambda: client.queue_depth == 0)
        assert counters.batches_sent == 2
        sidecar.stop()
        assert sidecar.wait_for(lambda: not client.connected)
        assert not client.offer(_item()) and counters.batches_dropped_disconnected >= 1
        sidecar.start()
        assert sidecar.wait_for(lambda: client.connected)
        assert len(sidecar.hellos) == 2 and counters.reconnects >= 1
        assert client.offer(_item())
        assert sidecar.wait_for(lambda: len(sidecar.batches) == 3)
        assert sidecar.wait_for(lambda: any(s.reconnects >= 1 for s in sidecar.stats))
    finally:
        gate.open.set()
        client.stop()
        sidecar.stop()


def test_client_backs_off_while_the_sidecar_is_down(tmp_path):
    """Every failed attempt waits a full-jitter delay of an exponentially growing, capped backoff.
    The waits are recorded instead of slept, so nothing here depends on the clock."""
    client, counters = _client(f"unix://{tmp_path}/none.sock", backoff_initial_s=0.05,
                               backoff_max_s=0.2)
    waits: list[float] = []
    done = threading.Event()

    def record(delay: float) -> None:
        waits.append(delay)
        if len(waits) == 5:
            client._stop.set()
            done.set()

    client._wait = record
    client.start()
    assert done.wait(120)
    client.stop()
    caps = [0.05, 0.1, 0.2, 0.2, 0.2]
    assert all(0.5 * cap <= w <= cap for w, cap in zip(waits, caps, strict=True)), waits
    assert not client.connected and counters.reconnects == 4 and client.last_error
    assert counters.batches_dropped_disconnected == 0


def test_unset_address_means_loaded_idle():
    code = (
        "import os; os.environ.pop('FEATUREWATCH_ADDRESS', None)\n"
        "import monitor.plugin as p; p.register()\n"
        "from vllm.model_executor.model_loader.base_loader import BaseModelLoader\n"
        "from vllm.v1.worker.worker_base import WorkerBase\n"
        "assert not getattr(BaseModelLoader.load_model, '__featurewatch_wrapped__', False)\n"
        "import sys; assert 'vllm.v1.worker.gpu_model_runner' not in sys.modules\n"
        "st = WorkerBase.featurewatch_status(None)\n"
        "assert st['enabled'] is False and 'loaded-idle' in st['reason'], st\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "FEATUREWATCH_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ---------------------------------------------------------------- runner adapters


class _RecordingRuntime:
    def __init__(self):
        self.calls = []
        self.runner_kind = "?"

    def pre_step(self, so):
        self.calls.append(("pre_step", so))

    def before_forward(self, labels):
        self.calls.append(("before", labels))

    def after_forward(self):
        self.calls.append(("after",))

    def abort_forward(self):
        self.calls.append(("abort",))


def test_v2_runner_adapter_labels_and_dummy_runs():
    """The V2 runner is GPU-only in vLLM 0.32 (it needs Triton); check the adapter against a
    stand-in with the same method signatures and InputBatch fields."""
    import types

    from monitor.plugin import patches, state

    class Runner:
        def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False,
                          **kwargs):
            if not dummy_run:
                self.prepare_inputs(scheduler_output, None, None, 0)
            return "out"

        def prepare_inputs(self, scheduler_output, batch_req_state, batch_desc,
                           num_active_loras):
            return types.SimpleNamespace(
                num_reqs=2, req_ids=["a", "b"], num_tokens=4,
                query_start_loc_np=np.array([0, 3, 4, 4], dtype=np.int32),
                num_computed_tokens_np=np.array([5, 9], dtype=np.int32))

    patches._wrap(Runner, "execute_model", patches._wrap_v2_execute)
    patches._wrap(Runner, "prepare_inputs", patches._wrap_v2_prepare)
    rt = _RecordingRuntime()
    old = state.set_runtime(rt)
    try:
        so = object()
        assert Runner().execute_model(so, None) == "out"
        assert [c[0] for c in rt.calls] == ["pre_step", "before", "after"]
        assert rt.runner_kind == "v2"
        labels = rt.calls[1][1]
        assert labels.req_ids == ["a", "b"] and labels.num_tokens == 4
        assert labels.positions.tolist() == [5, 6, 7, 9] and labels.tok_req.tolist() == [0, 0, 0, 1]
        rt.calls.clear()
        Runner().execute_model(so, None, True)  # dummy runs (capture, warm-up) are not steps
        Runner().execute_model(so, dummy_run=True)
        assert rt.calls == []
    finally:
        state.set_runtime(old)


@pytest.mark.parametrize("layers", [[1, 3], [1, 2], [3, 0]])
def test_harvest_copies_the_planned_layers_and_this_steps_tokens(layers):
    import types

    from monitor.plugin.runtime import Runtime
    from monitor.plugin.step_hooks import StepLabels

    t = ops.SteerTables(num_layers=4, d_model=8, rows=4, clamps=2, max_tokens=16,
                        device=torch.device("cpu"), dtype=torch.float32, do_tap=True)
    t.tap.copy_(torch.arange(t.tap.numel(), dtype=torch.float32).view(t.tap.shape))
    vc = types.SimpleNamespace(parallel_config=types.SimpleNamespace(
        distributed_executor_backend="uni"))
    rt = Runtime(PluginConfig(address="unix:///nowhere"), vllm_config=vc, model_name="m",
                 d_model=8, num_layers=4, hooked=[0, 1, 2, 3], tables=t, tp_rank=0, tp_size=1,
                 pp_rank=0, engine="0")
    rt.client.connected = True  # never started: items stay in its queue
    rt._apply_ops([("plan", pb.TapPlan(layers=layers).SerializeToString())])
    rt.before_forward(StepLabels(["r"], np.array([0, 3]), np.array([5]), 3))
    rt.after_forward()
    item = rt.client._q.get_nowait()
    assert item.layers == layers and item.positions.tolist() == [5, 6, 7]
    assert torch.equal(item.host, t.tap[layers][:, :3])
