"""Reading a recording (the contract the authoring commands code against).

    rec = Recording.open(path)
    rec.manifest, rec.requests (pyarrow.Table + "shard"), rec.incomplete_shards
    rec.check_compatible(d_model=..., layers=[...], source="rules.yaml")
    for r in rec.iter_requests(layers=[2], request_ids=None): r.activations[2] ...

Every problem is a RecordingError whose message starts with the file at fault and says what is
wrong, in one short line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError

from monitor.record.format import (DTYPES, FORMAT, KINDS, MANIFEST, REQUESTS_SCHEMA, SHARD_FORMAT, VERSION, Manifest,
                                   scan_shards, shard_files)

MAX_MANIFEST_BYTES = 1 << 20
ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class RecordingError(ValueError):
    """A recording (or one of its files) that cannot be used; the message names the file."""


def _short(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class RecordedRequest:
    request_id: str
    api_request_id: str
    metadata: dict
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    rules_fired: list[str]
    fired_positions: list[int]
    reason: str
    started_unix_s: float
    finished_unix_s: float
    shard: int
    positions: np.ndarray  # int64 [n]
    token_ids: np.ndarray  # int64 [n], -1 where the plugin sent none
    generated: np.ndarray  # bool [n]
    activations: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [n, d_model]

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])


class Recording:
    def __init__(self, path: Path, manifest: Manifest, requests: pa.Table, complete: list[int], incomplete: list[int]):
        self.path = path
        self.manifest = manifest
        self.requests = requests
        self.shards = complete
        self.incomplete_shards = incomplete

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path) -> "Recording":
        path = Path(path)
        if not path.is_dir():
            raise RecordingError(f"{path}: not a directory (a recording is a directory with {MANIFEST})")
        manifest = read_manifest(path / MANIFEST)
        try:
            found = scan_shards(path)
        except OSError as exc:
            raise RecordingError(f"{path}: cannot list the recording: {_short(exc)}") from None
        complete = sorted(n for n, kinds in found.items() if set(KINDS) <= kinds)
        incomplete = sorted(n for n, kinds in found.items() if not set(KINDS) <= kinds)
        tables = []
        for number in complete:
            table = read_requests(shard_files(path, number)["requests.parquet"])
            tables.append(table.append_column("shard", pa.array(np.full(table.num_rows, number, np.int64))))
        schema = REQUESTS_SCHEMA.append(pa.field("shard", pa.int64()))
        requests = pa.concat_tables(tables) if tables else schema.empty_table()
        return cls(path, manifest, requests, complete, incomplete)

    def __repr__(self) -> str:
        return f"Recording({str(self.path)!r}, {self.requests.num_rows} requests in {len(self.shards)} shards)"

    # ------------------------------------------------------------------ checks
    def check_compatible(self, d_model: int | None = None, layers: Iterable[int] | None = None, source: str = "") -> None:
        """RecordingError when ``source`` (an SAE, probe bank or rules file) needs a d_model or layers
        this recording does not have."""
        m, who = self.manifest, f"{source}: " if source else ""
        if d_model is not None and int(d_model) != m.d_model:
            raise RecordingError(f"{who}needs d_model {int(d_model)}, but the recording {self.path} has d_model {m.d_model} "
                                 f"(model {m.model_name!r}): recorded from another model?")
        missing = sorted(set(int(x) for x in layers or ()) - set(m.layers))
        if missing:
            raise RecordingError(f"{who}needs layer(s) {missing}, but the recording {self.path} holds layers {m.layers}")

    # ------------------------------------------------------------------ reading
    def iter_requests(self, layers: Iterable[int] | None = None, request_ids: Iterable[str] | None = None) -> Iterator[RecordedRequest]:
        """Requests in recording order (shard by shard), with float32 activations of ``layers``
        (default: every recorded layer; [] for none). ``request_ids`` filters by internal or API id."""
        layers = list(self.manifest.layers if layers is None else layers)
        self.check_compatible(layers=layers, source="iter_requests")
        wanted = None if request_ids is None else set(request_ids)
        for number in self.shards:
            rows = self.requests.filter(pc.equal(self.requests["shard"], number)).to_pylist()
            if wanted is not None:
                rows = [r for r in rows if r["request_id"] in wanted or r["api_request_id"] in wanted]
                if not rows:
                    continue
            yield from self._read_shard(number, rows, layers)

    def _read_shard(self, number: int, rows: list[dict], layers: list[int]) -> Iterator[RecordedRequest]:
        from safetensors import safe_open

        file = shard_files(self.path, number)["safetensors"]
        m = self.manifest
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != SHARD_FORMAT or meta.get("version") != str(VERSION):
                    raise RecordingError(f"{file}: not a featurewatch v{VERSION} shard (metadata {_short(meta, 100)})")
                names = set(f.keys())
                need = {"token_id", "position", "generated", "request"} | {f"layer.{layer}" for layer in m.layers}
                if need - names:
                    raise RecordingError(f"{file}: missing tensors {sorted(need - names)}")
                labels = {k: f.get_tensor(k) for k in ("token_id", "position", "generated", "request")}
                n = labels["position"].shape[0]
                for k, t in labels.items():
                    if t.dim() != 1 or t.shape[0] != n:
                        raise RecordingError(f"{file}: tensor {k} has shape {list(t.shape)}, expected [{n}]")
                slices = {}
                for layer in layers:
                    s = f.get_slice(f"layer.{layer}")
                    shape, dtype = list(s.get_shape()), s.get_dtype()
                    if dtype != ST_NAMES[m.dtype]:
                        raise RecordingError(f"{file}: layer.{layer} is {dtype}, but {MANIFEST} says {m.dtype}")
                    if shape != [n, m.d_model]:
                        raise RecordingError(f"{file}: layer.{layer} has shape {shape}, expected [{n}, {m.d_model}] "
                                             f"(d_model {m.d_model} in {MANIFEST})")
                    slices[layer] = s
                for r in rows:
                    start, count = r["token_start"], r["token_count"]
                    if start < 0 or count < 0 or start + count > n:
                        raise RecordingError(f"{file}: request {_short(r['request_id'], 80)} claims rows "
                                             f"[{start}, {start + count}) of {n}")
                    yield self._request(r, number, labels, slices, start, count, file)
        except RecordingError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' errors on a truncated or corrupt file
            raise RecordingError(f"{file}: unreadable shard (truncated or corrupt?): {_short(exc)}") from None

    @staticmethod
    def _request(r: dict, number: int, labels: dict, slices: dict, start: int, count: int, file: Path) -> RecordedRequest:
        end = start + count
        try:
            metadata = json.loads(r["metadata"] or "{}")
        except ValueError:
            raise RecordingError(f"{file}: request {_short(r['request_id'], 80)} has metadata that is not JSON") from None
        return RecordedRequest(
            request_id=r["request_id"], api_request_id=r["api_request_id"] or "", metadata=metadata,
            prompt_tokens=int(r["prompt_tokens"] or 0), generated_tokens=int(r["generated_tokens"] or 0),
            finish_reason=r["finish_reason"] or "", rules_fired=list(r["rules_fired"] or []),
            fired_positions=[int(p) for p in r["fired_positions"] or []], reason=r["reason"] or "",
            started_unix_s=float(r["started_unix_s"] or 0.0), finished_unix_s=float(r["finished_unix_s"] or 0.0),
            shard=number, positions=labels["position"][start:end].numpy().astype(np.int64),
            token_ids=labels["token_id"][start:end].numpy().astype(np.int64),
            generated=labels["generated"][start:end].numpy().astype(bool),
            activations={layer: s[start:end].float() for layer, s in slices.items()})


def read_manifest(file: Path) -> Manifest:
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise RecordingError(f"{file}: missing: {file.parent} is not a featurewatch recording (or its first shard "
                             f"was never written)") from None
    except OSError as exc:
        raise RecordingError(f"{file}: cannot read: {_short(exc)}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise RecordingError(f"{file}: larger than {MAX_MANIFEST_BYTES} bytes: not a recording manifest")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RecordingError(f"{file}: truncated or not JSON ({_short(exc, 80)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise RecordingError(f"{file}: format {_short(got, 60)!r} is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise RecordingError(f"{file}: unknown version {_short(data.get('version'), 40)} (this featurewatch reads "
                             f"version {VERSION})")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise RecordingError(f"{file}: field {where}: {e['msg']} (got {_short(e.get('input'), 60)})") from None
    if manifest.dtype not in DTYPES:  # pragma: no cover - the Literal already refuses
        raise RecordingError(f"{file}: unknown dtype {manifest.dtype}")
    return manifest


def read_requests(file: Path) -> pa.Table:
    try:
        table = pq.read_table(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors on a truncated or foreign file
        raise RecordingError(f"{file}: unreadable requests table (truncated or corrupt?): {_short(exc)}") from None
    missing = [n for n in REQUESTS_SCHEMA.names if n not in table.column_names]
    if missing:
        raise RecordingError(f"{file}: missing columns {missing}")
    try:
        return table.select(REQUESTS_SCHEMA.names).cast(REQUESTS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise RecordingError(f"{file}: columns of the wrong type: {_short(exc)}") from None
