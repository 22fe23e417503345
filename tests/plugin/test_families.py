"""Decoder-layer output conventions are looked up per architecture (families.py), never inferred
from the output's shape; the hook taps and steers the stream each convention defines."""

from __future__ import annotations

import types

import pytest
import torch

from monitor.plugin import failopen, ops
from monitor.plugin.families import (
    FAMILIES,
    Convention,
    UnsupportedModel,
    architecture,
    convention_of,
)
from monitor.plugin.hooks import LayerHook, attach_buffers

D = 4


@pytest.fixture(autouse=True)
def _clean():
    failopen.reset()
    ops.set_step_live(False)
    yield
    failopen.reset()
    ops.set_step_live(False)


def _layer(conv: Convention):
    t = ops.SteerTables(num_layers=1, d_model=D, rows=4, clamps=1, max_tokens=8,
                        device=torch.device("cpu"), dtype=torch.float32, do_tap=True)
    layer = torch.nn.Linear(D, D)
    attach_buffers(layer, t, 0)
    return t, layer, LayerHook(0, 0, t, conv)


def test_the_table_decides_and_unknown_architectures_are_refused():
    assert convention_of("LlamaForCausalLM") is Convention.HIDDEN_RESIDUAL
    assert convention_of("StableLmForCausalLM") is Convention.STREAM_FIRST
    assert convention_of("GPT2LMHeadModel") is Convention.STREAM
    with pytest.raises(UnsupportedModel, match="'FalconForCausalLM' is not in featurewatch's "
                                               "decoder-layer table"):
        convention_of("FalconForCausalLM")
    with pytest.raises(UnsupportedModel, match=r"\(none in the HF config\)"):
        convention_of(architecture(types.SimpleNamespace(hf_config=None, architectures=None)))
    cfg = types.SimpleNamespace(hf_config=types.SimpleNamespace(architectures=["Qwen3ForCausalLM"]))
    assert architecture(cfg) == "Qwen3ForCausalLM" and "Qwen3ForCausalLM" in FAMILIES


def test_stream_first_taps_and_steers_the_first_element_not_the_sum():
    t, layer, hook = _layer(Convention.STREAM_FIRST)
    stream = torch.arange(12, dtype=torch.float32).reshape(3, D)
    stale = torch.full((3, D), 100.0)
    out = hook(layer, (), (stream, stale))
    assert out[0] is stream and out[1] is stale  # no steered token: vLLM's tensors untouched
    assert torch.equal(t.tap[0, :3], stream)  # the stream, not stream + stale

    t.add[0, 1] = torch.tensor([0.0, 2.0, 0.0, 0.0])  # row 1 adds 2 to dimension 1
    t.row_on[0, 1] = True
    t.steer_idx[:3] = torch.tensor([0, 1, 0])
    ops.set_step_live(True)
    out = hook(layer, (), (stream, stale))
    want = stream.clone()
    want[1, 1] += 2.0
    assert torch.equal(out[0], want) and out[1] is stale
    assert torch.equal(t.tap[0, :3], want)


def test_hidden_residual_taps_the_sum_and_steers_the_residual():
    t, layer, hook = _layer(Convention.HIDDEN_RESIDUAL)
    hidden, residual = torch.ones(2, D), torch.full((2, D), 3.0)
    t.add[0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    t.row_on[0, 1] = True
    t.steer_idx[:2] = torch.tensor([1, 0])
    ops.set_step_live(True)
    h, r = hook(layer, (), (hidden, residual))
    assert h is hidden
    assert r[0].tolist() == [4.0, 3.0, 3.0, 3.0] and r[1].tolist() == [3.0] * D
    assert t.tap[0, 0].tolist() == [5.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("conv,output", [
    (Convention.HIDDEN_RESIDUAL, torch.ones(2, D)),  # a bare tensor where a pair is expected
    (Convention.STREAM, (torch.ones(2, D), torch.ones(2, D))),
    (Convention.STREAM_FIRST, (torch.ones(2, D),)),
])
def test_an_output_not_of_the_convention_falls_back_and_is_counted(conv, output):
    t, layer, hook = _layer(conv)
    t.tap.fill_(float("nan"))
    assert hook(layer, (), output) is output
    assert failopen.errors() == {"layer_hook": 1}
    assert bool(torch.isnan(t.tap).all())  # nothing tapped: the self-test would fail


def test_a_disabled_hook_returns_vllms_output_untouched():
    t, layer, hook = _layer(Convention.HIDDEN_RESIDUAL)
    hook.enabled = False
    t.tap.fill_(float("nan"))
    out = (torch.ones(2, D), torch.ones(2, D))
    assert hook(layer, (), out) is out and bool(torch.isnan(t.tap).all())
    assert failopen.errors() == {}
