"""Steering can never write a non-finite value into the residual stream: the plugin's own parse
refuses non-finite and out-of-bound numbers (naming the field and value), the op keeps the
original row where steering would make it non-finite and counts it, and the runtime drops the
actions that did it."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from monitor.plugin import ops
from monitor.plugin.actions import ActionLimits, parse_action
from monitor.plugin.client import Counters
from monitor.plugin.config import PluginConfig
from monitor.plugin.hooks import LayerHook, attach_buffers
from monitor.plugin.runtime import Runtime
from monitor.plugin.steering import PRIVATE_KEY, SteeringState
from monitor.plugin.step_hooks import StepLabels
from monitor.plugin.table import SteeringTable
from monitor.protocol import pb
from tests.plugin.fake_sidecar import add_action, clamp_action
from tests.plugin.helpers import RefAdd, RefClamp, apply_actions

D = 16
NAN, INF = float("nan"), float("inf")


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(D).astype(np.float32)
    return v / np.linalg.norm(v)


def _with(vec: np.ndarray, i: int, x: float) -> np.ndarray:
    v = vec.copy()
    v[i] = x
    return v


E, F, G = _unit(1), _unit(2), _unit(3)


def _gated(**kw) -> pb.SteeringAction:
    return clamp_action(0, E, F, gate_encoder=G, **kw)


def _bf16_with_nan() -> pb.SteeringAction:
    bits = (E.view(np.uint32) >> 16).astype("<u2")
    bits[5] = 0x7FC0  # bf16 NaN
    t = pb.Tensor(dtype=pb.BFLOAT16, shape=[D], data=bits.tobytes())
    return pb.SteeringAction(layer=0, add=pb.AddDirection(direction=t, scale=1.0))


REFUSED = [
    (clamp_action(0, E, F, value=NAN), "clamp.value=nan is not finite"),
    (clamp_action(0, E, F, value=INF), "clamp.value=inf is not finite"),
    (clamp_action(0, E, F, value=1e7), "clamp.value=1e+07 is out of bounds"),
    (clamp_action(0, E, F, value=2e5), "|clamp.value| * |clamp.decoder|=2e+05 exceeds"),
    (clamp_action(0, E, F, bias=NAN), "clamp.bias=nan is not finite"),
    (clamp_action(0, E, F, threshold=-INF), "clamp.threshold=-inf is not finite"),
    (_gated(gate_bias=NAN), "clamp.gate_bias=nan is not finite"),
    (clamp_action(0, _with(E, 3, INF), F), "clamp.encoder[3]=inf is not finite"),
    (clamp_action(0, E, _with(F, 0, NAN)), "clamp.decoder[0]=nan is not finite"),
    (clamp_action(0, E, _with(F, 2, 1e30)), "clamp.decoder[2]=1e+30 is out of bounds"),
    (clamp_action(0, E, F, gate_encoder=_with(G, 7, NAN)), "clamp.gate_encoder[7]=nan"),
    (add_action(0, E, NAN), "add.scale=nan is not finite"),
    (add_action(0, E, INF), "add.scale=inf is not finite"),
    (add_action(0, E, 1e39), "add.scale=inf is not finite"),  # a float32 field: 1e39 is inf
    (add_action(0, E, 5e5), "|add.scale * add.direction|=5e+05 exceeds the steering cap"),
    (add_action(0, _with(E, 1, -INF), 1.0), "add.direction[1]=-inf is not finite"),
    (_bf16_with_nan(), "add.direction[5]=nan is not finite"),
]


@pytest.mark.parametrize("action,message", REFUSED, ids=[m for _, m in REFUSED])
def test_parse_refuses_nonfinite_and_out_of_bound_values(action, message):
    with pytest.raises(ValueError) as e:
        parse_action(action, D)
    assert message in str(e.value) and len(str(e.value)) < 160


def test_parse_accepts_values_within_bounds():
    a = parse_action(add_action(0, E, 9.9e3), D)
    assert np.isfinite(a.vector).all() and abs(np.linalg.norm(a.vector) - 9.9e3) < 1
    c = parse_action(_gated(value=-5e3, bias=-1e6, threshold=1e6, gate_bias=3.0), D)
    assert c.value == -5e3 and c.threshold == 1e6


def test_the_cap_follows_the_setting_and_the_model_dtype():
    assert ActionLimits.for_dtype(torch.float32).max_norm == 1e5
    assert ActionLimits.for_dtype(torch.bfloat16, 5e5).max_norm == 5e5
    assert ActionLimits.for_dtype(torch.float16, 5e5).max_norm == pytest.approx(65504 / 16)
    assert ActionLimits.for_dtype(torch.float32, NAN).max_norm == 1e5
    assert ActionLimits.for_dtype(torch.float32, 1e35).max_norm == 1e30  # the op relies on it
    strict = ActionLimits.for_dtype(torch.float32, 10.0)
    with pytest.raises(ValueError, match="exceeds the steering cap 10"):
        parse_action(add_action(0, E, 11.0), D, strict)


# ---------------------------------------------------------------- the op


def _tables(rows=6, max_tokens=16):
    return ops.SteerTables(num_layers=1, d_model=D, rows=rows, clamps=3, max_tokens=max_tokens,
                           device=torch.device("cpu"), dtype=torch.float32, do_tap=True)


GOOD = [RefAdd(0, _unit(4), 1.5), RefClamp(0, _unit(5), _unit(6), bias=0.1, value=2.0)]


def _poisoned_table():
    """Row ``good`` runs GOOD; rows ``nan_add`` and ``inf_clamp`` hold values parse_action
    refuses, written straight into the tables (as a bug past the parse would)."""
    t = _tables()
    table = SteeringTable(t, [0])
    good = table.acquire(tuple(parse_action(r.pb(), D) for r in GOOD))
    nan_add = table.acquire((parse_action(add_action(0, _unit(7), 1.0), D),))
    t.add[0, nan_add, 3] = NAN
    inf_clamp = table.acquire((parse_action(clamp_action(0, _unit(8), _unit(9), value=1.0), D),))
    slot = int(t.active[0, inf_clamp].nonzero()[0])
    t.val[0, slot] = INF
    t.thr[0, slot] = -1e30  # fires on every token
    return t, good, nan_add, inf_clamp


def test_op_keeps_rows_that_steering_makes_nonfinite_and_counts_them():
    t, good, nan_add, inf_clamp = _poisoned_table()
    torch.manual_seed(0)
    idx = torch.tensor([0, good, nan_add, inf_clamp, good, nan_add, nan_add, 0])
    n = len(idx)
    hidden, residual = torch.randn(n, D), torch.randn(n, D)
    residual[6, 0] = INF  # the model's own non-finite row: kept, and not the steering's fault
    t.steer_idx[:n] = idx
    ops.set_step_live(True)
    try:
        out = torch.ops.featurewatch.tap_steer(hidden, residual, *t.layer_args(0), True)
    finally:
        ops.set_step_live(False)
    bad = torch.tensor([i in (2, 3, 5, 6) for i in range(n)])
    assert torch.equal(out[bad], residual[bad])  # the same bits as unsteered
    assert torch.isfinite(out[~bad]).all()
    steered = idx == good
    want = apply_actions(hidden + residual, GOOD)
    torch.testing.assert_close(hidden[steered] + out[steered], want[steered], atol=1e-5, rtol=0)
    assert torch.equal(out[0], residual[0]) and torch.equal(out[7], residual[7])
    counts = t.nonfinite[0].tolist()
    assert counts[nan_add] == 2 and counts[inf_clamp] == 1 and sum(counts) == 3
    assert torch.equal(t.tap[0, :n], hidden + out)


def test_op_refuses_a_clamp_whose_removal_term_exceeds_the_cap():
    """Every number of this clamp passes the parse; what it adds depends on x, so the cap on
    |delta| is checked in the op: the rows keep their bits and are counted."""
    t = _tables()
    runaway = parse_action(clamp_action(0, _unit(13), _unit(14), bias=1e5, value=0.0), D)
    small = parse_action(clamp_action(0, _unit(13), _unit(14), bias=9e3, value=0.0), D)
    table = SteeringTable(t, [0])
    r_big, r_ok = table.acquire((runaway,)), table.acquire((small,))
    torch.manual_seed(4)
    hidden, residual = torch.randn(4, D), torch.randn(4, D)
    t.steer_idx[:4] = torch.tensor([r_big, r_ok, r_big, 0])
    ops.set_step_live(True)
    try:
        out = torch.ops.featurewatch.tap_steer(hidden, residual, *t.layer_args(0), True, 1e4)
    finally:
        ops.set_step_live(False)
    assert torch.equal(out[[0, 2, 3]], residual[[0, 2, 3]])
    assert 8e3 < float((out[1] - residual[1]).norm()) < 1e4  # under the cap: applied
    assert t.nonfinite[0].tolist()[r_big] == 2 and int(t.nonfinite.sum()) == 2


def test_fp16_rows_that_would_overflow_keep_their_bits():
    """In fp16 a finite, in-cap addition can still overflow the cast back to the model dtype."""
    t = ops.SteerTables(num_layers=1, d_model=D, rows=4, clamps=2, max_tokens=8,
                        device=torch.device("cpu"), dtype=torch.float16, do_tap=True)
    lim = ActionLimits.for_dtype(torch.float16)
    e0 = np.eye(D, dtype=np.float32)[0]
    row = SteeringTable(t, [0]).acquire((parse_action(add_action(0, e0, 4000.0), D, lim),))
    residual = torch.zeros(3, D, dtype=torch.float16)
    residual[1, 0] = 64000.0  # + 4000 > 65504
    t.steer_idx[:3] = row
    ops.set_step_live(True)
    try:
        out = torch.ops.featurewatch.tap_steer(None, residual, *t.layer_args(0), True,
                                               lim.max_norm)
    finally:
        ops.set_step_live(False)
    assert torch.isfinite(out).all() and torch.equal(out[1], residual[1])
    assert not torch.equal(out[0], residual[0])  # the others are steered
    assert int(t.nonfinite[0, row]) == 1


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x, residual):
        return self.lin(x), x + residual


def test_guard_holds_under_torch_compile():
    t, good, nan_add, _ = _poisoned_table()
    layer = _Layer()
    attach_buffers(layer, t, 0)
    layer.register_forward_hook(LayerHook(0, 0, t))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    torch.manual_seed(2)
    x, r = torch.randn(4, D), torch.randn(4, D)
    t.steer_idx[:4] = torch.tensor([nan_add, good, nan_add, 0])
    ops.set_step_live(True)
    try:
        with torch.no_grad():
            h, res = compiled(x, r)
    finally:
        ops.set_step_live(False)
    plain = x + r
    assert torch.equal(res[[0, 2, 3]], plain[[0, 2, 3]]) and torch.isfinite(res).all()
    assert int(t.nonfinite[0, nan_add]) == 2


# ---------------------------------------------------------------- the runtime


def _runtime():
    t = ops.SteerTables(num_layers=2, d_model=D, rows=8, clamps=2, max_tokens=32,
                        device=torch.device("cpu"), dtype=torch.float32, do_tap=True)
    vc = types.SimpleNamespace(parallel_config=types.SimpleNamespace(
        distributed_executor_backend="uni"))
    return Runtime(PluginConfig(address="unix:///nowhere"), vllm_config=vc, model_name="m",
                   d_model=D, num_layers=2, hooked=[0, 1], tables=t, tp_rank=0, tp_size=1,
                   pp_rank=0, engine="0")


def _plan(*policies) -> pb.TapPlan:
    return pb.TapPlan(layers=[0, 1], steering_enabled=True, policies=list(policies))


def _new_request(rid: str, n: int, **metadata):
    sp = types.SimpleNamespace(extra_args=dict(metadata))
    return types.SimpleNamespace(req_id=rid, sampling_params=sp, prompt_token_ids=list(range(n)),
                                 prompt_embeds=None, num_computed_tokens=0)


def _step(rt, new_reqs, req_ids, counts, hidden, residual):
    rt.pre_step(types.SimpleNamespace(scheduled_new_reqs=new_reqs, finished_req_ids=()))
    qsl = np.concatenate([[0], np.cumsum(counts)])
    rt.before_forward(StepLabels(req_ids, qsl, np.zeros(len(req_ids), dtype=np.int64),
                                 int(qsl[-1])))
    outs = [torch.ops.featurewatch.tap_steer(hidden, residual, *rt.tables.layer_args(s), True)
            for s in range(2)]
    rt.after_forward()
    return outs


def test_plan_with_a_nonfinite_policy_refuses_it_and_leaves_it_out_of_the_view():
    rt = _runtime()
    bad = pb.SteeringPolicy(name="bad", selector={"t": "b"},
                            actions=[clamp_action(0, E, F, value=NAN)])
    good = pb.SteeringPolicy(name="good", selector={"t": "g"}, actions=[GOOD[0].pb()])
    rt._on_message(pb.SidecarMessage(plan=_plan(bad, good)))
    assert [p[0] for p in rt.view.policies] == ["good"]  # no request is decided for "bad"
    rt.pre_step(types.SimpleNamespace(scheduled_new_reqs=(), finished_req_ids=()))
    st = rt.status()
    assert st["counters"]["policies_rejected"] == 1
    assert st["steering"]["policies"] == ["good"]
    assert any("clamp.value=nan" in r for r in st["steering"]["recent_rejections"])
    d = pb.SteeringDirective(directive_id="d1", request_id="r", actions=[add_action(0, E, INF)])
    assert "add.scale=inf" in rt.steering.apply_directive(d, {"r": 1})


def test_runtime_drops_the_actions_whose_rows_went_nonfinite():
    rt = _runtime()
    pol_good = pb.SteeringPolicy(name="good", selector={"t": "g"}, actions=[GOOD[0].pb()])
    pol_bad = pb.SteeringPolicy(name="bad", selector={"t": "b"},
                                actions=[add_action(1, _unit(11), 2.0)])
    rt._on_message(pb.SidecarMessage(plan=_plan(pol_good, pol_bad)))
    rt.pre_step(types.SimpleNamespace(scheduled_new_reqs=(), finished_req_ids=()))
    # corrupt the parsed policy (a bug past the parse): its row is written at request start
    rt.steering.policies["bad"].actions[0].vector[:] = NAN
    torch.manual_seed(3)
    hidden, residual = torch.randn(7, D), torch.randn(7, D)
    reqs = [_new_request("rg", 3, t="g"), _new_request("rb", 2, t="b"),
            _new_request("rp", 2, t="none")]
    for r in reqs:  # what the engine core decided from the view
        names, _ = rt.view.decide({"t": r.sampling_params.extra_args["t"]})
        hashes = {n: h for n, _, h in rt.view.policies if n in names}
        r.sampling_params.extra_args[PRIVATE_KEY] = {"policies": names, "hashes": hashes}
    out0, out1 = _step(rt, reqs, ["rg", "rb", "rp"], [3, 2, 2], hidden, residual)
    # layer 1 (the bad policy's layer): rb's rows kept, the others untouched there
    assert torch.equal(out1, residual) and torch.isfinite(out0).all()
    want = apply_actions(hidden[:3] + residual[:3], GOOD[:1])
    torch.testing.assert_close(hidden[:3] + out0[:3], want, atol=1e-5, rtol=0)
    c = rt.counters
    assert c.steering_nonfinite_rows == 2 and c.steering_nonfinite_dropped == 0
    rejected = c.directives_rejected
    # the next step applies the drop: rb is unsteered, "bad" is gone from plan and view
    out0, out1 = _step(rt, (), ["rg", "rb", "rp"], [3, 2, 2], hidden, residual)
    assert c.steering_nonfinite_dropped == 2 and c.directives_rejected == rejected + 2
    assert sorted(rt.steering.requests) == ["rg"] and sorted(rt.steering.policies) == ["good"]
    assert [p[0] for p in rt.view.policies] == ["good"]
    assert torch.equal(out1, residual) and c.steering_nonfinite_rows == 2
    assert int(rt.tables.nonfinite.sum()) == 0
    assert rt.steering.table.rows_in_use == 1


def test_drop_releases_rows_even_when_the_rest_of_the_program_does_not_fit():
    c = Counters()
    st = SteeringState(SteeringTable(_tables(rows=3), [0]), D, c)
    st.apply_plan(_plan(pb.SteeringPolicy(name="p", selector={}, actions=[GOOD[0].pb()])))
    st.start_request("r", None, None, {})
    d = pb.SteeringDirective(request_id="r", rule="x", from_position=5,
                             actions=[add_action(0, _unit(12), 1.0)])
    assert st.apply_directive(d, {"r": 1}) is None
    assert st.table.rows_in_use == 2  # [policy] from 0, [policy, directive] from 5: table full
    dropped, names = st.drop_nonfinite({st.policies["p"].actions[0].key})
    assert names == ["p"] and dropped == 1
    # the directive alone needs a third row: no room, so the request is left unsteered
    assert not st.requests and st.table.rows_in_use == 0 and c.directives_rejected == 1
