"""The demo's tiny Llama: training with the planted concept directions, and residuals read back at a layer."""

from __future__ import annotations

import math
import random
import time
from typing import Sequence

import numpy as np
import torch

from monitor.demo.corpus_labels import Example, token_labels
from monitor.demo.corpus_templates import CONCEPTS
from monitor.demo.build_config import BuildConfig, log
from monitor.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID


def make_model(cfg: BuildConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        initializer_range=0.02, attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(mc)
    model.config.use_cache = True
    return model


def _batches(lengths: Sequence[int], batch: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches (little padding), in a seeded random order."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch * 50
    out: list[list[int]] = []
    for i in range(0, len(idx), chunk):
        part = sorted(idx[i:i + chunk], key=lambda j: lengths[j])
        out.extend(part[j:j + batch] for j in range(0, len(part), batch))
    rng.shuffle(out)
    return [b for b in out if len(b) == batch]


def pad_batch(seqs: Sequence[Sequence[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return ids, mask


PLANTED = tuple(f"{c}{suffix}" for c in CONCEPTS for suffix in ("", "_next"))


def plant_directions(d: int, seed: int) -> torch.Tensor:
    """Orthonormal ``[len(PLANTED), d]`` directions (seeded): where the model is trained to write
    each planted concept in layer L's residual stream. Nothing else knows them: the SAE is
    trained unsupervised and its features are matched to concepts on labelled text only."""
    g = torch.Generator().manual_seed(seed + 77)
    q, _ = torch.linalg.qr(torch.randn(d, len(PLANTED), generator=g, dtype=torch.float64))
    return q.T.float().contiguous()


def concept_targets(docs: Sequence[Example], enc) -> list[np.ndarray]:
    """Per document a ``[len(ids) + 1, len(PLANTED)]`` 0/1 array (the +1 is the EOS appended for
    training): ``concept`` = the token is part of a mention, ``concept_next`` = the next token
    is the first token of a mention."""
    out = []
    for d, (ids, offsets) in zip(docs, enc):
        cols = []
        for c in CONCEPTS:
            inside = np.array(token_labels(d, offsets, c) + [False])
            nxt = np.zeros_like(inside)
            nxt[:-1] = inside[1:] & ~inside[:-1]
            cols += [inside, nxt]
        out.append(np.stack(cols, 1).astype(np.float32))
    return out


def train_lm(model, seqs: list[list[int]], cfg: BuildConfig, seed: int,
             targets: Sequence[np.ndarray] | None = None, ablate: Sequence[bool] | None = None,
             directions: torch.Tensor | None = None) -> list[float]:
    """Next-token training. With ``directions``: rows whose ``ablate`` flag is set run with every
    planted direction (nearly) projected out of layer L's output; the other rows add the
    concept loss ``cfg.concept_weight * mean_j [mean_pos (x.u_j - s)^2 + mean_neg (x.u_j)^2]``
    (s = ``cfg.concept_scale``) on layer L's output, per planted direction j."""
    rng = random.Random(f"lm-batches-{seed}")
    batches: list[list[int]] = []
    while len(batches) < cfg.lm_steps:
        batches.extend(_batches([len(s) for s in seqs], cfg.lm_batch, rng))
    batches = batches[:cfg.lm_steps]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lm_lr, betas=(0.9, 0.95))
    warm = max(1, cfg.lm_steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lm_lr * (step + 1) / warm
        t = (step - warm) / max(1, cfg.lm_steps - warm)
        return cfg.lm_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(seed + 5)
    state: dict[str, torch.Tensor | None] = {"keep": None}
    captured: dict[str, torch.Tensor] = {}

    def at_layer(_m, _inp, output):
        x = output[0] if isinstance(output, tuple) else output
        captured["x"] = x
        keep = state["keep"]
        if directions is None or keep is None:
            return None
        # ablated rows: x - (1 - keep) (x.u) u for every planted direction u
        proj = x @ directions.T                                   # [B, T, P]
        y = x - ((1 - keep)[:, None, None] * proj) @ directions
        return (y, *output[1:]) if isinstance(output, tuple) else y

    hook = layer_module(model, cfg.layer).register_forward_hook(at_layer)
    aux_layer = cfg.layer if cfg.lm_aux_layer < 0 else cfg.lm_aux_layer
    aux_hook = None
    if cfg.lm_aux_weight and aux_layer != cfg.layer:
        def grab_aux(_m, _inp, output):
            captured["aux"] = output[0] if isinstance(output, tuple) else output
        aux_hook = layer_module(model, aux_layer).register_forward_hook(grab_aux)
    model.train()
    losses, closses = [], []
    t0 = time.time()
    for step, b in enumerate(batches):
        ids, mask = pad_batch([seqs[i] for i in b])
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[:, 0] = -100
        rows_ablate = torch.tensor([bool(ablate[i]) for i in b]) if ablate is not None else None
        if directions is not None and rows_ablate is not None:
            keep = torch.rand(len(b), generator=g) * cfg.ablate_keep
            state["keep"] = torch.where(rows_ablate, keep, torch.ones(len(b)))
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        # right padding + causal attention: real tokens never see pads, pads carry no loss
        out = model(input_ids=ids, labels=labels, use_cache=False)
        loss = out.loss
        if cfg.lm_aux_weight:
            # deep supervision: layer L's residual must already predict the next token through
            # the model's own final norm and head
            xa = captured["aux"] if aux_layer != cfg.layer else captured["x"]
            aux_logits = model.lm_head(model.model.norm(xa))
            aux = torch.nn.functional.cross_entropy(
                aux_logits[:, :-1].reshape(-1, aux_logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100)
            loss = loss + cfg.lm_aux_weight * aux
        if directions is not None and targets is not None:
            proj = captured["x"] @ directions.T                    # [B, T, P]
            tgt = torch.zeros_like(proj)
            for r, i in enumerate(b):
                tgt[r, :len(targets[i])] = torch.from_numpy(targets[i])
            live = mask.bool()
            if rows_ablate is not None:
                live &= ~rows_ablate[:, None]
            live[:, 0] = False  # BOS
            pos = (tgt > 0.5) & live[..., None]
            neg = (tgt < 0.5) & live[..., None]
            err = proj - cfg.concept_scale * tgt
            sq = err.pow(2)
            per_dir = ((sq * pos).sum((0, 1)) / pos.sum((0, 1)).clamp_min(1)
                       + (sq * neg).sum((0, 1)) / neg.sum((0, 1)).clamp_min(1))
            closs = per_dir.mean() / cfg.concept_scale ** 2
            loss = loss + cfg.concept_weight * closs
            closses.append(float(closs.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % 100 == 0 or step == cfg.lm_steps - 1:
            log(f"lm step {step:4d}/{cfg.lm_steps} loss {np.mean(losses[-50:]):.3f} concept "
                f"{np.mean(closses[-50:]) if closses else float('nan'):.4f} "
                f"({time.time() - t0:.0f}s)")
    hook.remove()
    if aux_hook is not None:
        aux_hook.remove()
    state["keep"] = None
    model.eval()
    return losses


def layer_module(model, layer: int):
    return model.model.layers[layer]


@torch.no_grad()
def collect_residuals(model, encoded: Sequence[Sequence[int]], layer: int,
                      batch: int = 64) -> list[torch.Tensor]:
    """Residual stream after decoder layer ``layer`` (HF ``hidden_states[layer+1]``), one
    ``[len, d]`` float32 tensor per sequence (BOS included)."""
    out: list[torch.Tensor | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    captured = {}

    def hook(_m, _inp, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output

    h = layer_module(model, layer).register_forward_hook(hook)
    try:
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            ids, _ = pad_batch([encoded[j] for j in idx])
            model.model(input_ids=ids, use_cache=False)
            x = captured["x"].float()
            for r, j in enumerate(idx):
                out[j] = x[r, :len(encoded[j])].clone()
    finally:
        h.remove()
    return out  # type: ignore[return-value]


