"""`record:` in the sidecar config: what the flight recorder keeps, where, and its bounds."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1 << 20


class RecordConfig(BaseModel):
    """Opt-in. Records a uniform sample of requests (decided from a hash of the request's id, so
    replicas and restarts agree) plus every token of the requests on which one of ``on_rules`` fired."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: Path
    layers: list[int] | None = None  # default: every layer the sidecar taps
    sample: float = Field(default=0.05, ge=0.0, le=1.0)
    on_rules: list[str] = Field(default_factory=list)  # rule names; "*": any rule
    # Requests whose metadata (vllm_xargs) has one of these values under the key are never recorded.
    exclude: dict[str, list[str]] = Field(default_factory=dict)
    max_bytes: int = Field(default=10 * 1024 * MIB, ge=MIB)  # the oldest shards go past this
    max_age_s: float | None = Field(default=7 * 24 * 3600.0, gt=0)  # and past this age
    queue_batches: int = Field(default=16, ge=1)  # batches handed over and not yet copied (and queue_bytes):
    queue_bytes: int = Field(default=256 * MIB, ge=64 * 1024)  # beyond, dropped ("queue_full")
    buffer_bytes: int = Field(default=256 * MIB, ge=64 * 1024)  # tokens of requests in flight; beyond: "buffer_full"
    shard_bytes: int = Field(default=64 * MIB, ge=64 * 1024)  # a shard is written when its requests reach this
    flush_interval_s: float = Field(default=60.0, gt=0)  # or when its oldest request waited this long
    fsync: bool = True  # each file reaches the disk before it is renamed into place

    @model_validator(mode="after")
    def _bounds(self) -> "RecordConfig":
        if self.shard_bytes * 2 > self.max_bytes:
            raise ValueError(f"shard_bytes ({self.shard_bytes}) must be at most half of max_bytes ({self.max_bytes}): "
                             "rotation deletes whole shards")
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers must be >= 0, got {self.layers[:16]}")
        return self

    def excludes(self, metadata: dict) -> bool:
        return any(str(metadata.get(key)) in values for key, values in self.exclude.items() if key in metadata)

    def records_rule(self, rule: str) -> bool:
        return rule in self.on_rules or "*" in self.on_rules
