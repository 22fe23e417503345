"""The rules `featurewatch demo --model smollm2` puts in force compile against the shipped SAE and
probes (what the sidecar does with them), at the shipped probe thresholds, and the held-out
subsets it sends are spread over templates without repeats. No model needed."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from monitor.cli import app
from monitor.models.smollm2 import prompts as P
from monitor.models.smollm2.demo import ASSETS, STEER_FEATURES, heldout_subset, shipped_rules


def test_the_demo_rules_compile_against_the_shipped_sae_and_probes(tmp_path):
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    config = {"model_name": "smollm2-135m-instruct", "socket": str(tmp_path / "fw.sock"),
              "sources": [{"name": "demo_sae", "kind": "sae", "layer": manifest["layer"],
                           "path": str(ASSETS / manifest["sae"]["path"])},
                          {"name": "demo_probes", "kind": "probes", "layer": manifest["layer"],
                           "path": str(ASSETS / manifest["probes"]["path"])}]}
    (tmp_path / "featurewatch.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "rules.yaml").write_text(shipped_rules())
    result = CliRunner().invoke(app, ["rules", "validate", str(tmp_path / "rules.yaml"), "--config",
                                      str(tmp_path / "featurewatch.yaml")])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(shipped_rules())
    shipped = {r["name"]: r["threshold"] for r in manifest["probes"]["train_reports"]}
    assert {r["signal"]["probe"]: r["above"] for r in spec["rules"]} == pytest.approx(shipped, rel=1e-6)
    assert {p["name"]: p["selector"] for p in spec["policies"]} == {f"suppress_{c}": {"suppress": c} for c in P.CONCEPTS}
    for p in spec["policies"]:
        concept = p["selector"]["suppress"]
        assert [a["clamp"]["feature"] for a in p["steer"]] == list(STEER_FEATURES[concept])
        assert all(a["clamp"]["value"] == 0.0 and a["clamp"]["source"] == "demo_sae" for a in p["steer"])
    assert yaml.safe_load(shipped_rules(suppress=False))["policies"] == []


def test_heldout_subsets_are_spread_and_distinct():
    for kind in P.KINDS:
        every = P.prompts(kind, "heldout")
        for n in (1, 8, len(every), len(every) + 5):
            sub = heldout_subset(kind, n)
            assert len(sub) == min(n, len(every)) and len({p.user for p in sub}) == len(sub)
            assert all(p.split == "heldout" for p in sub)
        assert len({p.template for p in heldout_subset(kind, 8)}) == len({p.template for p in every})
