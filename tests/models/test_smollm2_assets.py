"""The shipped SmolLM2 SAE and probes: SAELens and featurewatch load the same SAE, the probes
name the concepts, and the manifest carries the measured numbers."""

from __future__ import annotations

import json

import pytest
import torch

from monitor.models.smollm2 import prompts as P
from monitor.models.smollm2.build import ASSETS

sae_lens = pytest.importorskip("sae_lens")


def _manifest() -> dict:
    return json.loads((ASSETS / "manifest.json").read_text())


def test_both_loaders_read_the_shipped_sae_alike():
    from monitor.encode import load_sae

    m = _manifest()
    path = ASSETS / m["sae"]["path"]
    ours = load_sae(str(path))
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    assert ours.architecture == theirs.cfg.architecture() == "jumprelu"
    assert (ours.d_in, ours.d_sae) == (576, m["sae"]["d_sae"])
    assert ours.metadata["hook_layer"] == m["layer"] == 15
    g = torch.Generator().manual_seed(0)
    # residual-like inputs: the decoder's own directions at a realistic norm, plus noise
    x = torch.randn(64, ours.d_sae, generator=g).relu() @ theirs.W_dec.detach() * 3 + torch.randn(64, 576, generator=g)
    with torch.no_grad():
        f_theirs = theirs.encode(x)
        assert (f_theirs > 0).any()
        assert torch.allclose(ours.encode(x), f_theirs, atol=1e-4, rtol=1e-4)
        assert torch.allclose(ours.decode(ours.encode(x)), theirs.decode(f_theirs), atol=1e-4, rtol=1e-4)


def test_the_probes_name_every_concept_at_the_sae_layer():
    from monitor.encode import load_probes

    m = _manifest()
    bank = load_probes(str(ASSETS / m["probes"]["path"]))
    assert bank.names == list(P.CONCEPTS)
    assert bank.layer == m["layer"] and bank.d_in == 576
    assert bank.threshold is not None and bool(((bank.threshold > 0) & (bank.threshold < 1)).all())


def test_the_manifest_reports_the_measured_quality():
    m = _manifest()
    s = m["sae"]
    assert 0 < s["fvu_heldout"] < 1 and 0 < s["l0_heldout"] <= s["d_sae"]
    assert 0 <= s["dead_features"] < s["d_sae"]
    assert m["perplexity"]["sae_spliced"] >= m["perplexity"]["clean"] > 1
    sizes = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert sizes <= 20 * 2**20  # ships in the repository
