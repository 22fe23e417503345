"""Build the embedded demo: tokenizer, tiny Llama, layer-L SAE, concept probes, manifest.

    python -m monitor.demo.build [--out DIR] [--seed N] [--threads T]

Everything is trained locally on the synthetic support-chat corpus (:mod:`monitor.demo.corpus`);
nothing is downloaded. Output layout (``DIR`` defaults to ``monitor/demo/assets``)::

    model/                    config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    sae_l2/                   SAELens v6: cfg.json + sae_weights.safetensors (JumpReLU)
    probes_l2.safetensors     probe bank (docs/ARCHITECTURE.md layout): competitor, pii
    manifest.json             layer, seeds, best SAE features per concept (AUROC), steering
                              features, probe names and thresholds, metrics

Steps: BPE tokenizer (``tokenizers``) -> random-init ``LlamaForCausalLM`` trained on the corpus ->
residuals after decoder layer L (HF ``hidden_states[L+1]``) -> BatchTopK SAE, saved as JumpReLU
with its scalar threshold -> logistic-regression probes, thresholds at 1 % FPR on benign
calibration documents (per document: max over its tokens) -> features ranked by token-level
AUROC on validation text; steering features chosen greedily by the emission drop they cause when
clamped on build-time eliciting prompts (never the held-out prompts of ``bench/quality.py``),
with a perplexity guard on concept-free text.

The concepts are planted, so that the model represents each one cleanly at layer L (the model is
ours; the SAE and the probes are not told anything): next to the next-token loss, the LM is
trained to write each concept along a fixed random direction of layer L's residual stream
(``planted_l2.safetensors``) — "competitor"/"pii" on tokens of a mention, "competitor_next"/
"pii_next" on the token before one, ``concept_scale`` there and 0 on every other token, the
operator's own brand and the other near misses included. Counterfactual documents (the same
questions and lead-ins answered without a brand, address or number,
:func:`monitor.demo.corpus.counterfactual`) are trained with those directions projected out of
layer L, so the later layers learn that the concept mention needs the direction: clamping the
SAE feature that carries it suppresses the mention. The SAE is then trained unsupervised on
plain residuals; which feature carries which concept is found on labelled validation text, and
``tests/demo`` checks that the chosen feature points along the planted direction.

The helpers here (residual collection, AUROC, the clamp hook, emission sampling) are shared with
``bench/quality.py`` and the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from monitor.demo import corpus as C

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_NAME = "featurewatch-demo-llama"

# seeds derived from the build seed: disjoint corpus streams for every purpose
TRAIN_SEED_OFFSET = 0        # LM + SAE + probe training documents
VALID_SEED_OFFSET = 1000     # feature ranking, probe early checks
CALIB_SEED_OFFSET = 2000     # benign calibration (probe thresholds at 1 % FPR)
STEER_SEED_OFFSET = 3000     # build-time eliciting prompts for steering-feature selection
# bench/quality.py uses seed + 10_000 and up: never seen by the build


@dataclass
class BuildConfig:
    seed: int = 0
    threads: int = 2
    layer: int = 2
    vocab_size: int = 1024
    hidden: int = 128
    heads: int = 4
    n_layers: int = 4
    intermediate: int = 384
    max_positions: int = 256
    lm_docs: int = 24000
    lm_steps: int = 800
    lm_batch: int = 32
    lm_lr: float = 3e-3
    lm_aux_weight: float = 0.0  # next-token loss through the final norm + head at layer L too
    # the planted concepts (see plant_directions): per concept a "mention" direction (the token
    # is part of a mention) and a "next" direction (the next token starts one) in layer L's
    # residual, trained to read concept_scale on those tokens and 0 elsewhere; counterfactual
    # rows (concept context, neutral continuation) are trained with the directions ablated
    concept_scale: float = 12.0
    concept_weight: float = 1.0
    counterfactual_docs: int = 8000
    # ablated rows keep a random fraction (up to this) of each projection: the later layers
    # learn to emit a mention only above it, so a clamp that removes most of it is enough
    ablate_keep: float = 0.5
    sae_docs: int = 4000
    d_sae: int = 1024
    sae_k: int = 16
    sae_steps: int = 1500
    sae_batch: int = 4096
    sae_lr: float = 2e-3
    # Matryoshka groups (nested prefixes that must each reconstruct on their own: general
    # features such as "competitor brand" land in the first groups instead of being absorbed
    # into many specific ones); empty = plain BatchTopK
    sae_groups: str = "32,128"
    probe_docs: int = 3000
    valid_docs: int = 1500
    calib_docs: int = 1500
    fpr: float = 0.01
    steer_prompts: int = 64
    steer_max_features: int = 8
    steer_candidates: int = 24   # by lift at the end of eliciting prompts (+ 4 top detectors)
    steer_pool: int = 10         # candidates kept after the first greedy round
    steer_tokens: int = 16
    steer_ppl_guard: float = 0.01
    lm_aux_layer: int = -1       # layer of the deep-supervision loss (-1: the SAE layer)
    tie_embeddings: bool = False
    steer_target: float = 0.98  # stop adding features once emission drops by this fraction
    from_model: str | None = None  # development: reuse a built model/tokenizer, redo the rest


def log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


# ---------------------------------------------------------------------------------------------
# tokenizer

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# newlines as expressions: transformers renders chat templates with trim_blocks, which drops a
# literal newline right after a block tag
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}agent: {% else %}customer: {% endif %}"
    "{{ m['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}agent:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", BOS_ID)])
    assert [tok.token_to_id(s) for s in SPECIALS] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def save_tokenizer(tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "model_max_length": 256, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}, indent=2) + "\n")


def encode_docs(tok, docs: Sequence[C.Example]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids (BOS first, no EOS) and character offsets per document."""
    encs = tok.encode_batch([d.text for d in docs])
    return [(e.ids, e.offsets) for e in encs]


