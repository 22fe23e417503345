"""Which decoder-layer output convention each model family uses in vLLM, decided explicitly.

The tap must record the residual stream after a layer, and steering must change that stream.
vLLM's decoder layers return it in one of three shapes, and the shape alone does not say which:
StableLM returns ``(stream, residual)`` — a full stream and a stale residual — which looks like
Llama's ``(hidden, residual)`` where the stream is their sum. So the convention is looked up by
the architecture name in the HF config (``architectures[0]``), checked against vLLM 0.32's
model code; an architecture not listed here is refused (the plugin stays idle for that model,
says why in ``/featurewatch/status``), never guessed.
"""

from __future__ import annotations

from enum import Enum

import torch


class Convention(str, Enum):
    """How a decoder layer's output carries the residual stream."""

    #: ``(hidden, residual)``; vLLM defers the add: the stream is ``hidden + residual``, and
    #: steering adds to ``residual`` (the next layer's fused add-norm sums them).
    HIDDEN_RESIDUAL = "hidden_residual"
    #: ``(stream, stale)``: the first element is the whole stream (steered and returned), the
    #: second is the stream before the MLP add, unused by the next layer.
    STREAM_FIRST = "stream_first"
    #: a tensor that is the stream.
    STREAM = "stream"


_H, _F, _S = Convention.HIDDEN_RESIDUAL, Convention.STREAM_FIRST, Convention.STREAM

# HF ``architectures[0]`` -> convention (vLLM 0.32's decoder layers: models/<family>.py).
FAMILIES: dict[str, Convention] = {
    "LlamaForCausalLM": _H,
    "MistralForCausalLM": _H,
    "Phi3ForCausalLM": _H,  # vLLM's Phi3 is its Llama
    "Qwen2ForCausalLM": _H,
    "Qwen3ForCausalLM": _H,
    "Qwen2MoeForCausalLM": _H,
    "Qwen3MoeForCausalLM": _H,
    "MixtralForCausalLM": _H,
    "GemmaForCausalLM": _H,
    "Gemma2ForCausalLM": _H,
    "Gemma3ForCausalLM": _H,
    "StableLmForCausalLM": _F,
    "GPT2LMHeadModel": _S,
}


class UnsupportedModel(Exception):
    """The model's architecture has no known decoder-layer convention."""


def architecture(model_config) -> str:
    """``architectures[0]`` of the HF config ('' when absent)."""
    hf = getattr(model_config, "hf_config", None)
    archs = getattr(hf, "architectures", None) or getattr(model_config, "architectures", None)
    return str(archs[0]) if archs else ""


def convention_of(arch: str) -> Convention:
    conv = FAMILIES.get(arch)
    if conv is None:
        raise UnsupportedModel(
            f"model architecture {arch or '(none in the HF config)'!r} is not in featurewatch's "
            f"decoder-layer table (monitor/plugin/families.py; supported: "
            f"{', '.join(sorted(FAMILIES))})")
    return conv


def split(output, conv: Convention, strict: bool = True):
    """``(hidden, stream_part)`` of a layer output: the op sees ``hidden + part`` (``hidden``
    None: ``part`` is the stream). When the output is not the convention's shape (a changed
    vLLM model) raises ``TypeError`` (``strict``) or returns None: the hook falls back and the
    self-test fails."""
    if conv is Convention.STREAM:
        if isinstance(output, torch.Tensor):
            return None, output
    elif (isinstance(output, tuple) and len(output) == 2
          and isinstance(output[0], torch.Tensor)):
        if conv is Convention.STREAM_FIRST:
            return None, output[0]
        if output[1] is None:  # no add deferred: the first element is the stream
            return None, output[0]
        if isinstance(output[1], torch.Tensor):
            return output[0], output[1]
    if not strict:
        return None
    raise TypeError(f"decoder layer output {_shape(output)} is not the {conv.value} convention")


def join(output, conv: Convention, new_part):
    """The layer output with its stream part replaced by ``new_part``."""
    if conv is Convention.STREAM:
        return new_part
    if conv is Convention.STREAM_FIRST or output[1] is None:
        return (new_part, output[1])
    return (output[0], new_part)


def _shape(output) -> str:
    if isinstance(output, tuple):
        return "(" + ", ".join(type(x).__name__ for x in output) + ")"
    return type(output).__name__
