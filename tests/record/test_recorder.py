"""The recorder thread: what it keeps (sample, on_rules, exclude), its bounds (queue_full,
buffer_full) and disk errors, driven with decoded batches as the pipeline hands them over."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from monitor.evaluate.state import RequestInfo
from monitor.receive.batch import BatchGroup, DecodedBatch
from monitor.record import Recording
from monitor.record.config import RecordConfig
from monitor.record.metrics import RecordMetrics
from monitor.record.recorder import Recorder, sampled

D = 16


def make_batch(rows: list[tuple[str, int, bool]], layers=(1, 2), seed=0, token_ids=True) -> DecodedBatch:
    """rows: (request id, position, generated) per token; activations encode (layer, request, position)."""
    rids = list(dict.fromkeys(r for r, _, _ in rows))
    acts = torch.empty(len(layers), len(rows), D)
    for i, (rid, pos, _) in enumerate(rows):
        for li, layer in enumerate(layers):
            acts[li, i] = layer * 1000 + pos
    return DecodedBatch(step=seed, layers=list(layers), activations=acts, request_ids=rids,
                        token_request=np.array([rids.index(r) for r, _, _ in rows], np.int64),
                        positions=np.array([p for _, p, _ in rows], np.int64),
                        generated=np.array([g for _, _, g in rows], bool), captured_unix_s=0.0,
                        nbytes=acts.numel() * 4,
                        token_ids=np.array([500 + p for _, p, _ in rows], np.int64) if token_ids else None)


def verdict(rid: str, rule: str, position: int):
    return SimpleNamespace(request=SimpleNamespace(request_id=rid), rule=SimpleNamespace(name=rule), position=position)


def recorder(tmp_path, **cfg) -> tuple[Recorder, CollectorRegistry]:
    registry = CollectorRegistry()
    config = RecordConfig(dir=tmp_path / "rec", **{"max_bytes": 1 << 24, "shard_bytes": 1 << 20, "queue_batches": 10_000, **cfg})
    return Recorder(config, "m", RecordMetrics(registry), [1, 2], lambda: {"rules_version": 7}), registry


def value(registry, name, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def start(rec, rid, **metadata):
    rec.request_started(RequestInfo(rid, f"api-{rid}", {k: str(v) for k, v in metadata.items()}), 3, 1000.0)


def test_sampled_requests_round_trip(tmp_path):
    rec, registry = recorder(tmp_path, sample=1.0)
    start(rec, "a", tenant="t1")
    start(rec, "b")
    rec.batch(make_batch([("a", 0, False), ("a", 1, False), ("a", 2, False), ("b", 0, False)]), [])
    # a group of two batches; "a" re-sends position 2 (recompute): kept once
    group = BatchGroup.of([make_batch([("a", 2, False), ("a", 3, True)]), make_batch([("b", 1, True), ("a", 4, True)])])
    rec.batch(group, [verdict("a", "r1", 3)])
    rec.request_finished("a", 2, "stop")
    rec.request_finished("b", 1, "length")
    rec.stop()
    recording = Recording.open(tmp_path / "rec")
    assert recording.manifest.layers == [1, 2] and recording.manifest.d_model == D
    assert recording.manifest.sidecar.rules_version == 7 and recording.manifest.dtype == "float32"
    got = {r.request_id: r for r in recording.iter_requests()}
    a, b = got["a"], got["b"]
    assert a.positions.tolist() == [0, 1, 2, 3, 4] and a.token_ids.tolist() == [500, 501, 502, 503, 504]
    assert a.generated.tolist() == [False, False, False, True, True]
    assert torch.equal(a.activations[2][:, 0], torch.tensor([2000.0, 2001, 2002, 2003, 2004]))
    assert a.rules_fired == ["r1"] and a.fired_positions == [3] and a.reason == "sample"
    assert a.api_request_id == "api-a" and a.metadata == {"tenant": "t1"} and a.finish_reason == "stop"
    assert a.prompt_tokens == 3 and a.generated_tokens == 2 and a.started_unix_s == 1000.0
    assert b.positions.tolist() == [0, 1] and b.finish_reason == "length" and b.rules_fired == []
    assert value(registry, "featurewatch_record_requests_total", reason="sample") == 2
    assert value(registry, "featurewatch_record_tokens_total") == 7
    assert value(registry, "featurewatch_record_shards_total") == 1
    assert value(registry, "featurewatch_record_disk_bytes") > 0


def test_on_rules_records_only_requests_a_named_rule_fired_on(tmp_path):
    rec, registry = recorder(tmp_path, sample=0.0, on_rules=["watched"])
    for rid in ("x", "y", "z"):
        start(rec, rid)
    rec.batch(make_batch([("x", 0, False), ("y", 0, False), ("z", 0, False)]), [verdict("y", "other", 0)])
    rec.batch(make_batch([("x", 1, True), ("y", 1, True), ("z", 1, True)], token_ids=False),
              [verdict("x", "watched", 1), verdict("z", "other", 1)])
    for rid in ("x", "y", "z"):
        rec.request_finished(rid, 1, "stop")
    rec.stop()
    got = list(Recording.open(tmp_path / "rec").iter_requests())
    assert [r.request_id for r in got] == ["x"]
    # every token from the first on, though the rule fired on the last; token ids unknown: -1
    assert got[0].positions.tolist() == [0, 1] and got[0].token_ids.tolist() == [500, -1]
    assert got[0].reason == "rule" and got[0].rules_fired == ["watched"]
    assert value(registry, "featurewatch_record_requests_total", reason="rule") == 1
    assert value(registry, "featurewatch_record_buffer_bytes") == 0


def test_sampling_is_deterministic_by_request_id(tmp_path):
    ids = [f"cmpl-{i}" for i in range(4000)]
    picks = [sampled(i, 0.25) for i in ids]
    assert picks == [sampled(i, 0.25) for i in ids]  # the same decision every time (every replica)
    assert 800 < sum(picks) < 1200
    rec, _ = recorder(tmp_path, sample=0.25, queue_batches=64)
    chosen = ids[:40]
    for rid in chosen:
        rec.request_started(RequestInfo(rid + "-internal", rid), 1, 0.0)  # decided on the API id
        rec.batch(make_batch([(rid + "-internal", 0, False)]), [])
        rec.request_finished(rid + "-internal", 0, "stop")
    rec.stop()
    got = [r.api_request_id for r in Recording.open(tmp_path / "rec").iter_requests()]
    assert got == [rid for rid in chosen if sampled(rid, 0.25)] and got


def test_exclude(tmp_path):
    rec, registry = recorder(tmp_path, sample=1.0, on_rules=["*"], exclude={"tenant": ["secret"]})
    start(rec, "a", tenant="secret")
    start(rec, "b", tenant="public")
    rec.batch(make_batch([("a", 0, False), ("b", 0, False)]), [verdict("a", "r", 0)])
    rec.request_finished("a", 0, "stop")
    rec.request_finished("b", 0, "stop")
    rec.stop()
    assert [r.request_id for r in Recording.open(tmp_path / "rec").iter_requests()] == ["b"]
    assert value(registry, "featurewatch_record_requests_dropped_total", reason="excluded") == 1


def test_queue_full_drops_and_counts(tmp_path):
    rec, registry = recorder(tmp_path, sample=1.0, queue_batches=1)
    gate, held = threading.Event(), threading.Event()
    start(rec, "a")
    start(rec, "b")
    rec.call(lambda: (held.set(), gate.wait(60)))
    assert held.wait(60)
    rec.batch(make_batch([("a", 0, False)]), [])  # queued (1 of 1)
    rec.batch(make_batch([("b", 0, False)]), [])  # no room: dropped, "b" loses a batch
    gate.set()
    rec.request_finished("a", 0, "stop")
    rec.request_finished("b", 0, "stop")
    rec.stop()
    assert [r.request_id for r in Recording.open(tmp_path / "rec").iter_requests()] == ["a"]
    assert value(registry, "featurewatch_record_batches_dropped_total", reason="queue_full") == 1
    assert value(registry, "featurewatch_record_requests_dropped_total", reason="queue_full") == 1


def test_buffer_full_drops_unqualified_first_then_counts(tmp_path):
    # 64 KiB of buffer; each batch row is 16 float32 x 2 layers = 128 B + labels
    rec, registry = recorder(tmp_path, sample=0.0, on_rules=["hit"], buffer_bytes=64 * 1024)
    start(rec, "big")
    start(rec, "small")
    rec.batch(make_batch([("small", p, False) for p in range(8)]), [verdict("small", "hit", 7)])  # qualified
    rec.batch(make_batch([("big", p, False) for p in range(400)]), [])  # 58 KiB, fits, unqualified
    rec.batch(make_batch([("small", p, True) for p in range(8, 200)]), [])  # needs room: "big" is evicted
    rec.batch(make_batch([("big", 400, True)]), [verdict("big", "hit", 400)])  # qualifies too late: lost
    rec.request_finished("big", 1, "stop")
    rec.request_finished("small", 192, "stop")
    rec.stop()
    got = list(Recording.open(tmp_path / "rec").iter_requests())
    assert [r.request_id for r in got] == ["small"] and got[0].positions.tolist() == list(range(200))
    assert value(registry, "featurewatch_record_requests_dropped_total", reason="buffer_full") == 1


def test_disk_error_is_counted_and_never_raised(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    registry = CollectorRegistry()
    rec = Recorder(RecordConfig(dir=blocker / "rec", sample=1.0), "m", RecordMetrics(registry), [1, 2])
    for i in range(3):
        start(rec, f"r{i}")
        rec.batch(make_batch([(f"r{i}", 0, False)]), [])
        rec.request_finished(f"r{i}", 0, "stop")
        assert rec.flush()
    rec.stop()
    assert value(registry, "featurewatch_record_requests_dropped_total", reason="write_error") == 3
    assert sum("unusable" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_rotation_through_the_recorder(tmp_path):
    rec, registry = recorder(tmp_path, sample=1.0, shard_bytes=64 * 1024, max_bytes=1 << 20)
    for i in range(40):  # ~40 KiB per request: a shard every two requests, ~80 KiB each
        rid = f"r{i:02d}"
        start(rec, rid)
        rec.batch(make_batch([(rid, p, False) for p in range(300)]), [])
        rec.request_finished(rid, 0, "stop")
    rec.stop()
    recording = Recording.open(tmp_path / "rec")
    assert value(registry, "featurewatch_record_shards_rotated_total", reason="max_bytes") > 0
    assert recording.shards[0] > 1 and [r.request_id for r in recording.iter_requests()][-1] == "r39"
    disk = sum(p.stat().st_size for p in (tmp_path / "rec").glob("shard-*"))
    assert disk <= 1 << 20 and value(registry, "featurewatch_record_disk_bytes") == disk


def test_requests_in_flight_at_stop_are_written_unfinished(tmp_path):
    rec, _ = recorder(tmp_path, sample=1.0)
    start(rec, "a")
    rec.batch(make_batch([("a", 0, False), ("a", 1, True), ("a", 2, True)]), [])
    rec.stop()
    [r] = list(Recording.open(tmp_path / "rec").iter_requests())
    assert r.finish_reason == "unfinished" and r.generated_tokens == 2 and r.positions.tolist() == [0, 1, 2]


def test_a_foreign_recording_in_the_directory_is_left_alone(tmp_path):
    rec, _ = recorder(tmp_path, sample=1.0)
    start(rec, "a")
    rec.batch(make_batch([("a", 0, False)]), [])
    rec.request_finished("a", 0, "stop")
    rec.stop()
    before = sorted(p.name for p in (tmp_path / "rec").iterdir())
    other_registry = CollectorRegistry()
    other = Recorder(RecordConfig(dir=tmp_path / "rec", sample=1.0), "m", RecordMetrics(other_registry), [1])
    start(other, "b")
    other.batch(make_batch([("b", 0, False)], layers=(1,)), [])  # layers [1], not [1, 2]
    other.request_finished("b", 0, "stop")
    other.stop()
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == before
    assert value(other_registry, "featurewatch_record_requests_dropped_total", reason="incompatible") == 1
