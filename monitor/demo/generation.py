"""Generating with the demo model: SAE clamp hook, seeded sampling, emission rate, perplexity."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from monitor.demo.corpus_labels import find_mentions
from monitor.demo.tokenizer import EOS_ID, PAD_ID
from monitor.demo.lm import pad_batch, layer_module


class ClampHook:
    """Forward hook on a decoder layer applying SAE suppression ``x' = x + sum_i (0 - f_i(x))
    W_dec[i]`` over the features (all computed on the unsteered x; the error term is kept), at
    every position, prompt and generated. Uses ``sae.clamp`` (the ``monitor.encode`` contract)."""

    def __init__(self, model, layer: int, sae, features: Sequence[int], value: float = 0.0):
        self.sae, self.features, self.value = sae, list(features), value
        self.handle = layer_module(model, layer).register_forward_hook(self._hook)

    def _hook(self, _m, _inp, output):
        x = output[0] if isinstance(output, tuple) else output
        shape = x.shape
        y = x.reshape(-1, shape[-1])
        if self.features:
            y = self.sae.clamp(y, self.features, [self.value] * len(self.features))
        y = y.reshape(shape).to(x.dtype)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def sample(model, tok, prompts: Sequence[str], max_new_tokens: int, seed: int,
           temperature: float = 1.0, batch: int = 64) -> list[str]:
    """Ancestral sampling (temperature 1, no top-k/p), seeded, batched with left padding."""
    outs: list[str] = []
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch):
        enc = [tok.encode(p).ids for p in prompts[i:i + batch]]
        ids, mask = pad_batch(enc, left=True)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        past = None
        cur_ids, cur_pos = ids, pos
        done = torch.zeros(len(enc), dtype=torch.bool)
        gen = []
        for _ in range(max_new_tokens):
            out = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1].float() / temperature
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            gen.append(nxt)
            done |= nxt == EOS_ID
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(len(enc), 1, dtype=mask.dtype)], 1)
            cur_ids = nxt[:, None]
            cur_pos = cur_pos[:, -1:] + 1
        g_ids = torch.stack(gen, 1).tolist()
        for row in g_ids:
            row = [t for t in row if t not in (PAD_ID,)]
            if EOS_ID in row:
                row = row[:row.index(EOS_ID)]
            outs.append(tok.decode(row, skip_special_tokens=True))
    return outs


def emission_rate(generations: Sequence[str], concept: str) -> float:
    return float(np.mean([bool(find_mentions(g, concept)) for g in generations]))


@torch.no_grad()
def perplexity(model, encoded: Sequence[Sequence[int]], batch: int = 64) -> float:
    """Token perplexity (EOS target included) of documents."""
    nll, n = 0.0, 0
    for i in range(0, len(encoded), batch):
        seqs = [list(s) + [EOS_ID] for s in encoded[i:i + batch]]
        ids, mask = pad_batch(seqs)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        tgt = ids[:, 1:]
        m = mask[:, 1:].bool()
        lp = torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
        nll -= float(lp[m].sum())
        n += int(m.sum())
    return math.exp(nll / n)


