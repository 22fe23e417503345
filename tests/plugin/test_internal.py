"""vLLM's synthetic warm-up requests (vLLM 0.32's V2 runner, 0.33's CPU warm-up: ``_warmup_<i>_``
through ``execute_model``) and the self-test's own requests never reach the sidecar as user
requests: not announced, not harvested, not steered; counted in the status."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from monitor.plugin import ops
from monitor.plugin.config import PluginConfig
from monitor.plugin.internal import kind
from monitor.plugin.runtime import Runtime
from monitor.plugin.step_hooks import StepLabels
from monitor.protocol import pb


@pytest.mark.parametrize("rid,want", [
    ("_warmup_0_", "warmup"), ("_warmup_12_", "warmup"),
    ("_v2_mixed_warmup_decode_", "warmup"), ("_v2_mixed_warmup_prefill_", "warmup"),
    ("_sparse_mla_v2_warmup_prefill_", "warmup"), ("_dummy_req_3", "warmup"),
    ("_featurewatch_selftest_probe_", "selftest"),
    # user requests: vLLM's ids carry "-<random hex>"; plain counters from LLM.generate
    ("0", None), ("cmpl-3f2a-0-1b2c3d4e", None), ("_warmup_0_-1b2c3d4e", None),
    ("warmup_0_", None), ("_warmup", None), ("chatcmpl-_warmup_1_", None),
])
def test_internal_request_ids(rid, want):
    assert kind(rid) == want


@pytest.fixture
def rt():
    t = ops.SteerTables(num_layers=1, d_model=4, rows=4, clamps=1, max_tokens=8,
                        device=torch.device("cpu"), dtype=torch.float32, do_tap=True)
    vc = types.SimpleNamespace(parallel_config=types.SimpleNamespace(
        distributed_executor_backend="uni"))
    r = Runtime(PluginConfig(address="unix:///nowhere"), vllm_config=vc, model_name="m",
                d_model=4, num_layers=1, hooked=[0], tables=t, tp_rank=0, tp_size=1,
                pp_rank=0, engine="0")
    r._apply_ops([("plan", pb.TapPlan(layers=[0], scope=pb.TOKEN_SCOPE_ALL,
                                      steering_enabled=True).SerializeToString())])
    sent: list = []
    r.client.offer = lambda item: sent.append(item) or True
    r.client.has_room = lambda nbytes=0: True
    r.client.connected = True
    r.sent = sent
    yield r
    ops.set_step_live(False)


def _new(rid: str, n: int = 3):
    return types.SimpleNamespace(req_id=rid, sampling_params=None, prompt_token_ids=[5] * n,
                                 prompt_embeds=None, num_computed_tokens=0)


def _step(rt, rids: list[str], n: int = 3):
    rt.pre_step(types.SimpleNamespace(finished_req_ids=set(),
                                      scheduled_new_reqs=[_new(r, n) for r in rids]))
    qsl = np.arange(len(rids) + 1, dtype=np.int64) * n
    rt.before_forward(StepLabels(list(rids), qsl, np.zeros(len(rids), dtype=np.int64),
                                 n * len(rids)))
    rt.after_forward()


def test_warmup_requests_are_neither_announced_nor_harvested_and_are_counted(rt):
    _step(rt, ["_warmup_0_", "_warmup_1_"])
    assert rt.sent == [] and rt.requests == {}
    assert rt.counters.requests_started == 0 and rt.counters.tokens_tapped == 0
    assert rt.status()["vllm_internal"] == {"requests": {"warmup": 2}, "steps": {"warmup": 1}}
    rt.pre_step(types.SimpleNamespace(finished_req_ids={"_warmup_0_", "_warmup_1_"},
                                      scheduled_new_reqs=[]))
    assert rt.sent == [] and rt.counters.requests_finished == 0

    _step(rt, ["7"])  # a user request: announced and its activations harvested
    kinds = [type(x).__name__ for x in rt.sent]
    assert kinds == ["PluginMessage", "BatchItem"], kinds
    assert rt.sent[0].request_start.request_id == "7" and rt.counters.tokens_tapped == 3
    assert rt.status()["vllm_internal"]["steps"] == {"warmup": 1}


def test_a_warmup_step_is_never_steered(rt):
    rt.tables.steer_idx[:4] = 2  # whatever a previous step left
    rt._idx_dirty = 4
    _step(rt, ["_v2_mixed_warmup_decode_"], n=4)
    assert int(rt.tables.steer_idx.count_nonzero()) == 0 and not ops.step_live()
