"""`featurewatch record ls|show` on a recording written by the recorder's writer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from monitor.cli import app
from monitor.record.format import Manifest, shard_files
from monitor.record.writer import RecordingDir, ShardBuilder, request_row
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction, write_probe_bank, write_saelens_jumprelu

D = 64
TOKENIZER = Path(__file__).resolve().parents[2] / "monitor" / "demo" / "assets" / "model"
runner = CliRunner()


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    from monitor.record import cli

    monkeypatch.setattr(cli.console, "width", 250)


def make_recording(root: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    rd = RecordingDir(root).open()
    rd.ensure_manifest(Manifest(model_name="demo", d_model=D, layers=[1], dtype="float32", created_unix_s=time.time(),
                                sidecar={"rules_version": 2, "sources": {"sae": {"kind": "sae", "layer": 1, "path": "x"}}}))
    for shard, (rid, prompt, answer, fired) in enumerate([("r1", "hello world", "the model", True),
                                                          ("r2", "good morning", "a day", False)]):
        b = ShardBuilder([1])
        ids = tok.encode(prompt).ids + tok.encode(answer, add_special_tokens=False).ids
        n_prompt = len(tok.encode(prompt).ids)
        acts = torch.randn(1, len(ids), D, generator=torch.Generator().manual_seed(shard)) * 0.05
        if fired:
            acts[0, -1] += 10 * torch.from_numpy(planted_direction(D))
        positions = np.arange(len(ids), dtype=np.int64)
        b.add(request_row(rid, f"cmpl-{rid}", {"tenant": "a"}, n_prompt, len(ids) - n_prompt, "stop",
                          ["planted_feature"] if fired else [], [len(ids) - 1] if fired else [],
                          "rule" if fired else "sample"), acts, positions, np.array(ids, np.int64), positions >= n_prompt)
        rd.write(b)
    rd.close()


def test_ls_reports_shards_and_an_incomplete_one(tmp_path):
    make_recording(tmp_path / "rec")
    (tmp_path / "rec" / "shard-000003.safetensors").write_bytes(b"partial")
    result = runner.invoke(app, ["record", "ls", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "model demo, d_model 64, layers [1]" in out and "rules version 2" in out
    assert "incomplete" in out and "2 requests" in out and "planted_feature 1" in out


def test_show_lists_requests_with_text_and_one_request_with_features(tmp_path):
    make_recording(tmp_path / "rec")
    result = runner.invoke(app, ["record", "show", str(tmp_path / "rec"), "--tokenizer", str(TOKENIZER)])
    assert result.exit_code == 0, result.output
    assert "cmpl-r1" in result.output and "the model" in result.output and "a day" in result.output
    sae = write_saelens_jumprelu(tmp_path / "sae", D)
    probes = write_probe_bank(tmp_path / "probes.safetensors", D)
    result = runner.invoke(app, ["record", "show", str(tmp_path / "rec"), "--request", "cmpl-r1", "--tokenizer",
                                 str(TOKENIZER), "--sae", str(sae), "--probes", str(probes)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rules fired: planted_feature" in out and "generated: the model" in out
    last_row = [line for line in out.splitlines() if "⚑" in line]
    assert len(last_row) == 1 and f"{PLANTED_FEATURE}:" in last_row[0]  # the planted feature tops the firing token


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["record", "ls", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "recording.json: missing" in result.output and "Traceback" not in result.output
    make_recording(tmp_path / "rec")
    result = runner.invoke(app, ["record", "show", str(tmp_path / "rec"), "--request", "nope"])
    assert result.exit_code == 1 and "no request 'nope'" in result.output
    other = write_saelens_jumprelu(tmp_path / "sae32", 32)
    result = runner.invoke(app, ["record", "show", str(tmp_path / "rec"), "--request", "r1", "--sae", str(other)])
    assert result.exit_code == 2 and "needs d_model 32, but the recording" in result.output
    st = shard_files(tmp_path / "rec", 1)["safetensors"]
    st.write_bytes(st.read_bytes()[:100])
    result = runner.invoke(app, ["record", "show", str(tmp_path / "rec"), "--request", "r1"])
    assert result.exit_code == 2 and "shard-000001.safetensors: unreadable shard" in result.output


def test_show_with_a_sidecar_config_uses_its_sources_and_tokenizer(tmp_path):
    import yaml

    make_recording(tmp_path / "rec")
    sae = write_saelens_jumprelu(tmp_path / "sae", D)
    probes = write_probe_bank(tmp_path / "probes.safetensors", D)
    (tmp_path / "fw.yaml").write_text(yaml.safe_dump({
        "sources": [{"name": "sae", "kind": "sae", "layer": 1, "path": str(sae)},
                    {"name": "probes", "kind": "probes", "layer": 1, "path": str(probes)}],
        "tokenizer": str(TOKENIZER)}))
    result = runner.invoke(app, ["record", "show", str(tmp_path / "rec"), "-r", "cmpl-r1", "--config", str(tmp_path / "fw.yaml")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "generated: the model" in out and "sae (L1) top 3" in out and "planted (L1)" in out
