"""Residual-stream activations of the real model with transformers, and perplexity with a layer's
output replaced (the SAE spliced in, or a steering edit).

The tap of layer L is the output of decoder layer L (HF ``hidden_states[L + 1]`` for a non-final
layer): what the vLLM plugin sends for that layer.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def load_model(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tok


class LayerEdit:
    """Forward hook on decoder layer ``layer``: records its output and/or replaces it by
    ``edit(x [T, d], positions [T]) -> [T, d]`` (positions from ``skip`` on)."""

    def __init__(self, model, layer: int, edit: Callable | None = None, skip: int = 1):
        self.edit, self.skip, self.last = edit, skip, None
        self.handle = model.model.layers[layer].register_forward_hook(self._hook)

    def _hook(self, _m, _inp, output):
        x = output[0] if isinstance(output, tuple) else output
        self.last = x.detach()
        if self.edit is None:
            return None
        y = x.clone()
        flat = y.reshape(-1, y.shape[-1])
        b, t = x.shape[0], x.shape[1]
        pos = torch.arange(t).repeat(b)
        keep = pos >= self.skip
        flat[keep] = self.edit(flat[keep], pos[keep]).to(y.dtype)
        y = flat.reshape(x.shape)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class _Stop(Exception):
    pass


@torch.no_grad()
def collect(model, sequences: Sequence[Sequence[int]], layer: int) -> list[torch.Tensor]:
    """Layer ``layer``'s output for every token of every sequence, ``[len, d]`` float32 each
    (the forward stops after that layer: the later layers are not needed)."""
    out = []

    def hook(_m, _inp, output):
        x = output[0] if isinstance(output, tuple) else output
        out.append(x[0].detach().float().clone())
        raise _Stop

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        for ids in sequences:
            try:
                model.model(input_ids=torch.tensor([list(ids)]), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return out


@torch.no_grad()
def nll(model, sequences: Sequence[tuple[Sequence[int], int]], edit: LayerEdit | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood and count of the tokens of each ``(ids, first_scored)``
    (token i scored for i >= first_scored >= 1), with whatever hooks are installed."""
    total, n = 0.0, 0
    for ids, first in sequences:
        t = torch.tensor([list(ids)])
        logits = model(input_ids=t, use_cache=False).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, t[0, 1:, None]).squeeze(-1)
        total -= float(lp[first - 1:].sum())
        n += len(ids) - first
    return total, n


def perplexity(model, sequences: Sequence[tuple[Sequence[int], int]]) -> float:
    total, n = nll(model, sequences)
    return math.exp(total / max(n, 1))
