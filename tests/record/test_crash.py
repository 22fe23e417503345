"""A writer killed (SIGKILL) at an arbitrary point leaves only whole files: every shard a reader
calls complete reads in full, and a reopened writer clears the rest."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from monitor.record import Recording
from monitor.record.writer import RecordingDir

WRITER = """
import sys, time
import numpy as np, torch
from pathlib import Path
from monitor.record.format import Manifest
from monitor.record.writer import RecordingDir, ShardBuilder, request_row
rd = RecordingDir(Path(sys.argv[1])).open()
rd.ensure_manifest(Manifest(model_name="m", d_model=256, layers=[0], dtype="float32", created_unix_s=time.time()))
i = 0
while True:
    b = ShardBuilder([0])
    for j in range(4):
        n = 200
        acts = torch.full((1, n, 256), float(i))
        b.add(request_row(f"r{i}-{j}"), acts, np.arange(n), np.full(n, i), np.zeros(n, bool))
    rd.write(b, fsync=False)
    i += 1
"""


def test_killed_writer_leaves_only_complete_shards(tmp_path):
    root = tmp_path / "rec"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120  # bounds only a failure
        while not (root / "shard-000005.requests.parquet").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer did not get going"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rec = Recording.open(root)
    assert len(rec.shards) >= 5
    for r in rec.iter_requests():  # every complete shard reads in full
        shard_value = float(r.token_ids[0])
        assert r.n_tokens == 200 and (r.token_ids == shard_value).all()
        assert bool((r.activations[0] == shard_value).all())
    assert np.array_equal(np.unique(rec.requests.column("shard").to_numpy()), np.array(rec.shards))
    rd = RecordingDir(root).open()  # a restarted writer clears temporary files and incomplete shards
    rd.close()
    assert Recording.open(root).incomplete_shards == []
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
