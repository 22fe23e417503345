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

The steps live one per module, shared with ``bench/quality.py``, the SmolLM2 build and the tests:
:mod:`~monitor.demo.build_config` (settings, seeds), :mod:`~monitor.demo.tokenizer`,
:mod:`~monitor.demo.lm` (the planted LM, residuals), :mod:`~monitor.demo.sae_training`,
:mod:`~monitor.demo.scoring` (AUROC, thresholds, probes), :mod:`~monitor.demo.generation` (the clamp
hook, sampling, emission, perplexity) and :mod:`~monitor.demo.shipped` (loading the assets); this
module runs them in order and writes the manifest.
"""


from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from monitor.demo import corpus as C
from monitor.demo.corpus_templates import BRANDS, CONCEPTS
from monitor.demo.build_config import ASSETS, BuildConfig, CALIB_SEED_OFFSET, MODEL_NAME, STEER_SEED_OFFSET, TRAIN_SEED_OFFSET, VALID_SEED_OFFSET, log, set_threads
from monitor.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode_docs, save_tokenizer, train_tokenizer
from monitor.demo.lm import PLANTED, collect_residuals, concept_targets, layer_module, make_model, plant_directions, train_lm
from monitor.demo.sae_training import load_demo_sae, save_sae, train_batchtopk_sae
from monitor.demo.scoring import auroc, auroc_columns, threshold_at_fpr, train_probe
from monitor.demo.generation import ClampHook, emission_rate, perplexity, sample
from monitor.demo.shipped import doc_max, token_dataset


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
    doc_labels_v = {c: np.array([d.labels[c] for d in valid_docs]) for c in CONCEPTS}
    weights, biases, thresholds, probe_info = [], [], [], {}
    for c in CONCEPTS:
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
                names=list(CONCEPTS), layer=cfg.layer, mean=mean, scale=scale,
                threshold=torch.tensor(thresholds))

    # features per concept: token-level AUROC on validation text
    fc = sae.encode(xc)
    concepts: dict[str, dict] = {}
    steer_prompts = {c: [p.text for p in C.eliciting_prompts(c, cfg.steer_prompts,
                                                             seed + STEER_SEED_OFFSET)]
                     for c in CONCEPTS}
    neutral_prompts = [p.text for p in C.eliciting_prompts(None, cfg.steer_prompts,
                                                            seed + STEER_SEED_OFFSET)]
    steer_ppl_docs = [e[0] for e in encode_docs(tok, C.concept_free(150, seed + STEER_SEED_OFFSET))]
    for c in CONCEPTS:
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
                       "probe": c, "probe_index": CONCEPTS.index(c), **{
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
        "probes": {"path": probes_name, "names": list(CONCEPTS), "fpr": cfg.fpr,
                   "threshold_on": "per-token probability, 1 % FPR on benign calibration text"},
        "planted": {"path": "planted_l2.safetensors" if cfg.layer == 2 else
                    f"planted_l{cfg.layer}.safetensors", "names": list(PLANTED),
                    "scale": cfg.concept_scale, "weight": cfg.concept_weight,
                    "counterfactual_docs": cfg.counterfactual_docs,
                    "note": "training target only: the SAE and probes never see these"},
        "concepts": concepts,
        "brands": list(BRANDS),
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
