"""bench/quality.py --model smollm2's evaluation: the SAE feature is chosen on the training split
only, and every number is per request on the held-out split."""

from __future__ import annotations

import json

import numpy as np
import torch

from monitor.demo.sae_training import save_sae
from monitor.encode import save_probes
from monitor.models.smollm2 import build as B
from monitor.models.smollm2 import prompts as P
from monitor.models.smollm2 import quality as Q

D_MODEL, LAYER = 8, 15


def _assets(tmp_path):
    """An identity-like SAE: feature i reads input dimension i (threshold 0.5); a probe bank
    reading dimension 7 for every concept."""
    d_sae = 8
    w = {"W_enc": torch.eye(D_MODEL, d_sae), "b_enc": torch.zeros(d_sae), "W_dec": torch.eye(d_sae, D_MODEL),
         "b_dec": torch.zeros(D_MODEL), "threshold": torch.full((d_sae,), 0.5)}
    assets = tmp_path / "assets"
    save_sae(w, assets / "sae", LAYER, {})
    weight = torch.zeros(len(P.CONCEPTS), D_MODEL)
    weight[:, 7] = 4.0
    save_probes(assets / "probes.safetensors", weight, torch.full((len(P.CONCEPTS),), -2.0), names=list(P.CONCEPTS),
                layer=LAYER, threshold=torch.full((len(P.CONCEPTS),), 0.5))
    manifest = {"layer": LAYER, "sae": {"path": "sae", "d_sae": d_sae, "fvu_heldout": 0.1, "l0_heldout": 2.0,
                                        "dead_features": 0, "dead_fraction": 0.0},
                "probes": {"path": "probes.safetensors"}, "perplexity": {"tokens": 1, "clean": 2.0, "sae_spliced": 2.2}}
    (assets / "manifest.json").write_text(json.dumps(manifest))
    return assets


def test_the_feature_is_chosen_on_training_requests_and_measured_on_held_out(tmp_path):
    g = torch.Generator().manual_seed(0)
    reqs, acts = [], []
    for split in P.SPLITS:
        for kind in ("code", "neutral"):
            for p in P.prompts(kind, split)[:12]:
                pos = kind == "code"
                x = torch.rand(6, D_MODEL, generator=g) * 0.4  # below every threshold
                gen = x[3:]
                # feature 2 separates code on the training split only, feature 5 on the held-out split only
                if pos and split == "train":
                    gen[1, 2] = 3.0
                if pos and split == "heldout":
                    gen[1, 5] = 3.0
                if pos:
                    gen[0, 7] = 2.0  # the probe sees code everywhere
                labels = {c: (pos and c == "code") for c in P.CONCEPTS}
                reqs.append(B.Request(p, [1, 2, 3], [4, 5, 6], "length", "", labels,
                                      np.zeros((3, len(P.CONCEPTS)), bool)))
                acts.append(x)
    B.write_recording(tmp_path / "rec", reqs, acts, LAYER, D_MODEL)
    res = Q.evaluate(_assets(tmp_path), tmp_path / "rec")
    code = next(r for r in res["rows"] if r["concept"] == "code")
    assert code["feature"] == 2 and code["feature_train_auroc"] == 1.0
    assert code["feature_auroc"] == 0.5  # feature 2 never fires on held-out requests: chosen without them
    assert code["probe_auroc"] == 1.0 and code["probe_tpr_at_1pct_fpr"] == 1.0
    assert (code["heldout_positive"], code["heldout_negative"]) == (12, 12)
    assert code["gap"] == 0.5
    assert "| code | 12/12 | 1.0000 | 100.0% |" in Q.table(res)
    pii = next(r for r in res["rows"] if r["concept"] == "pii")  # no positive anywhere: reported, not a crash
    assert pii["missing"] and pii["train_positive"] == 0 and "| pii | no positive" in Q.table(res)
