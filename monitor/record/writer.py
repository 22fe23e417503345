"""The recording directory on the writer's side: shards assembled from finished requests, written
whole, numbered increasingly, and rotated out oldest first past a size or age cap.

Used only from the recorder's own thread; nothing here runs on the sidecar's hot path.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monitor.record.format import (DIR_MODE, FILE_MODE, KINDS, LOCK, MANIFEST, TMP_SUFFIX, Manifest, remove_shard,
                                   scan_shards, shard_files, write_manifest, write_shard)
from monitor.record.reader import RecordingError, read_manifest

log = logging.getLogger("featurewatch.record")


class IncompatibleRecording(RecordingError):
    """The directory holds a recording of another model, d_model, layers or dtype."""


@dataclass
class ShardInfo:
    number: int
    nbytes: int
    finished_unix_s: float  # when it was written (the requests table's mtime)


class ShardBuilder:
    """Finished requests waiting to be written as one shard (each request's rows contiguous)."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self.requests: list[dict] = []
        self._acts: list[torch.Tensor] = []  # [L, n, d] per request, layers in self.layers order
        self._labels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_tokens = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, row: dict, acts, positions: np.ndarray, token_ids: np.ndarray, generated: np.ndarray) -> None:
        """``row``: the request's REQUESTS_SCHEMA fields but token_start/token_count; ``acts``: its
        rows [L, n, d], or a list of row blocks [L, n_i, d] in order (kept as they are: no copy)."""
        n = int(positions.shape[0])
        blocks = acts if isinstance(acts, list) else [acts]
        self.requests.append({**row, "token_start": self.n_tokens, "token_count": n})
        self._acts.extend(blocks)
        self._labels.append((positions, token_ids, generated))
        self.n_tokens += n
        self.nbytes += sum(b.element_size() * b.numel() for b in blocks) + n * 17

    def write(self, root: Path, number: int, fsync: bool = True) -> int:
        blocks = [b for b in self._acts if b.shape[1]] or [torch.empty(len(self.layers), 0, 0)]
        positions = np.concatenate([p for p, _, _ in self._labels]) if self._labels else np.zeros(0, np.int64)
        token_ids = np.concatenate([t for _, t, _ in self._labels]) if self._labels else np.zeros(0, np.int64)
        generated = np.concatenate([g for _, _, g in self._labels]) if self._labels else np.zeros(0, bool)
        index = np.repeat(np.arange(len(self.requests), dtype=np.int32), [r["token_count"] for r in self.requests])
        return write_shard(root, number, {layer: [b[i] for b in blocks] for i, layer in enumerate(self.layers)}, token_ids, positions,
                           generated, index, self.requests, fsync=fsync)


class RecordingDir:
    """A recording directory this process owns (an exclusive lock file keeps a second writer out)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest: Manifest | None = None
        self.shards: list[ShardInfo] = []
        self._lock_fd: int | None = None

    def open(self) -> "RecordingDir":
        """Create (0700) or reopen the directory, take the lock, clear leftovers of a killed writer:
        temporary files and incomplete shards. OSError or RecordingError when it cannot be used."""
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, DIR_MODE)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RecordingError(f"{self.root}: another featurewatch process is recording here ({LOCK} is locked)") from None
        self._lock_fd = fd
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX):
                os.unlink(entry.path)
        if (self.root / MANIFEST).exists():
            self.manifest = read_manifest(self.root / MANIFEST)
        for number, kinds in sorted(scan_shards(self.root).items()):
            if set(KINDS) <= kinds:
                files = shard_files(self.root, number)
                self.shards.append(ShardInfo(number, sum(p.stat().st_size for p in files.values()),
                                             files["requests.parquet"].stat().st_mtime))
            else:
                log.warning("%s: removing incomplete shard %d (a writer was stopped while writing it)", self.root, number)
                remove_shard(self.root, number)
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def ensure_manifest(self, manifest: Manifest) -> None:
        """Write the manifest on the first shard; a directory holding another model's recording is refused."""
        if self.manifest is None:
            write_manifest(self.root, manifest)
            self.manifest = manifest
            return
        diff = self.manifest.differs(manifest)
        if diff:
            raise IncompatibleRecording(f"{self.root / MANIFEST}: the directory holds another recording "
                                        f"({'; '.join(diff)}): point record.dir elsewhere or move it away")

    @property
    def next_number(self) -> int:
        return self.shards[-1].number + 1 if self.shards else 1

    def write(self, builder: ShardBuilder, fsync: bool = True) -> ShardInfo:
        number = self.next_number
        try:
            nbytes = builder.write(self.root, number, fsync=fsync)
        except BaseException:
            remove_shard(self.root, number)  # never leave part of a shard behind
            raise
        info = ShardInfo(number, nbytes, time.time())
        self.shards.append(info)
        return info

    @property
    def disk_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def rotate(self, max_bytes: int | None, max_age_s: float | None, now: float | None = None) -> list[tuple[int, str]]:
        """Delete the oldest whole shards while the recording is over ``max_bytes`` or a shard is
        older than ``max_age_s``; returns (shard, reason) for each deleted."""
        now = time.time() if now is None else now
        removed = []
        while self.shards:
            oldest = self.shards[0]
            if max_age_s is not None and now - oldest.finished_unix_s > max_age_s:
                reason = "max_age"
            elif max_bytes is not None and self.disk_bytes > max_bytes:
                reason = "max_bytes"
            else:
                break
            remove_shard(self.root, oldest.number)
            self.shards.pop(0)
            removed.append((oldest.number, reason))
        return removed


def request_row(request_id: str, api_request_id: str = "", metadata: dict | None = None, prompt_tokens: int = 0,
                generated_tokens: int = 0, finish_reason: str = "", rules_fired: list | None = None,
                fired_positions: list | None = None, reason: str = "sample", started_unix_s: float = 0.0,
                finished_unix_s: float = 0.0) -> dict:
    """One row of the requests table (without token_start/token_count, which the builder assigns)."""
    return {"request_id": request_id, "api_request_id": api_request_id,
            "metadata": json.dumps(metadata or {}, sort_keys=True, default=str), "prompt_tokens": int(prompt_tokens),
            "generated_tokens": int(generated_tokens), "finish_reason": finish_reason,
            "rules_fired": list(rules_fired or []), "fired_positions": [int(p) for p in fired_positions or []],
            "reason": reason, "started_unix_s": float(started_unix_s), "finished_unix_s": float(finished_unix_s)}
