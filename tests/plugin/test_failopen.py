"""Fail open by construction (issue 11): simulated vLLM upgrades, by monkeypatching vLLM.

1. the runner method the plugin wraps moved → idle with a reason, nothing patched;
2. a parameter of ``load_model`` renamed → idle with a reason, vLLM's ``load_model`` untouched;
3. a request field the plugin reads renamed → the wrapper falls back, the request is served.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from monitor.plugin import compat, failopen, ops, patches, state
from monitor.plugin.config import PluginConfig
from monitor.plugin.hooks import LayerHook, attach_buffers


@pytest.fixture(autouse=True)
def _clean_counts():
    failopen.reset()
    yield
    failopen.reset()


# ---------------------------------------------------------------- preflight (in process)


def test_preflight_accepts_the_pinned_vllm():
    assert compat.preflight() is None


def test_preflight_refuses_a_version_outside_the_range(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    reason = compat.preflight()
    assert reason is not None and "supported range >=0.28.0,<0.33.0" in reason


def test_preflight_names_a_moved_runner_method(monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    fn = GPUModelRunner.__dict__["_model_forward"]
    monkeypatch.delattr(GPUModelRunner, "_model_forward")
    monkeypatch.setattr(LoRAModelRunnerMixin, "_model_forward", fn, raising=False)
    reason = compat.preflight()
    assert reason is not None and "GPUModelRunner._model_forward missing" in reason


def test_preflight_names_a_renamed_load_model_parameter_of_any_loader(monkeypatch):
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    def load_model(self, vllm_config, model_cfg, prefix=""):
        raise AssertionError("not called")

    monkeypatch.setattr(DummyModelLoader, "load_model", load_model, raising=False)
    reason = compat.preflight()
    assert reason is not None
    assert "DummyModelLoader.load_model: parameters (vllm_config, model_cfg, prefix)" in reason


def test_preflight_names_a_renamed_request_field(monkeypatch):
    import vllm.v1.core.sched.output as out

    @dataclasses.dataclass
    class NewRequestData:
        req_id: str
        prompt_ids: list  # was prompt_token_ids
        sampling_params: object
        prompt_embeds: object
        num_computed_tokens: int

    monkeypatch.setattr(out, "NewRequestData", NewRequestData)
    reason = compat.preflight()
    assert reason == "NewRequestData has no field prompt_token_ids"


# ---------------------------------------------------------------- register() (own process)

_REGISTER = r"""
import json, logging, os, sys
import vllm  # logging first: vLLM 0.28's dictConfig clears handlers of existing vllm.* loggers
records = []
class H(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("vllm.featurewatch").addHandler(H(level=logging.WARNING))
case = sys.argv[1]
if case == "moved":
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin
    LoRAModelRunnerMixin._model_forward = GPUModelRunner.__dict__["_model_forward"]
    del GPUModelRunner._model_forward  # moved to a base class: vLLM still finds it
else:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    def load_model(self, vllm_config, model_cfg, prefix=""):
        return "vllm's own"
    BaseModelLoader.load_model = load_model
import monitor.plugin as p
p.register()
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.request import Request
from vllm.v1.worker.worker_base import WorkerBase
wrapped = [f"{c.__name__}.{n}" for c, n in [
    (BaseModelLoader, "load_model"), (Request, "from_engine_core_request"),
    (Scheduler, "schedule"), (Scheduler, "_free_request"), (AsyncLLM, "add_request")]
    if getattr(getattr(c.__dict__[n], "__func__", c.__dict__[n]), "__featurewatch_wrapped__",
               False)]
if case == "renamed":
    wrapped.append("load_model untouched=%s" % (BaseModelLoader.__dict__["load_model"] is load_model))
print(json.dumps({"wrapped": wrapped, "logged": records,
                  "status": WorkerBase.featurewatch_status(None)}))
"""


@pytest.mark.parametrize("case,names", [
    ("moved", "GPUModelRunner._model_forward missing (not defined on the class)"),
    ("renamed", "BaseModelLoader.load_model: parameters (vllm_config, model_cfg, prefix)"),
])
def test_register_stays_idle_patches_nothing_and_says_why(case, names):
    env = {**os.environ, "FEATUREWATCH_ADDRESS": "unix:///nowhere/featurewatch.sock"}
    r = subprocess.run([sys.executable, "-c", _REGISTER, case], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = ["load_model untouched=True"] if case == "renamed" else []
    assert out["wrapped"] == expected, out
    st = out["status"]
    assert st["enabled"] is False and names in st["idle_reason"], st
    version = compat.vllm_version()  # the installed one (scripts/vllm_compat.py runs others)
    assert st["idle_reason"].startswith(f"vLLM {version} not supported: "), st
    assert len(out["logged"]) == 1, out["logged"]
    assert "idle, nothing patched" in out["logged"][0] and f"vLLM {version}" in out["logged"][0]
    assert names in out["logged"][0]


# ---------------------------------------------------------------- wrappers fall back


def _runtime():
    from monitor.plugin.runtime import Runtime

    t = ops.SteerTables(num_layers=1, d_model=4, rows=4, clamps=1, max_tokens=8,
                        device=torch.device("cpu"), dtype=torch.float32, do_tap=True)
    vc = types.SimpleNamespace(parallel_config=types.SimpleNamespace(
        distributed_executor_backend="uni"))
    return Runtime(PluginConfig(address="unix:///nowhere"), vllm_config=vc, model_name="m",
                   d_model=4, num_layers=1, hooked=[0], tables=t, tp_rank=0, tp_size=1,
                   pp_rank=0, engine="0")


@pytest.fixture
def rt():
    r = _runtime()
    old = state.set_runtime(r)
    yield r
    state.set_runtime(old)


def test_renamed_request_field_falls_back_and_the_request_is_served(rt):
    class Runner:  # V1 runner stand-in with vLLM 0.32's signature
        def execute_model(self, scheduler_output, intermediate_tensors=None):
            return f"served {[r.req_id for r in scheduler_output.scheduled_new_reqs]}"

    patches._wrap(Runner, "execute_model", patches._wrap_v1_execute)
    new = types.SimpleNamespace(req_id="r1", sampling_params=None, prompt_ids=[1, 2, 3],
                                prompt_embeds=None, num_computed_tokens=0)  # prompt_token_ids
    so = types.SimpleNamespace(finished_req_ids=set(), scheduled_new_reqs=[new])
    assert Runner().execute_model(so) == "served ['r1']"
    assert Runner().execute_model(scheduler_output=so) == "served ['r1']"
    assert failopen.errors() == {"execute_model": 2}
    st = patches.featurewatch_status(None)
    assert st["enabled"] is True and st["wrapper_errors"] == {"execute_model": 2}


def test_forward_wrapper_falls_back_unsteered_and_vllms_own_errors_propagate(rt):
    class Runner:  # input_batch renamed: the step's labels cannot be read
        def __init__(self, fail=False):
            self.fail = fail

        def _model_forward(self, input_ids=None, positions=None, **kw):
            if self.fail:
                raise ValueError("vLLM's own")
            return input_ids * 2

    patches._wrap(Runner, "_model_forward", patches._wrap_v1_forward)
    rt.tables.steer_idx[:3] = 1  # a previous step's rows must not steer this one
    rt._idx_dirty = 3
    assert Runner()._model_forward(input_ids=torch.ones(2)).tolist() == [2.0, 2.0]
    assert failopen.errors() == {"_model_forward": 1}
    assert int(rt.tables.steer_idx.count_nonzero()) == 0 and not ops._STEP["live"]
    with pytest.raises(ValueError, match="vLLM's own"):
        Runner(fail=True)._model_forward(input_ids=torch.ones(2))


def test_load_model_wrapper_passes_a_renamed_parameter_through():
    class Loader:
        def load_model(self, vllm_config, model_cfg, prefix=""):
            return ("model", model_cfg, prefix)

    patches._wrap(Loader, "load_model", patches._wrap_load_model)
    vc = types.SimpleNamespace(model_config=object())
    assert Loader().load_model(vllm_config=vc, model_cfg=vc.model_config, prefix="p") == (
        "model", vc.model_config, "p")
    assert state.get_runtime() is None


def test_layer_hook_failure_returns_the_layers_output_unchanged():
    t = ops.SteerTables(num_layers=1, d_model=4, rows=4, clamps=1, max_tokens=8,
                        device=torch.device("cpu"), dtype=torch.float32, do_tap=True)
    layer = torch.nn.Linear(4, 4)
    attach_buffers(layer, t, 0)
    hook = LayerHook(0, 0, t)
    out = torch.ones(3, 5)  # a layer output of another width than the model's
    assert hook(layer, (), out) is out
    assert failopen.errors() == {"layer_hook": 1}


def test_v2_execute_with_a_failing_pre_step_serves_unsteered(rt, monkeypatch):
    class Runner:
        def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False):
            return "out"

    patches._wrap(Runner, "execute_model", patches._wrap_v2_execute)
    monkeypatch.setattr(rt, "pre_step", lambda so: so.renamed_field)
    after = []
    monkeypatch.setattr(rt, "after_forward", lambda: after.append(1))
    assert Runner().execute_model(types.SimpleNamespace(), None, False) == "out"
    assert failopen.errors() == {"execute_model": 1} and after == [1]  # the step completes
    assert np.all(rt.tables.steer_idx.numpy() == 0)


def test_status_summary_says_why_idle_and_sums_wrapper_errors():
    from monitor.plugin.routes import _public, _summary

    workers = [{"enabled": False, "idle_reason": "vLLM 0.33.0 not supported: x",
                "wrapper_errors": {}},
               {"enabled": True, "sends": True, "connected": True,
                "wrapper_errors": {"execute_model": 2, "layer_hook": 1}},
               {"enabled": True, "sends": False, "wrapper_errors": {"execute_model": 1}}]
    s = _summary(workers)
    assert s["idle_reason"] == "vLLM 0.33.0 not supported: x"
    assert s["wrapper_errors"] == {"execute_model": 3, "layer_hook": 1}
    assert "idle_reason" not in _public(s)  # without the key: booleans only


def test_preflight_sees_through_the_plugins_own_wrappers(monkeypatch):
    """A second register() (or a process already patched) must not read our own wrappers'
    (cls, *args, **kwargs) as a changed vLLM."""
    import inspect

    from vllm.v1.request import Request

    from monitor.plugin.engine_core import _wrap_from_ecr

    vllms = inspect.unwrap(Request.__dict__["from_engine_core_request"].__func__)
    monkeypatch.setattr(Request, "from_engine_core_request", classmethod(vllms))
    patches._wrap(Request, "from_engine_core_request", _wrap_from_ecr)
    assert getattr(Request.__dict__["from_engine_core_request"].__func__,
                   "__featurewatch_wrapped__", False)
    assert compat.preflight() is None
