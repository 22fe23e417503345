"""Plugin configuration, read from the environment of the vLLM worker process.

Everything here is fixed at model load: the hooked layer set, the size of the steering table and the
tap buffer are baked into the forward pass. What the sidecar changes at runtime (which layers to
send, token scope, policies, directives, kill switch) is data, never new hooks.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field

ENV_ADDRESS = "FEATUREWATCH_ADDRESS"

_MIB = 1 << 20


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw in ("1", "true", "yes", "on")


def grpc_target(address: str) -> str:
    """``unix:///path`` and ``host:port`` are gRPC targets as they are; a bare path is a socket."""
    address = address.strip()
    if address.startswith("/"):
        return "unix://" + address
    return address


@dataclass(frozen=True)
class PluginConfig:
    address: str | None
    layers: str = "auto"  # auto | all | "0,4,8" | "0-11" | "every:2"
    tap_budget_bytes: int = 1024 * _MIB  # cap on the static tap buffer when layers=auto
    steer_rows: int = 32  # distinct steering programs in flight (row 0 is the no-op)
    steer_clamps: int = 16  # distinct clamp vectors per hooked layer
    steer_max_norm: float = 1e5  # |what one action adds to a row| (actions.py)
    queue_batches: int = 64
    queue_bytes: int = 256 * _MIB
    stats_interval_s: float = 5.0
    selftest: bool = True
    model_name: str | None = None
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    runtime_dir: str = field(default_factory=tempfile.gettempdir)
    # activations through the sidecar's shared-memory ring when it offers one (Unix socket only;
    # monitor/plugin/shm_writer.py); off: always bytes on the stream
    shm: bool = True
    # with the ring: the step descriptors, RequestStarts and RequestFinishes on the ring's lane,
    # sent by the forward thread (monitor/plugin/lane.py); off: on the gRPC stream
    shm_lane: bool = True
    # sent as ``authorization: Bearer`` on the Ingest stream (the sidecar requires it on TCP when
    # it has one); never shown in the status
    ingest_token: str | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @classmethod
    def from_env(cls) -> PluginConfig:
        address = os.environ.get(ENV_ADDRESS, "").strip() or None
        if _env_bool("FEATUREWATCH_DISABLE", False):
            address = None
        return cls(
            address=address,
            layers=os.environ.get("FEATUREWATCH_LAYERS", "auto").strip() or "auto",
            tap_budget_bytes=_env_int("FEATUREWATCH_TAP_BUDGET_MB", 1024) * _MIB,
            steer_rows=max(2, _env_int("FEATUREWATCH_STEER_ROWS", 32)),
            steer_clamps=max(1, _env_int("FEATUREWATCH_STEER_CLAMPS", 16)),
            steer_max_norm=_env_float("FEATUREWATCH_STEER_MAX_NORM", 1e5),
            queue_batches=max(1, _env_int("FEATUREWATCH_QUEUE_BATCHES", 64)),
            queue_bytes=max(1, _env_int("FEATUREWATCH_QUEUE_MB", 256)) * _MIB,
            stats_interval_s=_env_float("FEATUREWATCH_STATS_INTERVAL_S", 5.0),
            selftest=_env_bool("FEATUREWATCH_SELFTEST", True),
            model_name=os.environ.get("FEATUREWATCH_MODEL_NAME") or None,
            backoff_initial_s=_env_float("FEATUREWATCH_BACKOFF_INITIAL_S", 0.2),
            backoff_max_s=_env_float("FEATUREWATCH_BACKOFF_MAX_S", 10.0),
            runtime_dir=os.environ.get("FEATUREWATCH_RUNTIME_DIR") or tempfile.gettempdir(),
            shm=_env_bool("FEATUREWATCH_SHM", True),
            shm_lane=_env_bool("FEATUREWATCH_SHM_LANE", True),
            ingest_token=os.environ.get("FEATUREWATCH_INGEST_TOKEN") or None,
        )

    def as_dict(self) -> dict:
        """Everything but secrets (for the status)."""
        out = asdict(self)
        out["ingest_token"] = "set" if self.ingest_token else None
        return out

    def resolve_layers(self, num_layers: int, bytes_per_layer: int) -> list[int]:
        """The fixed hooked set. ``auto``: every layer if the tap buffer fits the budget, else an
        evenly spaced subset that does (always at least one layer, the middle one first)."""
        spec = self.layers.lower()
        if spec == "all":
            return list(range(num_layers))
        if spec == "auto":
            fit = max(1, self.tap_budget_bytes // max(1, bytes_per_layer))
            if fit >= num_layers:
                return list(range(num_layers))
            if fit == 1:
                return [num_layers // 2]
            step = (num_layers - 1) / (fit - 1)
            return sorted({round(i * step) for i in range(fit)})
        if spec.startswith("every:"):
            k = max(1, int(spec.split(":", 1)[1]))
            return list(range(0, num_layers, k))
        out: set[int] = set()
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
        bad = [x for x in out if not 0 <= x < num_layers]
        if bad:
            raise ValueError(f"FEATUREWATCH_LAYERS names layers {bad} outside 0..{num_layers - 1}")
        return sorted(out)
