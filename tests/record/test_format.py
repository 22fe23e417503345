"""Recording format v1: writer -> reader round trip, crash safety, clear errors, rotation, permissions."""

from __future__ import annotations

import json
import stat
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from monitor.record import Recording, RecordingError
from monitor.record.format import Manifest, shard_files
from monitor.record.writer import RecordingDir, ShardBuilder, request_row

D = 8


def manifest(layers=(1, 2), dtype="float32", d_model=D, model="m") -> Manifest:
    return Manifest(model_name=model, d_model=d_model, layers=list(layers), dtype=dtype, created_unix_s=time.time(),
                    sidecar={"rules_version": 3, "sources": {"sae": {"kind": "sae", "layer": 1, "path": "/x"}}})


def add_request(builder: ShardBuilder, rid: str, n: int, seed: int, dtype=torch.float32, **row) -> torch.Tensor:
    acts = torch.randn(len(builder.layers), n, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    positions = np.arange(n, dtype=np.int64)
    builder.add(request_row(rid, api_request_id=f"api-{rid}", **row), acts, positions,
                np.arange(100, 100 + n, dtype=np.int64), positions >= n // 2)
    return acts


def write_recording(root, shards=((("a", 3), ("b", 5)), (("c", 4),)), dtype=torch.float32, layers=(1, 2)):
    rd = RecordingDir(root).open()
    rd.ensure_manifest(manifest(layers, {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]))
    written = {}
    for i, shard in enumerate(shards):
        b = ShardBuilder(list(layers))
        for j, (rid, n) in enumerate(shard):
            written[rid] = add_request(b, rid, n, seed=10 * i + j, dtype=dtype, metadata={"tenant": rid},
                                       rules_fired=["r1"], fired_positions=[n - 1], reason="rule",
                                       finish_reason="stop", prompt_tokens=n // 2, generated_tokens=n - n // 2)
        rd.write(b)
    rd.close()
    return written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(tmp_path, dtype):
    written = write_recording(tmp_path / "rec", dtype=dtype)
    rec = Recording.open(tmp_path / "rec")
    assert rec.manifest.d_model == D and rec.manifest.layers == [1, 2] and rec.manifest.sidecar.rules_version == 3
    assert rec.requests.column("request_id").to_pylist() == ["a", "b", "c"]
    assert rec.requests.column("shard").to_pylist() == [1, 1, 2]
    assert rec.incomplete_shards == []
    got = list(rec.iter_requests())
    assert [r.request_id for r in got] == ["a", "b", "c"]
    for r in got:
        assert r.api_request_id == f"api-{r.request_id}" and r.metadata == {"tenant": r.request_id}
        assert r.rules_fired == ["r1"] and r.fired_positions == [r.n_tokens - 1] and r.reason == "rule"
        assert r.positions.tolist() == list(range(r.n_tokens))
        assert r.token_ids.tolist() == list(range(100, 100 + r.n_tokens))
        assert r.generated.dtype == np.bool_ and r.generated.sum() == r.n_tokens - r.n_tokens // 2
        for i, layer in enumerate((1, 2)):
            assert r.activations[layer].dtype == torch.float32
            assert torch.equal(r.activations[layer], written[r.request_id][i].float())
    only = list(rec.iter_requests(layers=[2], request_ids=["api-b"]))
    assert [r.request_id for r in only] == ["b"] and list(only[0].activations) == [2]
    # the token index reads without featurewatch
    tokens = pq.read_table(shard_files(tmp_path / "rec", 1)["tokens.parquet"]).to_pydict()
    assert tokens["request_id"] == ["a"] * 3 + ["b"] * 5 and tokens["token_id"][:3] == [100, 101, 102]


def test_permissions(tmp_path):
    write_recording(tmp_path / "rec")
    root = tmp_path / "rec"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for p in root.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_temp_files_and_incomplete_shards_are_ignored(tmp_path):
    root = tmp_path / "rec"
    write_recording(root)
    (root / ".shard-000003.safetensors.tmp").write_bytes(b"partial")
    files = shard_files(root, 2)
    files["requests.parquet"].unlink()  # killed before the requests table landed
    rec = Recording.open(root)
    assert rec.incomplete_shards == [2] and rec.shards == [1]
    assert [r.request_id for r in rec.iter_requests()] == ["a", "b"]
    # a writer reopening the directory clears both leftovers and numbers on from the last complete shard
    rd = RecordingDir(root).open()
    assert not (root / ".shard-000003.safetensors.tmp").exists() and not files["safetensors"].exists()
    assert rd.next_number == 2
    rd.close()


def test_truncated_shard_is_a_clear_error(tmp_path):
    root = tmp_path / "rec"
    write_recording(root)
    st = shard_files(root, 1)["safetensors"]
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    rec = Recording.open(root)
    with pytest.raises(RecordingError, match=r"shard-000001\.safetensors: unreadable shard"):
        list(rec.iter_requests())
    req = shard_files(root, 2)["requests.parquet"]
    req.write_bytes(req.read_bytes()[:40])
    with pytest.raises(RecordingError, match=r"shard-000002\.requests\.parquet: unreadable requests table"):
        Recording.open(root)


def test_manifest_errors(tmp_path):
    root = tmp_path / "rec"
    root.mkdir()
    with pytest.raises(RecordingError, match=r"recording\.json: missing"):
        Recording.open(root)
    (root / "recording.json").write_text('{"format": "featurewatch.recording", "vers')
    with pytest.raises(RecordingError, match=r"recording\.json: truncated or not JSON"):
        Recording.open(root)
    data = manifest().model_dump(mode="json")
    (root / "recording.json").write_text(json.dumps({**data, "version": 2}))
    with pytest.raises(RecordingError, match=r"recording\.json: unknown version 2"):
        Recording.open(root)
    (root / "recording.json").write_text(json.dumps({**data, "d_model": "wide"}))
    with pytest.raises(RecordingError, match=r"recording\.json: field d_model"):
        Recording.open(root)
    with pytest.raises(RecordingError, match="not a directory"):
        Recording.open(root / "recording.json")


def test_check_compatible(tmp_path):
    write_recording(tmp_path / "rec")
    rec = Recording.open(tmp_path / "rec")
    rec.check_compatible(d_model=D, layers=[1], source="probes.safetensors")
    with pytest.raises(RecordingError, match=r"^probes\.safetensors: needs d_model 16, but the recording .* has d_model 8"):
        rec.check_compatible(d_model=16, source="probes.safetensors")
    with pytest.raises(RecordingError, match=r"^rules\.yaml: needs layer\(s\) \[5\]"):
        rec.check_compatible(layers=[1, 5], source="rules.yaml")


def test_other_model_in_the_directory_is_refused(tmp_path):
    write_recording(tmp_path / "rec")
    rd = RecordingDir(tmp_path / "rec").open()
    with pytest.raises(RecordingError, match=r"recording\.json: the directory holds another recording \(d_model 8 vs 16"):
        rd.ensure_manifest(manifest(d_model=16))
    rd.ensure_manifest(manifest())  # the same model: appended to
    rd.close()


def test_second_writer_is_refused(tmp_path):
    rd = RecordingDir(tmp_path / "rec").open()
    with pytest.raises(RecordingError, match="another featurewatch process is recording here"):
        RecordingDir(tmp_path / "rec").open()
    rd.close()
    RecordingDir(tmp_path / "rec").open().close()


def test_rotation_by_size_and_age(tmp_path):
    root = tmp_path / "rec"
    write_recording(root, shards=[[("a", 3)], [("b", 3)], [("c", 3)], [("d", 3)]])
    rd = RecordingDir(root).open()
    sizes = [s.nbytes for s in rd.shards]
    assert [s.number for s in rd.shards] == [1, 2, 3, 4]
    removed = rd.rotate(max_bytes=sum(sizes[2:]), max_age_s=None)
    assert removed == [(1, "max_bytes"), (2, "max_bytes")]
    assert not any(p.exists() for p in shard_files(root, 1).values())
    now = time.time()
    rd.shards[0].finished_unix_s = now - 100  # shard 3 is old, shard 4 recent
    assert rd.rotate(max_bytes=None, max_age_s=50, now=now) == [(3, "max_age")]
    rd.close()
    assert [r.request_id for r in Recording.open(root).iter_requests()] == ["d"]
