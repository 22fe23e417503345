"""Probe banks: file round trip, batched scoring against the per-probe formula, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from monitor.encode import ProbeBank, ProbeFormatError, SAEFormatError, load_probes, save_probes

D, P = 48, 5
NAMES = ["deception", "toxicity", "competitor", "pii", "jailbreak"]


def bank_tensors(gen, calibrated=True, standardise=True) -> dict:
    t = {"weight": torch.randn(P, D, generator=gen) * 0.3, "bias": torch.randn(P, generator=gen)}
    if standardise:
        t["mean"] = torch.randn(D, generator=gen)
        t["scale"] = torch.rand(D, generator=gen) + 0.5
    if calibrated:
        t["platt_a"] = torch.rand(P, generator=gen) + 0.5
        t["platt_b"] = torch.randn(P, generator=gen)
    t["threshold"] = torch.rand(P, generator=gen)
    return t


def reference(t: dict, x: torch.Tensor) -> torch.Tensor:
    """Probe by probe, the way the file format is specified."""
    cols = []
    for p in range(P):
        z = x
        if "mean" in t:
            z = (z - t["mean"]) / t["scale"]
        logit = z @ t["weight"][p] + t["bias"][p]
        if "platt_a" in t:
            logit = t["platt_a"][p] * logit + t["platt_b"][p]
        cols.append(torch.sigmoid(logit))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("calibrated", [True, False])
@pytest.mark.parametrize("standardise", [True, False])
def test_round_trip_and_scores(tmp_path, gen, calibrated, standardise):
    t = bank_tensors(gen, calibrated, standardise)
    path = save_probes(tmp_path / "probes_l7.safetensors", names=NAMES, layer=7, **t)
    bank = load_probes(path)
    assert isinstance(bank, ProbeBank)
    assert (bank.names, bank.layer, bank.d_in, bank.n_probes, bank.calibrated) == (NAMES, 7, D, P, calibrated)
    x = torch.randn(2, 30, D, generator=gen) * 2
    scores = bank.score(x)
    assert scores.shape == (60, P) and scores.dtype == torch.float32
    assert float((scores - reference(t, x.reshape(-1, D))).abs().max()) <= 1e-5
    assert torch.equal(bank.decide(scores), scores >= t["threshold"])
    assert bank.index("pii") == 3
    with pytest.raises(KeyError):
        bank.index("nope")
    bank.save(tmp_path / "again.safetensors")
    assert torch.equal(load_probes(tmp_path / "again.safetensors").score(x), scores)
    assert torch.equal(bank.score(x.to(torch.bfloat16)), bank.score(x.to(torch.bfloat16).float()))


def test_default_decision_threshold(tmp_path, gen):
    t = bank_tensors(gen)
    t.pop("threshold")
    bank = load_probes(save_probes(tmp_path / "p.safetensors", names=NAMES, layer=0, **t))
    s = torch.tensor([[0.2, 0.5, 0.7, 0.49, 0.51]])
    assert bank.decide(s).tolist() == [[False, True, True, False, True]]


def test_metadata_layout(tmp_path, gen):
    """The file is plain safetensors with JSON names and a layer string, readable by anyone."""
    from safetensors import safe_open

    path = save_probes(tmp_path / "p.safetensors", names=NAMES, layer=12, **bank_tensors(gen))
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["names"]) == NAMES and f.metadata()["layer"] == "12"
        assert set(f.keys()) == {"weight", "bias", "mean", "scale", "platt_a", "platt_b", "threshold"}


def write_raw(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t, m: m.pop("names"), "no 'names'"),
        (lambda t, m: m.update(names="[not json"), "not JSON"),
        (lambda t, m: m.update(names=json.dumps(NAMES[:3])), "3 names for 5 probes"),
        (lambda t, m: m.update(names=json.dumps(["a"] * 5)), "not unique"),
        (lambda t, m: m.pop("layer"), "no 'layer'"),
        (lambda t, m: m.update(layer="twelve"), "'layer' is not an integer"),
        (lambda t, m: t.update(bias=torch.zeros(P + 1)), r"bias has shape \[6\]"),
        (lambda t, m: t.update(mean=torch.zeros(D - 1)), "mean has shape"),
        (lambda t, m: t.pop("platt_b"), "platt_a and platt_b must come together"),
        (lambda t, m: t.update(scale=torch.zeros(D)), "scale contains zeros"),
        (lambda t, m: t["weight"].__setitem__((0, 0), float("nan")), "weight contains NaN"),
        (lambda t, m: t.pop("weight"), "missing tensor weight"),
        (lambda t, m: t.update(extra=torch.zeros(1)), "unexpected tensor"),
        (lambda t, m: t.update(weight=torch.zeros(P, D, dtype=torch.int32)), "not a floating-point"),
    ],
)
def test_refusals(tmp_path, gen, mutate, match):
    t = bank_tensors(gen)
    meta = {"names": json.dumps(NAMES), "layer": "3"}
    mutate(t, meta)
    path = write_raw(tmp_path / "bad.safetensors", t, meta)
    with pytest.raises(ProbeFormatError, match=match) as e:
        load_probes(path)
    assert isinstance(e.value, SAEFormatError) and e.value.path == str(path)


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"nope")
    with pytest.raises(ProbeFormatError, match="not a readable safetensors"):
        load_probes(tmp_path / "x.safetensors")
    with pytest.raises(ProbeFormatError, match="no such file"):
        load_probes(tmp_path / "missing.safetensors")


def test_writer_validates_before_writing(tmp_path, gen):
    with pytest.raises(ProbeFormatError, match="2 names for 5 probes"):
        save_probes(tmp_path / "p.safetensors", names=["a", "b"], layer=1, **bank_tensors(gen))
    assert not (tmp_path / "p.safetensors").exists()
