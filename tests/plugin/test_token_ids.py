"""Token ids travel with the tapped rows: harvest takes the forward's input ids of the tokens it
keeps (scope selection included) and the sender puts them in ``ActivationBatch.token_ids``."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch

from monitor.plugin import ops
from monitor.plugin.client import BatchItem
from monitor.plugin.config import PluginConfig
from monitor.plugin.runtime import Runtime
from monitor.plugin.step_hooks import StepLabels
from monitor.protocol import pb

D = 8


def _runtime() -> Runtime:
    t = ops.SteerTables(num_layers=2, d_model=D, rows=4, clamps=2, max_tokens=16,
                        device=torch.device("cpu"), dtype=torch.float32, do_tap=True)
    vc = types.SimpleNamespace(parallel_config=types.SimpleNamespace(
        distributed_executor_backend="uni"))
    rt = Runtime(PluginConfig(address="unix:///nowhere"), vllm_config=vc, model_name="m",
                 d_model=D, num_layers=2, hooked=[0, 1], tables=t, tp_rank=0, tp_size=1,
                 pp_rank=0, engine="0")
    rt.client.connected = True  # never started: items stay in its queue
    return rt


def _start(rt, rid: str, prompt_len: int) -> None:
    sp = types.SimpleNamespace(extra_args={})
    nr = types.SimpleNamespace(req_id=rid, sampling_params=sp, prompt_token_ids=[0] * prompt_len,
                               prompt_embeds=None, num_computed_tokens=0)
    rt.pre_step(types.SimpleNamespace(scheduled_new_reqs=[nr], finished_req_ids=()))


def _harvest(rt, labels: StepLabels) -> BatchItem:
    rt.before_forward(labels)
    rt.after_forward()
    while True:  # RequestStart messages are queued ahead of the batch
        item = rt.client._q.get_nowait()
        if isinstance(item, BatchItem):
            return item


@pytest.mark.parametrize("scope, want", [
    (pb.TOKEN_SCOPE_ALL, [101, 102, 103, 201, 202]),
    (pb.TOKEN_SCOPE_PROMPT, [101, 102, 201]),
    (pb.TOKEN_SCOPE_GENERATED, [103, 202]),
])
def test_harvest_sends_the_kept_tokens_input_ids(scope, want):
    rt = _runtime()
    _start(rt, "a", 3)  # a: positions 1..3 this step, position 3 generated
    _start(rt, "b", 1)  # b: positions 0..1, position 1 generated
    rt._apply_ops([("plan", pb.TapPlan(layers=[0, 1], scope=scope).SerializeToString())])
    buf = torch.tensor([101, 102, 103, 201, 202, 0, 0, 0], dtype=torch.int32)  # padded, as vLLM's
    item = _harvest(rt, StepLabels(["a", "b"], np.array([0, 3, 5]), np.array([1, 0]), 5, buf))
    buf.fill_(-1)  # vLLM refills its buffer for the next step: the item holds its own copy
    (raw,) = list(item.messages(max_bytes=0))
    batch = pb.PluginMessage.FromString(raw).batch
    assert list(batch.token_ids) == want
    assert len(batch.token_ids) == len(batch.positions) == batch.activations.shape[1]


def test_no_input_ids_sends_none():
    rt = _runtime()
    _start(rt, "a", 4)
    rt._apply_ops([("plan", pb.TapPlan(layers=[0]).SerializeToString())])
    item = _harvest(rt, StepLabels(["a"], np.array([0, 3]), np.array([0]), 3))
    (raw,) = list(item.messages(max_bytes=0))
    assert list(pb.PluginMessage.FromString(raw).batch.token_ids) == []


def _item(ids) -> BatchItem:
    n = len(ids)
    return BatchItem(step=1, layers=[0], host=torch.zeros(1, n, D), event=None,
                     request_ids=["a"], token_request_index=np.zeros(n, np.int64),
                     positions=np.arange(n), is_generated=np.zeros(n, bool),
                     captured_unix_s=time.time(), token_ids=torch.tensor(ids, dtype=torch.int64))


def test_split_batches_carry_their_own_tokens_ids():
    ids = list(range(1000, 1010))
    msgs = list(_item(ids).messages(max_bytes=3 * D * 4))  # three tokens a message
    got = [list(pb.PluginMessage.FromString(m).batch.token_ids) for m in msgs]
    assert got == [ids[0:3], ids[3:6], ids[6:9], ids[9:10]]


@pytest.mark.parametrize("bad", [-1, 1 << 32])
def test_an_id_out_of_uint32_range_sends_none_instead_of_ending_the_stream(bad):
    (raw,) = list(_item([5, bad, 7]).messages(max_bytes=0))
    batch = pb.PluginMessage.FromString(raw).batch
    assert list(batch.token_ids) == [] and list(batch.positions) == [0, 1, 2]
