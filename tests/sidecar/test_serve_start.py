"""`featurewatch serve` refuses an unusable config with one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.sidecar import fixture_config

D = 64
REPO = Path(__file__).resolve().parents[2]


def serve(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "featurewatch.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "monitor.cli", "serve", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case, expected", [
    ("redis_url", "store.url: cannot use 'http://***@cache:6379/0'"),
    ("missing_sae", "no-such-sae"),
])
def test_unusable_config_is_one_line_and_exit_2(tmp_path, case, expected):
    config = fixture_config(tmp_path, D)
    if case == "redis_url":
        config["store"] = {"kind": "redis", "url": "http://:secret@cache:6379/0"}
    else:
        config["sources"][0]["path"] = str(tmp_path / "no-such-sae")
    result = serve(tmp_path, config)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "secret" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
