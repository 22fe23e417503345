"""In-band proof of steering: the plugin counts the tokens its forward actually steered, per
always-on policy and per rule of a directive, after the guard (rows it refused are not counted),
and sends the counts in PluginStats. The engine-level checks are in test_e2e_eager.py."""

from __future__ import annotations

import numpy as np
import torch

from monitor.plugin import guard as guard_mod
from monitor.plugin.guard import SteeredTokens
from monitor.protocol import pb
from tests.plugin.fake_sidecar import add_action
from tests.plugin.test_guards import GOOD, PRIVATE_KEY, _new_request, _plan, _runtime, _step, _unit

D = 16


def _decide(rt, reqs) -> None:
    """What the engine core decides from the worker's policy view at request creation."""
    for r in reqs:
        meta = {k: v for k, v in r.sampling_params.extra_args.items() if k != PRIVATE_KEY}
        names, _ = rt.view.decide(meta)
        hashes = {n: h for n, _, h in rt.view.policies if n in names}
        r.sampling_params.extra_args[PRIVATE_KEY] = {"policies": names, "hashes": hashes}


def _counts(rt) -> tuple[dict, dict]:
    stats = rt._stats()
    return dict(stats.policy_tokens_steered), dict(stats.rule_tokens_steered)


def test_policy_and_directive_tokens_are_counted_per_name():
    rt = _runtime()
    pol = pb.SteeringPolicy(name="pol", selector={"t": "p"}, actions=[GOOD[0].pb()])
    same = pb.SteeringPolicy(name="twin", selector={"t": "p"}, actions=[GOOD[0].pb()])
    rt._on_message(pb.SidecarMessage(plan=_plan(pol, same)))
    rt.pre_step(type("S", (), {"scheduled_new_reqs": (), "finished_req_ids": ()})())
    reqs = [_new_request("a", 4, t="p"), _new_request("b", 3, t="none"), _new_request("c", 2)]
    _decide(rt, reqs)
    torch.manual_seed(0)
    hidden, residual = torch.randn(9, D), torch.randn(9, D)
    _step(rt, reqs, ["a", "b", "c"], [4, 3, 2], hidden, residual)
    assert _counts(rt) == ({"pol": 4, "twin": 4}, {})  # both policies steer a's 4 tokens
    # a directive for b from position 4 (b's prompt is 0..2, this step computes 3..5)
    d = pb.SteeringDirective(directive_id="d1", request_id="b", rule="r1", from_position=4,
                             actions=[add_action(1, _unit(21), 1.0)])
    rt._on_message(pb.SidecarMessage(directive=d))
    rt.pre_step(type("S", (), {"scheduled_new_reqs": (), "finished_req_ids": ()})())
    from monitor.plugin.step_hooks import StepLabels

    labels = StepLabels(["a", "b", "c"], np.array([0, 1, 4, 5]), np.array([4, 3, 2]), 5)
    rt.before_forward(labels)
    for s in range(2):
        torch.ops.featurewatch.tap_steer(hidden[:5], residual[:5], *rt.tables.layer_args(s), True)
    rt.after_forward()
    pol, rules = _counts(rt)
    assert pol == {"pol": 5, "twin": 5} and rules == {"r1": 2}  # b's positions 4 and 5
    assert rt.status()["steering"]["tokens_steered"] == {"policies": pol, "rules": rules}


def test_rows_the_guard_refused_are_not_counted():
    rt = _runtime()
    good = pb.SteeringPolicy(name="good", selector={"t": "g"}, actions=[GOOD[0].pb()])
    bad = pb.SteeringPolicy(name="bad", selector={"t": "b"}, actions=[add_action(1, _unit(11), 2.0)])
    rt._on_message(pb.SidecarMessage(plan=_plan(good, bad)))
    rt.pre_step(type("S", (), {"scheduled_new_reqs": (), "finished_req_ids": ()})())
    rt.steering.policies["bad"].actions[0].vector[:] = float("nan")  # a bug past the parse
    reqs = [_new_request("rg", 3, t="g"), _new_request("rb", 2, t="b")]
    _decide(rt, reqs)
    torch.manual_seed(1)
    hidden, residual = torch.randn(5, D), torch.randn(5, D)
    _step(rt, reqs, ["rg", "rb"], [3, 2], hidden, residual)
    assert rt.counters.steering_nonfinite_rows == 2
    assert _counts(rt) == ({"good": 3}, {})  # "bad" steered nothing


def test_an_aborted_forward_counts_nothing():
    rt = _runtime()
    rt._on_message(pb.SidecarMessage(plan=_plan(
        pb.SteeringPolicy(name="pol", selector={}, actions=[GOOD[0].pb()]))))
    reqs = [_new_request("a", 3)]
    rt.pre_step(type("S", (), {"scheduled_new_reqs": (), "finished_req_ids": ()})())
    _decide(rt, reqs)
    rt.pre_step(type("S", (), {"scheduled_new_reqs": reqs, "finished_req_ids": ()})())
    from monitor.plugin.step_hooks import StepLabels

    rt.before_forward(StepLabels(["a"], np.array([0, 3]), np.array([0]), 3))
    rt.abort_forward()
    assert _counts(rt) == ({}, {})
    hidden, residual = torch.randn(3, D), torch.randn(3, D)
    _step(rt, (), ["a"], [3], hidden, residual)  # positions 0..2 again, now computed
    assert _counts(rt) == ({"pol": 3}, {})


def test_names_are_bounded(monkeypatch):
    monkeypatch.setattr(guard_mod, "MAX_NAMES", 2)
    t = SteeredTokens()
    t.add({"policy:a": 1, "policy:b": 2, "policy:c": 3, "directive:r": 4})
    t.add({"policy:d": 5, "policy:a": 1})
    assert t.snapshot() == {"policies": {"a": 2, "b": 2, "other": 8}, "rules": {"r": 4}}


def test_a_row_shared_by_different_sources_is_counted_per_request():
    """Identical programs share a row; when different policies run it, one count per row would not
    say whose tokens they were, so those steps are counted request by request."""
    rt = _runtime()
    a = pb.SteeringPolicy(name="a", selector={"t": "a"}, actions=[GOOD[0].pb()])
    b = pb.SteeringPolicy(name="b", selector={"t": "b"}, actions=[GOOD[0].pb()])
    rt._on_message(pb.SidecarMessage(plan=_plan(a, b)))
    rt.pre_step(type("S", (), {"scheduled_new_reqs": (), "finished_req_ids": ()})())
    reqs = [_new_request("ra", 3, t="a"), _new_request("rb", 2, t="b"), _new_request("rb2", 1, t="b")]
    _decide(rt, reqs)
    hidden, residual = torch.randn(6, D), torch.randn(6, D)
    _step(rt, reqs, ["ra", "rb", "rb2"], [3, 2, 1], hidden, residual)
    st = rt.steering
    assert len({int(r) for rs in st.requests.values() for r in rs.rows}) == 1  # one row for all three
    assert _counts(rt) == ({"a": 3, "b": 3}, {})
    rt.pre_step(type("S", (), {"scheduled_new_reqs": (), "finished_req_ids": ("ra",)})())
    assert st._ambiguous == 0  # only b's requests run the row now: back to one count per row
    _step(rt, (), ["rb", "rb2"], [1, 1], hidden[:2], residual[:2])
    assert _counts(rt) == ({"a": 3, "b": 5}, {})
    rt.pre_step(type("S", (), {"scheduled_new_reqs": (), "finished_req_ids": ("rb", "rb2")})())
    assert st._row_sources == {} and st._ambiguous == 0
