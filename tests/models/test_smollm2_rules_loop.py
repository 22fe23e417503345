"""bench/quality.py --model smollm2's rules loop (monitor/models/smollm2/rules_loop.py) on a tiny
synthetic build recording: the feature is picked on the training split, thresholds are set on the
training requests without the concept only, and precision/recall/FPR are counted on the held-out
requests only."""

from __future__ import annotations

import json

import numpy as np
import torch
import yaml

from monitor.demo import build as D
from monitor.encode import load_probes, save_probes
from monitor.models.smollm2 import build as B
from monitor.models.smollm2 import prompts as P
from monitor.models.smollm2 import rules_loop as RL

D_MODEL, LAYER, PROMPT, GEN = 8, 15, 3, 4
FPR = 0.01


def _assets(tmp_path):
    """Feature i reads input dimension i (JumpReLU threshold 0.5; feature 7 never fires); every
    probe reads dimension 7."""
    threshold = torch.full((D_MODEL,), 0.5)
    threshold[7] = 100.0
    w = {"W_enc": torch.eye(D_MODEL), "b_enc": torch.zeros(D_MODEL), "W_dec": torch.eye(D_MODEL),
         "b_dec": torch.zeros(D_MODEL), "threshold": threshold}
    assets = tmp_path / "assets"
    D.save_sae(w, assets / "sae", LAYER, {})
    weight = torch.zeros(len(P.CONCEPTS), D_MODEL)
    weight[:, 7] = 4.0
    save_probes(assets / "probes.safetensors", weight, torch.full((len(P.CONCEPTS),), -2.0), names=list(P.CONCEPTS),
                layer=LAYER, threshold=torch.full((len(P.CONCEPTS),), 0.9))
    (assets / "manifest.json").write_text(json.dumps({"layer": LAYER, "sae": {"path": "sae"},
                                                      "probes": {"path": "probes.safetensors"}}))
    return assets


def _recording(tmp_path):
    """Every prompt of both splits; only code is ever positive. Feature 2 and the probe dimension 7
    carry code in both splits with benign activity of spread strength; 20 held-out neutral requests
    carry strong feature-2 activity that no training request has (calibrating on them would lift
    the threshold above it)."""
    rng = np.random.default_rng(0)
    reqs, acts, truth = [], [], []
    for split in P.SPLITS:
        for kind in P.KINDS:
            for i, p in enumerate(P.prompts(kind, split)):
                x = rng.uniform(0, 0.4, (PROMPT + GEN, D_MODEL)).astype(np.float32)
                gen = x[PROMPT:]
                pos = kind == "code"
                if pos:
                    gen[1, 2] = rng.uniform(3.0, 4.0) if (split == "train" or i % 2) else 0.3  # half the held-out code quiet
                    gen[2, 7] = 2.0
                elif rng.random() < 0.5:
                    gen[0, 2] = rng.uniform(0.6, 2.5)  # benign activity below the code range
                    gen[3, 7] = rng.uniform(0.0, 0.9)
                if split == "heldout" and kind == "neutral" and i < 20:
                    gen[2, 2] = 2.8
                x[:PROMPT, 2] = 9.0  # prompt tokens: outside the rules' scope (generated)
                labels = {c: pos and c == "code" for c in P.CONCEPTS}
                reqs.append(B.Request(p, [1, 2, 3], [4, 5, 6, 7], "length", "", labels, np.zeros((GEN, len(P.CONCEPTS)), bool)))
                acts.append(torch.from_numpy(x))
                truth.append((split, pos, x))
    B.write_recording(tmp_path / "rec", reqs, acts, LAYER, D_MODEL)
    return tmp_path / "rec", truth


def test_rules_are_calibrated_on_training_requests_and_scored_on_held_out(tmp_path):
    assets = _assets(tmp_path)
    rec, truth = _recording(tmp_path)
    res = RL.run(assets, rec, tmp_path / "labels-train.jsonl", tmp_path / "labels-heldout.jsonl", tmp_path / "work", FPR)
    assert res["requests"] == {"train": 278, "heldout": 100, "replayed": 100}
    assert res["skipped"] == [c for c in P.CONCEPTS if c != "code"]
    assert res["features"]["code"]["feature"] == 2
    rows = {r["rule"]: r for r in res["rows"]}
    assert set(rows) == {"code_probe", "code_feature"}

    train_benign = [x for split, pos, x in truth if split == "train" and not pos]
    held = [(pos, x) for split, pos, x in truth if split == "heldout"]
    allowed = len(train_benign) // 100
    probe = load_probes(str(assets / "probes.safetensors"))

    def request_max(x, rule):
        g = torch.from_numpy(x[PROMPT:])
        if rule == "code_feature":
            return float(torch.where(g[:, 2] > 0.5, g[:, 2], 0).max())
        return float(probe.score(g)[:, probe.index("code")].max())

    for name, row in rows.items():
        benign = np.sort([request_max(x, name) for x in train_benign])[::-1]
        # the (allowed+1)-th largest training-benign maximum (a float32 step up at most: the evaluator's rounding)
        assert benign[allowed] <= row["above"] <= np.nextafter(np.float32(benign[allowed]), np.float32(np.inf)), (name, row)
        assert row["train_benign"] == len(train_benign) and row["train_allowed"] == allowed
        assert row["train_benign_fired"] == int((benign > row["above"]).sum()) <= allowed
        fired = [(pos, request_max(x, name) > row["above"]) for pos, x in held]
        tp = sum(p and f for p, f in fired)
        fp = sum(f and not p for p, f in fired)
        positives = sum(p for p, _ in fired)
        assert (row["tp"], row["fp"], row["fn"]) == (tp, fp, positives - tp), (name, row)
        assert row["heldout_fired"] == tp + fp and row["heldout_positive"] == positives == 18
        assert row["fpr"] == fp / (len(held) - positives) and row["recall"] == tp / positives
    # the 20 strong held-out neutral requests fire the feature rule: its threshold never saw them
    assert rows["code_feature"]["above"] < 2.8 and rows["code_feature"]["fp"] >= 20
    assert rows["code_feature"]["recall"] == 0.5  # the quiet half of the held-out code answers is missed
    # what the loop leaves behind is a rules file the sidecar compiles, with the calibrated thresholds
    written = {r["name"]: r["above"] for r in yaml.safe_load((tmp_path / "work" / "rules.yaml").read_text())["rules"]}
    assert written == {name: row["above"] for name, row in rows.items()}
    assert "code_feature | feature #2" in RL.table(res)


def test_overlapping_splits_are_refused(tmp_path):
    assets = _assets(tmp_path)
    rec, _ = _recording(tmp_path)
    both = tmp_path / "both.jsonl"
    both.write_text((tmp_path / "labels-train.jsonl").read_text() + (tmp_path / "labels-heldout.jsonl").read_text())
    try:
        RL.run(assets, rec, both, tmp_path / "labels-heldout.jsonl", tmp_path / "work", FPR)
    except ValueError as exc:
        assert "share 100 request(s)" in str(exc)
    else:
        raise AssertionError("calibrating on held-out requests was not refused")
