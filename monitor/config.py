"""Sidecar configuration: a small typed object, loaded from YAML, with errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from monitor.evaluate.loader import MAX_BYTES, decode_utf8, load_yaml, shorten
from monitor.files import read_regular_file
from monitor.record.config import RecordConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """A dictionary the encode stage runs on one layer: an SAE directory/file or a probe bank."""

    name: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_\-]*$")
    kind: Literal["sae", "probes"]
    layer: int = Field(ge=0)
    path: Path
    format: str | None = None  # SAE format override (auto-detected when omitted)


class StoreConfig(_Strict):
    kind: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "featurewatch"
    events_maxlen: int = Field(default=100_000, ge=100)
    # Redis away: up to this many events wait in memory, then the oldest are dropped (and counted).
    events_buffer_max: int = Field(default=10_000, ge=1)
    reconcile_interval_s: float = Field(default=10.0, gt=0)


class LimitsConfig(_Strict):
    """Bounds on everything the sidecar buffers; what does not fit is dropped and counted."""

    max_batch_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_tokens_per_batch: int = Field(default=65_536, ge=1)
    queue_batches: int = Field(default=64, ge=1)
    queue_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    # When the pipeline falls behind, up to this many queued batches of one stream are evaluated
    # together (1: never); an idle pipeline takes each batch alone, so latency is unchanged.
    group_batches: int = Field(default=8, ge=1)
    max_tracked_requests: int = Field(default=100_000, ge=1)
    request_idle_timeout_s: float = Field(default=600.0, gt=0)
    # A request with a token position at or beyond this loses its rows of that batch ("position"):
    # no sequence is that long, and one request's bad labels must cost the others nothing.
    max_request_tokens: int = Field(default=1 << 24, ge=1, le=1 << 62)
    # Replies waiting for one plugin (acks, plans, directives): acks beyond are dropped, a plan or
    # directive that does not fit closes the stream (counted).
    outbox_messages: int = Field(default=4096, ge=1)
    outbox_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Distinct `engine` label values (from the plugins' Hello) at a time; beyond: "other".
    max_engine_labels: int = Field(default=16, ge=1)


class SteeringConfig(_Strict):
    enabled: bool = True
    failure_mode: Literal["open", "closed"] = "open"


class TracingConfig(_Strict):
    """OpenTelemetry spans for alerts and steering; `exporter: none` still records exemplars."""

    exporter: Literal["none", "console", "otlp", "memory"] = "none"
    endpoint: str | None = None
    service_name: str = "featurewatch-sidecar"


class ShmConfig(_Strict):
    """Activations over shared memory for plugins on the same host (Unix socket): one ring per
    stream, created here with mode 0600 (monitor/protocol/shm_ring.py). In Kubernetes `dir` is an
    emptyDir with `medium: Memory` mounted in both containers. Plugins that cannot attach send bytes."""

    enabled: bool = True
    dir: Path = Path("/dev/shm")
    slots: int = Field(default=16, ge=2, le=4096)
    # per stream; a step larger than max_bytes / slots goes as bytes on the stream
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    # a lane (Unix seqpacket socket beside the ring) for the descriptors, RequestStarts and
    # RequestFinishes, sent by the plugin's forward thread itself (monitor/receive/lane.py);
    # off: they stay on the gRPC stream
    lane: bool = True


class SidecarConfig(_Strict):
    model_name: str = "unknown"
    socket: Path | None = Path("/tmp/featurewatch.sock")
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = Field(default=50051, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = Field(default=9400, ge=0, le=65535)
    admin_token_env: str = "FEATUREWATCH_ADMIN_TOKEN"
    # When this variable is set, Ingest streams over TCP must carry `authorization: Bearer <it>`
    # (the Unix socket is authenticated by its file mode).
    ingest_token_env: str = "FEATUREWATCH_INGEST_TOKEN"
    sources: list[SourceConfig] = Field(default_factory=list)
    tap_layers: list[int] | None = None  # default: the layers the sources need
    token_scope: Literal["all", "prompt", "generated"] = "all"
    rules_file: Path | None = None
    # The only directories `add.direction_file` may read from (default: the rules file's directory).
    direction_dirs: list[Path] | None = None
    rules_poll_interval_s: float = Field(default=1.0, gt=0)
    store_counters_interval_s: float = Field(default=5.0, gt=0)
    store: StoreConfig = StoreConfig()
    limits: LimitsConfig = LimitsConfig()
    steering: SteeringConfig = SteeringConfig()
    tracing: TracingConfig = TracingConfig()
    encode_device: str = "cpu"
    encode_threads: int | None = None
    shm: ShmConfig = ShmConfig()
    record: RecordConfig | None = None  # the flight recorder (monitor/record), off unless given
    # The served model's tokenizer (a tokenizer.json or a directory holding one, read from disk):
    # alert events then carry their context as text; without it, only the token ids.
    tokenizer: Path | None = None

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes}")
        return sources

    @property
    def admin_token(self) -> str | None:
        return os.environ.get(self.admin_token_env) or None

    @property
    def ingest_token(self) -> str | None:
        return os.environ.get(self.ingest_token_env) or None

    def layers(self) -> list[int]:
        recorded = self.record.layers or [] if self.record is not None else []
        return sorted(set(self.tap_layers or [s.layer for s in self.sources]) | set(recorded))

    def direction_roots(self, rules_file: Path | None = None) -> list[Path]:
        """Where direction files may come from: `direction_dirs`, else the rules file's directory."""
        if self.direction_dirs is not None:
            return list(self.direction_dirs)
        rules_file = rules_file or self.rules_file
        return [rules_file.parent] if rules_file is not None else []


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, field and value."""


def load_config(path: str | Path) -> SidecarConfig:
    """Read a YAML config; relative source/rules paths resolve against the file's directory."""
    path = Path(path)
    try:
        raw = load_yaml(decode_utf8(read_regular_file(path, MAX_BYTES))) or {}
    except (OSError, ValueError) as exc:  # YamlRefused is a ValueError: short, bounded, names where
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    base = path.parent
    for source in raw.get("sources") or []:
        if isinstance(source, dict) and "path" in source and not Path(source["path"]).is_absolute():
            source["path"] = str(base / source["path"])
    if isinstance(raw.get("tokenizer"), str) and not Path(raw["tokenizer"]).is_absolute():
        raw["tokenizer"] = str(base / raw["tokenizer"])
    if raw.get("rules_file") and not Path(raw["rules_file"]).is_absolute():
        raw["rules_file"] = str(base / raw["rules_file"])
    record = raw.get("record")
    if isinstance(record, dict) and isinstance(record.get("dir"), str) and not Path(record["dir"]).is_absolute():
        record["dir"] = str(base / record["dir"])
    if isinstance(raw.get("direction_dirs"), list):
        raw["direction_dirs"] = [str(base / d) if isinstance(d, str) and not Path(d).is_absolute() else d
                                 for d in raw["direction_dirs"]]
    try:
        return SidecarConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from exc


def format_validation_error(path: str | Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {field}: {err['msg']} (got {shorten(err.get('input'))})")
    return "\n".join(lines)
