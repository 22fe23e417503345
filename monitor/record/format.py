"""The recording format v1 on disk (issue 12): names, the manifest model, and whole-file writes.

A recording is a directory anyone can open without featurewatch: a JSON manifest, then numbered
shards of three files each (safetensors activations, a Parquet token index, a Parquet request
table written last: its presence marks the shard complete). Every file is written to a temporary
name and renamed over its final one, so a killed process leaves only whole files behind.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field

FORMAT = "featurewatch.recording"
SHARD_FORMAT = "featurewatch.recording.shard"
VERSION = 1
MANIFEST = "recording.json"
DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK = ".lock"
TMP_SUFFIX = ".tmp"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.(safetensors|tokens\.parquet|requests\.parquet)$")
KINDS = ("safetensors", "tokens.parquet", "requests.parquet")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

TOKENS_SCHEMA = pa.schema([("request_id", pa.string()), ("position", pa.int64()), ("token_id", pa.int64()),
                           ("generated", pa.bool_())])
REQUESTS_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("api_request_id", pa.string()), ("metadata", pa.string()),
    ("prompt_tokens", pa.int64()), ("generated_tokens", pa.int64()), ("finish_reason", pa.string()),
    ("rules_fired", pa.list_(pa.string())), ("fired_positions", pa.list_(pa.int64())), ("reason", pa.string()),
    ("started_unix_s", pa.float64()), ("finished_unix_s", pa.float64()), ("token_start", pa.int64()),
    ("token_count", pa.int64()),
])


class SourceInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    kind: Literal["sae", "probes"]
    layer: int
    path: str


class SidecarInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    rules_version: int = 0
    sources: dict[str, SourceInfo] = Field(default_factory=dict)


class Manifest(BaseModel):
    """recording.json. Unknown extra fields are ignored (a later minor addition must not lock readers out)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    format: Literal["featurewatch.recording"] = FORMAT
    version: int = VERSION
    model_name: str
    d_model: int = Field(ge=1)
    layers: list[int]
    dtype: Literal["float32", "float16", "bfloat16"]
    created_unix_s: float
    sidecar: SidecarInfo = Field(default_factory=SidecarInfo)

    def differs(self, other: "Manifest") -> list[str]:
        """What would make shards of ``other`` unreadable beside this one's (empty: compatible)."""
        return [f"{k} {getattr(self, k)!r} vs {getattr(other, k)!r}" for k in ("model_name", "d_model", "layers", "dtype")
                if getattr(self, k) != getattr(other, k)]


def shard_name(number: int, kind: str) -> str:
    return f"shard-{number:06d}.{kind}"


def shard_files(root: Path, number: int) -> dict[str, Path]:
    return {kind: root / shard_name(number, kind) for kind in KINDS}


def scan_shards(root: Path) -> dict[int, set[str]]:
    """Shard number -> the kinds of its files present (temporary files are not shards)."""
    found: dict[int, set[str]] = {}
    for entry in os.scandir(root):
        m = SHARD_RE.match(entry.name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def write_atomic(path: Path, data, fsync: bool = True) -> int:
    """Write ``data`` (bytes, or a list of buffers written in turn) to a temporary file beside
    ``path`` (mode 0600), then rename it over ``path``."""
    parts = data if isinstance(data, list) else [data]
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:
        tmp.unlink()  # a leftover of a killed writer
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        written = 0
        with os.fdopen(fd, "wb", closefd=True) as f:
            for part in parts:
                written += f.write(part)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return written


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_manifest(root: Path, manifest: Manifest) -> int:
    return write_atomic(root / MANIFEST, json.dumps(manifest.model_dump(mode="json"), indent=1).encode())


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
             torch.uint8: "U8"}


def _raw(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy() if t.numel() else b"").cast("B")


def safetensors_parts(tensors: dict[str, list[torch.Tensor]], metadata: dict[str, str]) -> list:
    """A safetensors file as a list of buffers: the header, then each tensor's pieces (row blocks
    concatenated along dim 0) as they are in memory, so a shard is written without assembling it."""
    header: dict = {"__metadata__": metadata}
    parts, offset = [], 0
    for name, pieces in tensors.items():
        first = pieces[0]
        rows = sum(int(p.shape[0]) for p in pieces)
        views = [_raw(p) for p in pieces]
        size = sum(v.nbytes for v in views)
        header[name] = {"dtype": ST_DTYPES[first.dtype], "shape": [rows, *first.shape[1:]], "data_offsets": [offset, offset + size]}
        parts.extend(views)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [len(text).to_bytes(8, "little"), text, *parts]


def write_shard(root: Path, number: int, layers: dict[int, list[torch.Tensor]], token_ids, positions, generated,
                request_index, requests: list[dict], fsync: bool = True) -> int:
    """Write one shard's three files (the requests table last); returns the bytes written.

    ``layers``: ``{layer: [n_i, d_model] blocks}`` in the wire dtype, n rows in all; the label arrays
    have n entries; ``requests``: rows of REQUESTS_SCHEMA (each request's tokens contiguous, from token_start)."""
    files = shard_files(root, number)
    labels = {"token_id": torch.as_tensor(np.asarray(token_ids, np.int64)),
              "position": torch.as_tensor(np.asarray(positions, np.int64)),
              "generated": torch.as_tensor(np.asarray(generated).astype(np.uint8)),
              "request": torch.as_tensor(np.asarray(request_index, np.int32))}
    tensors = {f"layer.{layer}": blocks if isinstance(blocks, list) else [blocks] for layer, blocks in layers.items()}
    tensors.update({k: [v] for k, v in labels.items()})
    written = write_atomic(files["safetensors"],
                           safetensors_parts(tensors, {"format": SHARD_FORMAT, "version": str(VERSION)}), fsync)
    ids = [r["request_id"] for r in requests]
    tokens = pa.table({"request_id": pa.array(ids, pa.string()).take(pa.array(labels["request"].numpy())),
                       "position": labels["position"].numpy(), "token_id": labels["token_id"].numpy(),
                       "generated": labels["generated"].numpy().astype(bool)}, schema=TOKENS_SCHEMA)
    written += write_atomic(files["tokens.parquet"], parquet_bytes(tokens), fsync)
    table = pa.Table.from_pylist(requests, schema=REQUESTS_SCHEMA)
    written += write_atomic(files["requests.parquet"], parquet_bytes(table), fsync)
    return written


def warm_up() -> None:
    """Import what writing a shard imports lazily (pyarrow's Parquet writer): an import on the
    recorder's thread would hold the interpreter lock for a third of a second at the first shard."""
    parquet_bytes(pa.Table.from_pylist([], schema=REQUESTS_SCHEMA))


def remove_shard(root: Path, number: int) -> int:
    """Delete a shard, requests table first (so a crash midway leaves an incomplete shard, never a
    complete one with missing activations); returns the bytes freed."""
    freed = 0
    for kind in reversed(KINDS):
        path = root / shard_name(number, kind)
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            pass
    return freed
