"""Detection quality of the SmolLM2 SAE and probes on the held-out prompts, per request.

Reads the build's recording (monitor/record's reader) and the shipped assets; everything is scored
per request as the sidecar's rules see it: the maximum over the request's generated tokens.

- probe: the bank trained by the authoring code on the training split (build.py); AUROC on the
  held-out split, TPR at 1 % FPR (the ROC point: threshold just above all but 1 % of the held-out
  negatives), and TPR/FPR at the bank's own threshold (set inside the training split);
- best SAE feature: ranked with the authoring code (`features compare`: per-request maxima, AUROC)
  on the **training** split, then measured on the held-out split; its gap to the probe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from monitor.models.smollm2 import prompts as P

FPR = 0.01


def _load(recording: Path, layer: int):
    from monitor.record import Recording

    rec = Recording.open(recording)
    out = []
    for r in rec.iter_requests(layers=[layer]):
        out.append(r)
    return out


@torch.no_grad()
def evaluate(assets: Path, recording: Path) -> dict:
    from monitor.author.compare import rank, request_maxima
    from monitor.author.stats import auroc, probe_threshold_at_fpr
    from monitor.encode import load_probes, load_sae

    manifest = json.loads((assets / "manifest.json").read_text())
    layer = manifest["layer"]
    sae = load_sae(str(assets / manifest["sae"]["path"]))
    bank = load_probes(str(assets / manifest["probes"]["path"]))
    reqs = [r for r in _load(recording, layer) if r.generated.any()]
    split = np.array([r.metadata["split"] for r in reqs])
    labels = {c: np.array([bool(r.metadata["labels"][c]) for r in reqs]) for c in P.CONCEPTS}
    probe = np.stack([bank.score(r.activations[layer][torch.from_numpy(r.generated)]).amax(0).numpy()
                      for r in reqs])
    ids = [r.request_id for r in reqs]
    got_ids, feats = request_maxima(sae, reqs, layer, "generated", set(ids))
    assert got_ids == ids
    tr, ho = split == "train", split == "heldout"
    rows = []
    for j, c in enumerate(P.CONCEPTS):
        y = labels[c]
        if not all(((m & y).any(), (m & ~y).any()) == (True, True) for m in (tr, ho)):
            rows.append({"concept": c, "missing": "no positive or no negative request in a split",
                         "heldout_positive": int((ho & y).sum()), "train_positive": int((tr & y).sum())})
            continue
        p_pos, p_neg = probe[ho & y, bank.index(c)], probe[ho & ~y, bank.index(c)]
        t = probe_threshold_at_fpr(p_neg, FPR)
        top = rank(feats[tr & y], feats[tr & ~y], top=3, fpr=FPR)
        best = top[0]
        f_pos, f_neg = feats[ho & y, best.feature], feats[ho & ~y, best.feature]
        p_auc, f_auc = float(auroc(p_pos, p_neg)), float(auroc(f_pos, f_neg))
        thr = float(bank.threshold[bank.index(c)]) if bank.threshold is not None else 0.5
        rows.append({
            "concept": c, "heldout_positive": int(len(p_pos)), "heldout_negative": int(len(p_neg)),
            "train_positive": int((tr & y).sum()), "train_negative": int((tr & ~y).sum()),
            "probe_auroc": p_auc, "probe_tpr_at_1pct_fpr": float((p_pos >= t).mean()),
            "probe_threshold": thr, "probe_tpr_at_threshold": float((p_pos >= thr).mean()),
            "probe_fpr_at_threshold": float((p_neg >= thr).mean()),
            "feature": best.feature, "feature_train_auroc": best.auroc, "feature_auroc": f_auc,
            "gap": p_auc - f_auc, "train_top_features": [t.feature for t in top],
        })
    return {"layer": layer, "requests": {"train": int(tr.sum()), "heldout": int(ho.sum())}, "rows": rows,
            "sae": manifest["sae"], "perplexity": manifest["perplexity"]}


def table(res: dict) -> str:
    lines = ["| concept | held-out pos/neg | probe AUROC | probe TPR @ 1 % FPR | probe TPR / FPR at its threshold "
             "| best SAE feature (train AUROC) | feature AUROC | gap |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "missing" in r:
            lines.append(f"| {r['concept']} | {r['missing']} (train {r['train_positive']}, held-out "
                         f"{r['heldout_positive']} positive) | | | | | | |")
            continue
        lines.append(f"| {r['concept']} | {r['heldout_positive']}/{r['heldout_negative']} | {r['probe_auroc']:.4f} "
                     f"| {r['probe_tpr_at_1pct_fpr']:.1%} | {r['probe_tpr_at_threshold']:.1%} / "
                     f"{r['probe_fpr_at_threshold']:.1%} | #{r['feature']} ({r['feature_train_auroc']:.4f}) "
                     f"| {r['feature_auroc']:.4f} | {r['gap']:+.4f} |")
    s, ppl = res["sae"], res["perplexity"]
    lines.append("")
    lines.append(f"SAE layer {res['layer']}: d_sae {s['d_sae']}, held-out FVU {s['fvu_heldout']:.4f}, "
                 f"L0 {s['l0_heldout']:.1f}, dead {s['dead_features']} ({s['dead_fraction']:.1%}); perplexity on "
                 f"concept-free held-out text {ppl['clean']:.3f} clean, {ppl['sae_spliced']:.3f} with the SAE "
                 f"spliced in ({ppl['sae_spliced'] / ppl['clean'] - 1:+.1%}; {ppl['tokens']} tokens)")
    return "\n".join(lines)


def steering(assets: Path, recording: Path, res: dict, n_features: int, max_new_tokens: int) -> list[dict]:
    """Suppression of each concept by clamping its training-split top features (steer.py)."""
    from monitor.encode import load_sae
    from monitor.models.fetch import fetch
    from monitor.models.smollm2 import steer as S
    from monitor.models.smollm2.residuals import load_model

    manifest = json.loads((assets / "manifest.json").read_text())
    sae = load_sae(str(assets / manifest["sae"]["path"]))
    model, tok = load_model(str(fetch("smollm2")))
    # the build's concept-free text: held-out neutral prompts with the model's answers (answers scored) + plain passages
    seqs = [(r.token_ids.tolist(), r.prompt_tokens) for r in _load(recording, res["layer"])
            if r.metadata["split"] == "heldout" and r.metadata["kind"] == "neutral"
            and not any(r.metadata["labels"].values()) and r.generated.any()]
    seqs += [(tok(t, add_special_tokens=False)["input_ids"], 1) for t in P.PLAIN_TEXT]
    out = []
    for r in res["rows"]:
        if "missing" in r:
            continue
        out.append(S.measure(model, tok, sae, res["layer"], r["concept"], r["train_top_features"][:n_features], seqs,
                             max_new_tokens))
    return out


def steering_table(rows: list[dict]) -> str:
    lines = ["| concept | clamped features | emission before → after (held-out eliciting prompts) | cut "
             "| perplexity before → after (concept-free) | rise |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concept']} | {', '.join('#' + str(f) for f in r['features'])} | {r['emission_before']:.1%} "
                     f"→ {r['emission_after']:.1%} (n={r['prompts']}) | {r['emission_cut']:.1%} | {r['ppl_before']:.3f} "
                     f"→ {r['ppl_after']:.3f} | {r['ppl_rise']:+.1%} |")
    return "\n".join(lines)


def direction_steering(assets: Path, recording: Path, res: dict, alphas: list[float], max_new_tokens: int) -> list[dict]:
    """Suppression along each concept's probe direction (steer.direction_measure), the step size
    in units of the layer's median residual norm over the training split's generated tokens."""
    from monitor.models.fetch import fetch
    from monitor.models.smollm2 import steer as S
    from monitor.models.smollm2.residuals import load_model

    manifest = json.loads((assets / "manifest.json").read_text())
    layer = res["layer"]
    model, tok = load_model(str(fetch("smollm2")))
    reqs = _load(recording, layer)
    norm = float(torch.cat([r.activations[layer][torch.from_numpy(r.generated)] for r in reqs
                            if r.metadata["split"] == "train"]).norm(dim=1).median())
    seqs = [(r.token_ids.tolist(), r.prompt_tokens) for r in reqs
            if r.metadata["split"] == "heldout" and r.metadata["kind"] == "neutral"
            and not any(r.metadata["labels"].values()) and r.generated.any()]
    seqs += [(tok(t, add_special_tokens=False)["input_ids"], 1) for t in P.PLAIN_TEXT]
    probe_path = str(assets / manifest["probes"]["path"])
    return [S.direction_measure(model, tok, layer, c, S.probe_direction(probe_path, c), norm, alphas, seqs,
                                max_new_tokens) for c in P.CONCEPTS]


def direction_table(rows: list[dict]) -> str:
    lines = ["| concept | step (× median residual norm, chosen on training prompts) | emission before → after (held-out) "
             "| cut | perplexity rise |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concept']} | {r['alpha']} (× {r['norm']:.0f}) | {r['emission_before']:.1%} → "
                     f"{r['emission_after']:.1%} (n={r['prompts']}) | {r['emission_cut']:.1%} | {r['ppl_rise']:+.1%} |")
    return "\n".join(lines)
