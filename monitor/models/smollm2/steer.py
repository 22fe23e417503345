"""Suppression steering on the real model, measured: clamp SAE features to 0 at the SAE's layer.

For each concept, the held-out eliciting prompts are answered greedily with transformers with
and without the clamp (``SAE.clamp``, error term kept, every position: what the plugin's clamp
does), and the concept's labeler says whether each answer still expresses it. Perplexity of
concept-free held-out text is measured with and without the same clamp. The features are the
concept's best ones ranked on the training split (quality.py); nothing is chosen on held-out
prompts.
"""

from __future__ import annotations

import math

import torch

from monitor.models.smollm2 import labelers as L
from monitor.models.smollm2 import prompts as P
from monitor.models.smollm2.residuals import LayerEdit, nll


@torch.no_grad()
def greedy(model, tok, users: list[str], max_new_tokens: int, batch: int = 32) -> list[str]:
    tok.padding_side = "left"
    out = []
    for i in range(0, len(users), batch):
        texts = [P.chat(tok, u) for u in users[i:i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        out += [tok.decode(g[enc.input_ids.shape[1]:], skip_special_tokens=True) for g in gen]
    return out


def clamp_edit(sae, features: list[int]):
    return lambda x, _pos: sae.clamp(x, features, [0.0] * len(features))


def measure(model, tok, sae, layer: int, concept: str, features: list[int], ppl_seqs, max_new_tokens: int = 96) -> dict:
    users = [p.user for p in P.prompts(concept, "heldout")]
    before = greedy(model, tok, users, max_new_tokens)
    clean, n = nll(model, ppl_seqs)
    with LayerEdit(model, layer, edit=clamp_edit(sae, features), skip=0):
        after = greedy(model, tok, users, max_new_tokens)
        steered, _ = nll(model, ppl_seqs)
    rate_b = sum(L.REQUEST[concept](t) for t in before) / len(before)
    rate_a = sum(L.REQUEST[concept](t) for t in after) / len(after)
    ppl_b, ppl_a = math.exp(clean / n), math.exp(steered / n)
    samples = [{"prompt": u, "before": b, "after": a} for u, b, a in zip(users, before, after)
               if L.REQUEST[concept](b)][:2]
    return {"concept": concept, "features": features, "prompts": len(users), "emission_before": rate_b,
            "emission_after": rate_a, "emission_cut": (1 - rate_a / rate_b) if rate_b else float("nan"),
            "ppl_before": ppl_b, "ppl_after": ppl_a, "ppl_rise": ppl_a / ppl_b - 1, "samples": samples}


def probe_direction(probe_path: str, name: str) -> torch.Tensor:
    """The probe's weight as a unit direction in raw residual space (standardisation undone)."""
    from safetensors.torch import load_file

    from monitor.encode import load_probes

    bank = load_probes(probe_path)
    t = load_file(probe_path)
    w = t["weight"][bank.index(name)].float()
    if "scale" in t:
        w = w / t["scale"].float()
    return w / w.norm()


def emission(model, tok, layer: int, users: list[str], concept: str, edit, max_new_tokens: int) -> tuple[float, list[str]]:
    if edit is None:
        texts = greedy(model, tok, users, max_new_tokens)
    else:
        with LayerEdit(model, layer, edit=edit, skip=0):
            texts = greedy(model, tok, users, max_new_tokens)
    return sum(L.REQUEST[concept](t) for t in texts) / len(texts), texts


def direction_measure(model, tok, layer: int, concept: str, u: torch.Tensor, norm: float, alphas: list[float],
                      ppl_seqs, max_new_tokens: int, max_ppl_rise: float = 0.10, n_train: int = 12) -> dict:
    """Add ``-alpha * norm * u`` at every position. ``alpha`` is chosen on *training* eliciting prompts
    (the largest emission cut whose perplexity rise stays within ``max_ppl_rise``, else the smallest
    alpha), then measured on the held-out eliciting prompts."""
    train = [p.user for p in P.prompts(concept, "train")][::max(1, len(P.prompts(concept, "train")) // n_train)][:n_train]
    held = [p.user for p in P.prompts(concept, "heldout")]
    clean, n = nll(model, ppl_seqs)
    base_train, _ = emission(model, tok, layer, train, concept, None, max_new_tokens)
    tried = []
    for a in alphas:
        edit = (lambda x, _p, a=a: x - a * norm * u.to(x.dtype))
        rate, _ = emission(model, tok, layer, train, concept, edit, max_new_tokens)
        with LayerEdit(model, layer, edit=edit, skip=0):
            steered, _ = nll(model, ppl_seqs)
        tried.append({"alpha": a, "train_emission": rate, "ppl_rise": math.exp((steered - clean) / n) - 1})
    ok = [t for t in tried if t["ppl_rise"] <= max_ppl_rise]
    pick = min(ok, key=lambda t: (t["train_emission"], t["alpha"])) if ok else tried[0]
    edit = (lambda x, _p, a=pick["alpha"]: x - a * norm * u.to(x.dtype))
    before, tb = emission(model, tok, layer, held, concept, None, max_new_tokens)
    after, ta = emission(model, tok, layer, held, concept, edit, max_new_tokens)
    samples = [{"prompt": q, "before": b, "after": a} for q, b, a in zip(held, tb, ta) if L.REQUEST[concept](b)][:2]
    return {"concept": concept, "alpha": pick["alpha"], "norm": norm, "train_emission_before": base_train,
            "tried": tried, "prompts": len(held), "emission_before": before, "emission_after": after,
            "emission_cut": (1 - after / before) if before else float("nan"), "ppl_rise": pick["ppl_rise"],
            "samples": samples}