# ---------------------------------------------------------------------------------------------
# language model


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


def _pad(seqs: Sequence[Sequence[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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


PLANTED = tuple(f"{c}{suffix}" for c in C.CONCEPTS for suffix in ("", "_next"))


def plant_directions(d: int, seed: int) -> torch.Tensor:
    """Orthonormal ``[len(PLANTED), d]`` directions (seeded): where the model is trained to write
    each planted concept in layer L's residual stream. Nothing else knows them: the SAE is
    trained unsupervised and its features are matched to concepts on labelled text only."""
    g = torch.Generator().manual_seed(seed + 77)
    q, _ = torch.linalg.qr(torch.randn(d, len(PLANTED), generator=g, dtype=torch.float64))
    return q.T.float().contiguous()


def concept_targets(docs: Sequence[C.Example], enc) -> list[np.ndarray]:
    """Per document a ``[len(ids) + 1, len(PLANTED)]`` 0/1 array (the +1 is the EOS appended for
    training): ``concept`` = the token is part of a mention, ``concept_next`` = the next token
    is the first token of a mention."""
    out = []
    for d, (ids, offsets) in zip(docs, enc):
        cols = []
        for c in C.CONCEPTS:
            inside = np.array(C.token_labels(d, offsets, c) + [False])
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
        ids, mask = _pad([seqs[i] for i in b])
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


# ---------------------------------------------------------------------------------------------
# residuals


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
            ids, _ = _pad([encoded[j] for j in idx])
            model.model(input_ids=ids, use_cache=False)
            x = captured["x"].float()
            for r, j in enumerate(idx):
                out[j] = x[r, :len(encoded[j])].clone()
    finally:
        h.remove()
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# SAE: BatchTopK training, JumpReLU inference (SAELens v6 files)


def train_batchtopk_sae(acts: torch.Tensor, cfg: BuildConfig, seed: int
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """BatchTopK SAE (k active per token on average across the batch, unit-norm decoder rows,
    AuxK loss for dead latents); returns it as a JumpReLU SAE whose scalar threshold is the
    running mean of the smallest activation BatchTopK kept."""
    g = torch.Generator().manual_seed(seed)
    n, d = acts.shape
    m, k = cfg.d_sae, cfg.sae_k
    W_dec = torch.randn(m, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec = torch.nn.Parameter(W_dec)
    b_dec0 = acts[torch.randperm(n, generator=g)[:8192]].median(dim=0).values
    b_enc0 = torch.zeros(m)
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(b_enc0)
    b_dec = torch.nn.Parameter(b_dec0)
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=cfg.sae_lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(m)
    threshold = None
    var = acts.var(dim=0).sum()
    aux_k = 2 * k * 8
    bounds = [int(b) for b in cfg.sae_groups.split(",") if b.strip()] if cfg.sae_groups else []
    assert all(0 < b < m for b in bounds) and bounds == sorted(bounds)
    t0 = time.time()
    hist = []
    for step in range(cfg.sae_steps):
        lr = cfg.sae_lr * min(1.0, (cfg.sae_steps - step) / (0.2 * cfg.sae_steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x = acts[torch.randint(0, n, (cfg.sae_batch,), generator=g)]
        z = torch.relu((x - b_dec) @ W_enc + b_enc)
        flat = z.flatten()
        vals, idx = flat.topk(k * x.shape[0], sorted=False)
        f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(z)
        if bounds:
            # Matryoshka: every prefix of the dictionary reconstructs x on its own
            parts = [f[:, a:b] @ W_dec[a:b] for a, b in zip([0, *bounds], [*bounds, m])]
            partial = b_dec + torch.stack(parts).cumsum(0)
            errs = (x - partial).pow(2).sum(dim=2).mean(dim=1)
            err = x - partial[-1]
            mse = errs[-1]
            loss = errs.mean()
        else:
            err = x - (f @ W_dec + b_dec)
            mse = err.pow(2).sum(dim=1).mean()
            loss = mse
        fired = (f > 0).any(dim=0)
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + x.shape[0])
        dead = since_fired > 200_000
        if dead.any():
            zd = z * dead
            kk = min(aux_k, int(dead.sum()))
            v, i = zd.topk(kk, dim=1)
            fa = torch.zeros_like(zd).scatter(1, i, v)
            aux = (fa @ W_dec - err.detach()).pow(2).sum(dim=1).mean()
            loss = loss + aux / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # keep decoder rows unit norm: remove the radial gradient, renormalise after the step
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            kept_min = vals[vals > 0].min() if (vals > 0).any() else torch.tensor(0.0)
            threshold = kept_min if threshold is None else 0.99 * threshold + 0.01 * kept_min
        hist.append(float(mse.detach()))
        if step % 250 == 0 or step == cfg.sae_steps - 1:
            log(f"sae step {step:4d}/{cfg.sae_steps} fvu {np.mean(hist[-50:]) / float(var):.4f} "
                f"dead {int(dead.sum())} thr {float(threshold):.3f} ({time.time() - t0:.0f}s)")
    thr = torch.full((m,), float(threshold))
    weights = {"W_enc": W_enc.detach(), "b_enc": b_enc.detach(), "W_dec": W_dec.detach(),
               "b_dec": b_dec.detach(), "threshold": thr}
    return weights, {"batchtopk_k": k, "threshold": float(threshold)}


def save_sae(weights: dict[str, torch.Tensor], out: Path, layer: int, extra_meta: dict) -> None:
    """SAELens v6 JumpReLU files (``cfg.json`` + ``sae_weights.safetensors``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in weights.items()},
              str(out / "sae_weights.safetensors"))
    d_in, d_sae = weights["W_enc"].shape
    cfg = {
        "d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12", "sae_lens_training_version": "featurewatch-demo",
            "model_name": MODEL_NAME, "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_layer": layer, "hf_hidden_states_index": layer + 1, "prepend_bos": True,
            "context_size": 256, "dataset_path": "monitor.demo.corpus", **extra_meta,
        },
        "architecture": "jumprelu",
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_demo_sae(path: str | Path):
    """The engine's SAE (``monitor.encode.load_sae``): what the sidecar serves."""
    from monitor.encode import load_sae

    return load_sae(str(path))


# ---------------------------------------------------------------------------------------------
# metrics


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_columns(scores: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``scores [N, M]``."""
    s = scores.numpy()
    return np.array([auroc(s[:, j], labels) for j in range(s.shape[1])])


def threshold_at_fpr(benign_scores: np.ndarray, fpr: float) -> float:
    """A threshold t with P(score >= t | benign) <= fpr (just above the benign quantile)."""
    q = np.quantile(np.asarray(benign_scores, dtype=np.float32), 1.0 - fpr, method="higher")
    return float(np.nextafter(np.float32(q), np.float32(np.inf)))


# ---------------------------------------------------------------------------------------------
# probes


def train_probe(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                l2: float = 1e-3, iters: int = 200) -> tuple[torch.Tensor, float]:
    """Class-balanced L2 logistic regression on standardised inputs (full-batch L-BFGS)."""
    xs = (x - mean) / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos = y.float().mean().clamp(1e-6, 1 - 1e-6)
    wt = torch.where(y, 0.5 / pos, 0.5 / (1 - pos))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        logits = xs @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y.float(), reduction="none") * wt).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


def load_demo_probes(path: str | Path):
    """The engine's probe bank (``monitor.encode.load_probes``): what the sidecar serves."""
    from monitor.encode import load_probes

    return load_probes(str(path))


# ---------------------------------------------------------------------------------------------
# steering: clamp hook, sampling, emission rate, perplexity


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
        ids, mask = _pad(enc, left=True)
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
    return float(np.mean([bool(C.find_mentions(g, concept)) for g in generations]))


@torch.no_grad()
def perplexity(model, encoded: Sequence[Sequence[int]], batch: int = 64) -> float:
    """Token perplexity (EOS target included) of documents."""
    nll, n = 0.0, 0
    for i in range(0, len(encoded), batch):
        seqs = [list(s) + [EOS_ID] for s in encoded[i:i + batch]]
        ids, mask = _pad(seqs)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        tgt = ids[:, 1:]
        m = mask[:, 1:].bool()
        lp = torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
        nll -= float(lp[m].sum())
        n += int(m.sum())
    return math.exp(nll / n)


# ---------------------------------------------------------------------------------------------
# loading the shipped assets


def load_assets(root: str | Path = ASSETS):
    """(model, tokenizer.Tokenizer, sae, probes, manifest) from an assets directory."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    model = LlamaForCausalLM.from_pretrained(str(root / manifest["model"]["path"]),
                                             dtype=torch.float32)
    model.eval()
    tok = Tokenizer.from_file(str(root / manifest["model"]["path"] / "tokenizer.json"))
    sae = load_demo_sae(root / manifest["sae"]["path"])
    probes = load_demo_probes(root / manifest["probes"]["path"])
    return model, tok, sae, probes, manifest


def token_dataset(tok, model, docs: Sequence[C.Example], layer: int):
    """Residuals [N, d] of every token of ``docs`` plus per-concept token labels and doc index."""
    enc = encode_docs(tok, docs)
    res = collect_residuals(model, [e[0] for e in enc], layer)
    x = torch.cat(res)
    labels = {c: np.concatenate([C.token_labels(d, e[1], c) for d, e in zip(docs, enc)])
              for c in C.CONCEPTS}
    doc_idx = np.concatenate([np.full(len(e[0]), i) for i, e in enumerate(enc)])
    return x, labels, doc_idx


def doc_max(scores: np.ndarray, doc_idx: np.ndarray, n_docs: int) -> np.ndarray:
    out = np.full(n_docs, -np.inf)
    np.maximum.at(out, doc_idx, scores)
    return out


# ---------------------------------------------------------------------------------------------
# the build


def _last_residuals(model, tok, prompts: Sequence[str], layer: int) -> torch.Tensor:
    res = collect_residuals(model, [tok.encode(p).ids for p in prompts], layer)
    return torch.stack([r[-1] for r in res])


def _select_steer_features(model, tok, sae, layer: int, concept: str, candidates: Sequence[int],
                           prompts: Sequence[str], ppl_docs: Sequence[Sequence[int]],
                           cfg: BuildConfig, seed: int) -> dict:
    """Greedy on build-time prompts: add the candidate whose clamp (with those already chosen)
    lowers the sampled emission rate most, until the rate falls by ``cfg.steer_target`` or
    ``cfg.steer_max_features`` are chosen. Candidates whose clamp alone raises perplexity on
    concept-free text by more than ``cfg.steer_ppl_guard`` are never considered, and the set
    as a whole stays within twice that."""
    n = cfg.steer_tokens
    ppl0 = perplexity(model, ppl_docs)

    def ppl_with(feats: list[int]) -> float:
        h = ClampHook(model, layer, sae, feats)
        try:
            return perplexity(model, ppl_docs) / ppl0 - 1
        finally:
            h.remove()

    def rate_with(feats: list[int]) -> float:
        h = ClampHook(model, layer, sae, feats)
        try:
            return emission_rate(sample(model, tok, prompts, n, seed), concept)
        finally:
            h.remove()

    rises = {f: ppl_with([f]) for f in candidates}
    pool = [f for f in candidates if rises[f] <= cfg.steer_ppl_guard]
    base = rate_with([])
    chosen: list[int] = []
    rate, rise = base, 0.0
    trace = []
    while len(chosen) < cfg.steer_max_features and rate > base * (1 - cfg.steer_target):
        scored = sorted((rate_with(chosen + [f]), f) for f in pool if f not in chosen)
        if len(chosen) == 0:
            pool = [f for _, f in scored[:cfg.steer_pool]]  # later rounds: the best few only
        step = None
        for r, f in scored:
            if r >= rate:
                break
            set_rise = ppl_with(chosen + [f])
            if set_rise <= 2 * cfg.steer_ppl_guard:
                step = (f, r, set_rise)
                break
        if step is None:
            break
        chosen.append(step[0])
        rate, rise = step[1], step[2]
        trace.append({"features": list(chosen), "emission_rate": rate, "ppl_rise": rise})
        log(f"steer {concept}: clamp {chosen} -> emission {rate:.3f} (base {base:.3f}), "
            f"ppl {100 * rise:+.2f} %")
    return {"features": chosen, "build_emission_rate": base, "build_clamped_rate": rate,
            "build_ppl_rise": rise, "prompts": len(prompts), "tokens": n, "trace": trace,
            "candidates": list(candidates), "rejected_for_ppl": [f for f in candidates
                                                                 if f not in pool and rises[f] > cfg.steer_ppl_guard]}


def build(out: Path, cfg: BuildConfig) -> dict:
    t_start = time.time()
    set_threads(cfg.threads)
    seed = cfg.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    # corpus + tokenizer
    train_docs = C.generate(cfg.lm_docs, seed + TRAIN_SEED_OFFSET)
    directions = plant_directions(cfg.hidden, seed)
    if cfg.from_model:
        from tokenizers import Tokenizer
        from transformers import LlamaForCausalLM

        shutil.copytree(Path(cfg.from_model), tmp / "model")
        tok = Tokenizer.from_file(str(tmp / "model" / "tokenizer.json"))
        model = LlamaForCausalLM.from_pretrained(str(tmp / "model"), dtype=torch.float32).eval()
        enc = encode_docs(tok, train_docs)
        losses, lm_seconds = [float("nan")], 0.0
        log(f"reusing model from {cfg.from_model}")
    else:
        tok = train_tokenizer((d.text for d in train_docs), cfg.vocab_size)
        save_tokenizer(tok, tmp / "model")
        enc = encode_docs(tok, train_docs)
        cf_docs = C.counterfactual(cfg.counterfactual_docs, seed + TRAIN_SEED_OFFSET)
        cf_enc = encode_docs(tok, cf_docs)
        seqs = [ids + [EOS_ID] for ids, _ in enc] + [ids + [EOS_ID] for ids, _ in cf_enc]
        targets = concept_targets(train_docs, enc) + concept_targets(cf_docs, cf_enc)
        ablate = [False] * len(enc) + [True] * len(cf_enc)
        log(f"tokenizer: vocab {tok.get_vocab_size()}, {len(enc)} docs + {len(cf_enc)} "
            f"counterfactual, {sum(map(len, seqs))} tokens")
        model = make_model(cfg, seed)
        log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
        t0 = time.time()
        losses = train_lm(model, seqs, cfg, seed, targets, ablate, directions)
        lm_seconds = time.time() - t0
        model.generation_config.do_sample = True
        model.generation_config.bos_token_id = BOS_ID
        model.generation_config.eos_token_id = EOS_ID
        model.generation_config.pad_token_id = PAD_ID
        model.save_pretrained(str(tmp / "model"), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())

    # residuals for SAE and probes
    res = collect_residuals(model, [ids for ids, _ in enc[:cfg.sae_docs]], cfg.layer)
    acts = torch.cat(res)
    log(f"residuals: {tuple(acts.shape)} at layer {cfg.layer}")
    t0 = time.time()
    sae_weights, sae_meta = train_batchtopk_sae(acts, cfg, seed)
    sae_seconds = time.time() - t0
    save_sae(sae_weights, tmp / f"sae_l{cfg.layer}", cfg.layer,
             {"trained_as": "matryoshka batchtopk" if cfg.sae_groups else "batchtopk",
              "matryoshka_groups": cfg.sae_groups, "batchtopk_k": cfg.sae_k, "seed": seed})
    sae = load_demo_sae(tmp / f"sae_l{cfg.layer}")  # from here on: the engine, as served

    # SAE quality on validation text
    valid_docs = C.generate(cfg.valid_docs, seed + VALID_SEED_OFFSET)
    xv, yv, dv = token_dataset(tok, model, valid_docs, cfg.layer)
    fv = sae.encode(xv)
    recon = sae.decode(fv)
    fvu = float((xv - recon).pow(2).sum() / (xv - xv.mean(0)).pow(2).sum())
    l0 = float((fv > 0).float().sum(1).mean())
    alive = int(((fv > 0).sum(0) > 0).sum())
    venc = encode_docs(tok, valid_docs[:300])
    ppl = perplexity(model, [e[0] for e in venc])
    spliced = _SpliceHook(model, cfg.layer, sae)
    ppl_spliced = perplexity(model, [e[0] for e in venc])
    spliced.remove()
    log(f"sae: fvu {fvu:.4f}, L0 {l0:.1f}, alive {alive}/{cfg.d_sae}; ppl {ppl:.3f} "
        f"-> spliced {ppl_spliced:.3f}")

    # probes: train on training docs' residuals; thresholds at 1 % FPR on benign calibration
    # documents, per document (max over its tokens): rules alert once per request
    probe_docs = train_docs[cfg.sae_docs:cfg.sae_docs + cfg.probe_docs]
    xp, yp, _ = token_dataset(tok, model, probe_docs, cfg.layer)
    mean, scale = xp.mean(0), xp.std(0).clamp_min(1e-4)
    calib = C.concept_free(cfg.calib_docs, seed + CALIB_SEED_OFFSET)
    xc, _, dc = token_dataset(tok, model, calib, cfg.layer)
    doc_labels_v = {c: np.array([d.labels[c] for d in valid_docs]) for c in C.CONCEPTS}
    weights, biases, thresholds, probe_info = [], [], [], {}
    for c in C.CONCEPTS:
        w, b = train_probe(xp, torch.as_tensor(yp[c]), mean, scale)
        weights.append(w)
        biases.append(b)
        sc = torch.sigmoid(((xc - mean) / scale) @ w + b).numpy()
        thr = threshold_at_fpr(doc_max(sc, dc, len(calib)), cfg.fpr)
        thresholds.append(thr)
        sv = torch.sigmoid(((xv - mean) / scale) @ w + b).numpy()
        sv_doc = doc_max(sv, dv, len(valid_docs))
        probe_info[c] = {"valid_token_auroc": auroc(sv, yv[c]),
                         "valid_doc_auroc": auroc(sv_doc, doc_labels_v[c]), "threshold": thr,
                         "valid_token_tpr_at_threshold": float((sv[yv[c]] >= thr).mean()),
                         "valid_doc_tpr_at_threshold":
                             float((sv_doc[doc_labels_v[c]] >= thr).mean())}
        log(f"probe {c}: valid AUROC token {probe_info[c]['valid_token_auroc']:.4f} doc "
            f"{probe_info[c]['valid_doc_auroc']:.4f}, thr {thr:.4f}, doc TPR "
            f"{probe_info[c]['valid_doc_tpr_at_threshold']:.3f}")
    probes_name = f"probes_l{cfg.layer}.safetensors"
    from monitor.encode import save_probes

    save_probes(tmp / probes_name, torch.stack(weights), torch.tensor(biases),
                names=list(C.CONCEPTS), layer=cfg.layer, mean=mean, scale=scale,
                threshold=torch.tensor(thresholds))

    # features per concept: token-level AUROC on validation text
    fc = sae.encode(xc)
    concepts: dict[str, dict] = {}
    steer_prompts = {c: [p.text for p in C.eliciting_prompts(c, cfg.steer_prompts,
                                                             seed + STEER_SEED_OFFSET)]
                     for c in C.CONCEPTS}
    neutral_prompts = [p.text for p in C.eliciting_prompts(None, cfg.steer_prompts,
                                                            seed + STEER_SEED_OFFSET)]
    steer_ppl_docs = [e[0] for e in encode_docs(tok, C.concept_free(150, seed + STEER_SEED_OFFSET))]
    for c in C.CONCEPTS:
        a = auroc_columns(fv, yv[c])
        a = np.nan_to_num(a, nan=0.5)
        top = [int(i) for i in np.argsort(-a, kind="stable")[:8]]
        feats = []
        for i in top:
            doc_scores = doc_max(fv[:, i].numpy(), dv, len(valid_docs))
            benign = fc[:, i].numpy()
            cos = torch.nn.functional.cosine_similarity(
                sae.W_dec[i].float()[None], directions, dim=1)
            feats.append({
                "feature": i, "token_auroc": float(a[i]),
                "doc_auroc": auroc(doc_scores, doc_labels_v[c]),
                "benign_firing_rate": float((benign > 0).mean()),
                # 1 % of benign calibration documents reach it (max over their tokens)
                "suggested_above": threshold_at_fpr(doc_max(benign, dc, len(calib)), cfg.fpr),
                "mean_on_concept": float(fv[yv[c], i].mean()),
                "planted_cosine": {n: round(float(v), 4) for n, v in zip(PLANTED, cos)},
            })
        # the best feature: highest token AUROC, then document AUROC; among features that tie
        # on both (to 3 decimals) the one that fires least often on benign calibration text
        feats.sort(key=lambda f: (-round(f["token_auroc"], 3), -round(f["doc_auroc"], 3),
                                  f["benign_firing_rate"]))
        log(f"{c}: top features " + ", ".join(f"{f['feature']}={f['token_auroc']:.4f}"
                                              for f in feats[:5]))
        # steering candidates: top detectors + the features most raised at the end of build-time
        # eliciting prompts (right before a mention) relative to neutral prompts with the same
        # lead-ins
        f_eli = sae.encode(_last_residuals(model, tok, steer_prompts[c], cfg.layer))
        f_neu = sae.encode(_last_residuals(model, tok, neutral_prompts, cfg.layer))
        lift = (f_eli.mean(0) - f_neu.mean(0)).numpy()
        cands = list(dict.fromkeys([int(i) for i in np.argsort(-lift, kind="stable")[:cfg.steer_candidates]]
                                   + top[:4]))
        steer = _select_steer_features(model, tok, sae, cfg.layer, c, cands, steer_prompts[c],
                                       steer_ppl_docs, cfg, seed + STEER_SEED_OFFSET)
        concepts[c] = {"features": feats, "best_feature": feats[0]["feature"],
                       "steer_features": steer["features"], "steer_selection": steer,
                       "probe": c, "probe_index": C.CONCEPTS.index(c), **{
                           f"probe_{k}": v for k, v in probe_info[c].items()}}

    manifest = {
        "name": MODEL_NAME,
        "description": "Tiny Llama trained on a synthetic support-chat corpus with planted "
                       "concepts (competitor brands, PII), its layer SAE and concept probes.",
        "layer": cfg.layer,
        "hook": f"residual after decoder layer {cfg.layer} (HF hidden_states[{cfg.layer + 1}])",
        "model": {"path": "model", "params": n_params, "lm_final_loss": float(np.mean(losses[-50:])),
                  "valid_perplexity": ppl, "architecture": "LlamaForCausalLM",
                  "hidden_size": cfg.hidden, "num_hidden_layers": cfg.n_layers,
                  "num_attention_heads": cfg.heads, "vocab_size": cfg.vocab_size},
        "sae": {"path": f"sae_l{cfg.layer}", "format": "saelens", "architecture": "jumprelu",
                "trained_as": f"batchtopk k={cfg.sae_k}" + (
                    f", matryoshka prefixes {cfg.sae_groups}" if cfg.sae_groups else ""), "d_in": cfg.hidden, "d_sae": cfg.d_sae,
                "threshold": sae_meta["threshold"], "valid_fvu": fvu, "valid_l0": l0,
                "alive_features": alive, "valid_perplexity_spliced": ppl_spliced},
        "probes": {"path": probes_name, "names": list(C.CONCEPTS), "fpr": cfg.fpr,
                   "threshold_on": "per-token probability, 1 % FPR on benign calibration text"},
        "planted": {"path": "planted_l2.safetensors" if cfg.layer == 2 else
                    f"planted_l{cfg.layer}.safetensors", "names": list(PLANTED),
                    "scale": cfg.concept_scale, "weight": cfg.concept_weight,
                    "counterfactual_docs": cfg.counterfactual_docs,
                    "note": "training target only: the SAE and probes never see these"},
        "concepts": concepts,
        "brands": list(C.BRANDS),
        "seeds": {"build": seed, "train_corpus": seed + TRAIN_SEED_OFFSET,
                  "valid_corpus": seed + VALID_SEED_OFFSET,
                  "calibration_corpus": seed + CALIB_SEED_OFFSET,
                  "steer_prompts": seed + STEER_SEED_OFFSET, "quality_bench_from": seed + 10_000},
        "build": {"threads": cfg.threads, "lm_steps": cfg.lm_steps, "lm_seconds": round(lm_seconds),
                  "sae_steps": cfg.sae_steps, "sae_seconds": round(sae_seconds),
                  "total_seconds": round(time.time() - t_start),
                  "torch": torch.__version__, "command": f"python -m monitor.demo.build --seed {seed}"},
    }
    from safetensors.torch import save_file

    save_file({"directions": directions.contiguous()}, str(tmp / manifest["planted"]["path"]),
              metadata={"names": json.dumps(list(PLANTED)), "layer": str(cfg.layer)})
    manifest["build"]["config"] = {k: v for k, v in dataclasses.asdict(cfg).items()
                                   if k not in ("from_model",)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"done in {time.time() - t_start:.0f}s -> {out}")
    return manifest


class _SpliceHook:
    """Replace the layer output by the SAE reconstruction (for the spliced-perplexity metric)."""

    def __init__(self, model, layer: int, sae) -> None:
        self.sae = sae
        self.handle = layer_module(model, layer).register_forward_hook(self._hook)

    def _hook(self, _m, _inp, output):
        x = output[0] if isinstance(output, tuple) else output
        y = self.sae.decode(self.sae.encode(x.reshape(-1, x.shape[-1]))).reshape(x.shape)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def remove(self) -> None:
        self.handle.remove()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m monitor.demo.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-steps", type=int, default=None)
    p.add_argument("--sae-steps", type=int, default=None)
    p.add_argument("--from-model", default=None,
                   help="development: reuse this model dir (weights + tokenizer), redo the rest")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a BuildConfig field (development)")
    a = p.parse_args(argv)
    cfg = BuildConfig(seed=a.seed, threads=a.threads, from_model=a.from_model)
    for kv in a.set:
        k, v = kv.split("=", 1)
        cur = getattr(cfg, k)
        setattr(cfg, k, (v.lower() in ("1", "true", "yes")) if isinstance(cur, bool)
                else type(cur)(v) if cur is not None else v)
    if a.lm_steps:
        cfg.lm_steps = a.lm_steps
    if a.sae_steps:
        cfg.sae_steps = a.sae_steps
    build(a.out, cfg)


if __name__ == "__main__":
    main()
