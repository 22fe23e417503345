"""Pieces of the SmolLM2 build that can be checked without training: the scale fold, the
training rows, and the labelled recording the authoring commands read."""

from __future__ import annotations

import json

import numpy as np
import torch

from monitor.models.smollm2 import build as B
from monitor.models.smollm2 import prompts as P


def test_folding_the_input_scale_serves_what_was_trained_on_scaled_inputs():
    g = torch.Generator().manual_seed(0)
    d, m, s = 8, 16, 0.137
    w = {"W_enc": torch.randn(d, m, generator=g), "b_enc": torch.randn(m, generator=g),
         "W_dec": torch.randn(m, d, generator=g), "b_dec": torch.randn(d, generator=g), "threshold": torch.full((m,), 0.3)}
    x = torch.randn(32, d, generator=g) * 50

    def run(w, x):
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        f = pre * (pre > w["threshold"])
        return f, f @ w["W_dec"] + w["b_dec"]

    f_scaled, rec_scaled = run(w, x * s)
    f, rec = run(B.fold_scale(w, s), x)
    assert torch.allclose(f, f_scaled, atol=1e-4) and bool((f > 0).any())
    assert torch.allclose(rec, rec_scaled / s, atol=1e-3)


def test_training_rows_keep_the_shared_prefix_once_and_drop_position_zero():
    acts = [torch.arange(5.0)[:, None] + 10 * i for i in range(3)]
    reqs = [[1, 2, 3, 7 + i, 9] for i in range(3)]
    prefix = B.common_prefix(reqs)
    assert prefix == 3
    rows = B.sae_rows([], acts, prefix)
    assert rows[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 13.0, 14.0, 23.0, 24.0]


def test_runs():
    assert B._runs(np.array([3, 4, 5, 9, 11, 12])) == [[3, 6], [9, 10], [11, 13]]
    assert B._runs(np.array([], dtype=np.int64)) == []


def test_the_recording_carries_labels_the_authoring_commands_read(tmp_path):
    from monitor.author.sets import read_labels
    from monitor.record import Recording

    prompts = [P.prompts("pii", "train")[0], P.prompts("neutral", "heldout")[0]]
    reqs, acts = [], []
    for k, p in enumerate(prompts):
        n_out = 4
        tl = np.zeros((n_out, len(P.CONCEPTS)), bool)
        if k == 0:
            tl[1:3, P.CONCEPTS.index("pii")] = True
        reqs.append(B.Request(p, [1, 2, 3], [10, 11, 12, 2], "stop", "x", {c: bool(k == 0 and c == "pii")
                                                                           for c in P.CONCEPTS}, tl))
        acts.append(torch.randn(7, 6))
    B.write_recording(tmp_path / "rec", reqs, acts, 15, 6)
    rec = Recording.open(tmp_path / "rec")
    assert rec.manifest.model_name == B.MODEL_NAME and rec.manifest.layers == [15]
    got = list(rec.iter_requests(layers=[15]))
    assert [r.request_id for r in got] == [reqs[0].request_id, reqs[1].request_id]
    assert got[0].metadata["split"] == "train" and got[0].metadata["labels"]["pii"] is True
    assert got[0].metadata["label_positions"]["pii"] == [[4, 6]]  # prompt of 3 tokens, answer tokens 1-2
    assert got[0].generated.tolist() == [False] * 3 + [True] * 4
    assert torch.equal(got[1].activations[15], acts[1])
    labels = read_labels(tmp_path / "labels-train.jsonl")
    assert labels == {reqs[0].request_id: ["pii"]}
    assert json.loads((tmp_path / "labels-heldout.jsonl").read_text())["label"] == []
