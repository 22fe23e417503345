"""Steering units a user can reason about: `add.scale` multiplies a unit-norm direction, and with
`scale_unit: residual_norm` also the median residual norm the sidecar measures at that layer.

The median comes from live traffic (rows of requests no steering touched), so an add written as
"a tenth of the typical residual" means the same on a model whose residual norm is 7 and on one
whose norm is 700. Rule directives take the median when they are sent; policies travel in the tap
plan, which is sent again when a median they need becomes known or moves by more than 10 %. Until a
layer has `MIN_TOKENS` measured rows its relative adds are withheld (counted), never guessed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.evaluate.rules import MAX_STEER
from monitor.protocol import pb

MIN_TOKENS = 64  # rows measured on a layer before its median is used
WINDOW = 4096  # the median is over the last WINDOW measured rows of the layer
SAMPLE = 16  # rows measured per measured batch and layer at most (evenly spaced)
EVERY = 4  # once the median is known, one batch in EVERY is measured
REFRESH = 1024  # once known, the median is recomputed after this many new rows
REPLAN_CHANGE = 0.10  # a policy's median moved by more than this fraction: a new plan


@dataclass(frozen=True)
class RelativeAdd:
    """An add of `multiple` × the layer's median residual norm × a unit direction, resolved when sent."""

    layer: int
    direction: pb.Tensor  # [d_model] float32, unit norm
    multiple: float

    def resolve(self, norm: float | None) -> pb.SteeringAction | None:
        if norm is None or not np.isfinite(norm):
            return None
        scale = float(np.float32(self.multiple * norm))
        if not abs(scale) <= MAX_STEER:  # a unit direction: no element exceeds |scale|
            return None
        return pb.SteeringAction(layer=self.layer, add=pb.AddDirection(direction=self.direction, scale=scale))


@dataclass(frozen=True)
class PolicyTemplate:
    """A compiled policy: its actions are ready protobuf actions or RelativeAdds to resolve."""

    name: str
    selector: dict
    actions: tuple
    mode: str = "enforce"  # shadow: left out of plans; matching requests are counted and audited

    @property
    def relative_layers(self) -> set[int]:
        return {a.layer for a in self.actions if isinstance(a, RelativeAdd)}


@dataclass
class _Ring:
    values: np.ndarray = field(default_factory=lambda: np.zeros(WINDOW, np.float64))
    count: int = 0  # rows ever measured
    since_median: int = 0  # rows measured since the median was last computed


class ResidualNorms:
    """Per layer, the median L2 norm of residual rows (the tapped stream, before the final norm).

    `observe` runs on the pipeline thread; `median` may be read from any thread (a dict swapped
    whole)."""

    def __init__(self) -> None:
        self._rings: dict[int, _Ring] = {}
        self._calls: dict[int, int] = {}
        self.medians: dict[int, float] = {}
        self.plan_medians: dict[int, float] = {}  # what the last plan's policies were resolved with
        self.policy_layers: set[int] = set()
        self._lock = threading.Lock()

    def due(self, layer: int) -> bool:
        """Whether to measure this batch of the layer: every batch until the median is known, then
        one in EVERY (a sample either way; it keeps the cost per batch to a few microseconds)."""
        n = self._calls.get(layer, 0)
        self._calls[layer] = n + 1
        return layer not in self.medians or n % EVERY == 0

    def observe(self, layer: int, x: torch.Tensor, idx: np.ndarray) -> float | None:
        """Measure up to SAMPLE of the rows ``idx`` of ``x [n, d]`` (evenly spaced; only those rows
        are read); the new median when one was computed."""
        n = int(idx.size)
        if n == 0:
            return None
        if n == x.shape[0] and n >= SAMPLE:  # every row a candidate: a strided view, no copy
            rows = x[:: n // SAMPLE][:SAMPLE]
        else:
            rows = x[torch.from_numpy(idx[(np.arange(min(n, SAMPLE)) * n) // min(n, SAMPLE)].astype(np.int64))]
        values = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).numpy().astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return None
        ring = self._rings.setdefault(layer, _Ring())
        idx = (ring.count + np.arange(values.size)) % WINDOW
        ring.values[idx] = values
        ring.count += values.size
        ring.since_median += values.size
        known = layer in self.medians
        if ring.count < MIN_TOKENS or (known and ring.since_median < REFRESH):
            return None
        ring.since_median = 0
        median = float(np.median(ring.values[: min(ring.count, WINDOW)]))
        self.medians = {**self.medians, layer: median}
        return median

    def median(self, layer: int) -> float | None:
        return self.medians.get(layer)

    def needs_replan(self) -> bool:
        """Whether a policy layer's median is newly known or moved past REPLAN_CHANGE since the plan."""
        for layer in self.policy_layers:
            now, used = self.medians.get(layer), self.plan_medians.get(layer)
            if now is not None and (used is None or abs(now - used) > REPLAN_CHANGE * used):
                return True
        return False

    def resolve_policies(self, templates) -> tuple[list[pb.SteeringPolicy], list[str]]:
        """Protobuf policies for a plan; also the names of policies with actions withheld (median
        unknown). A policy left with no action is left out: its requests are not steered."""
        with self._lock:
            self.policy_layers = set().union(*(t.relative_layers for t in templates)) if templates else set()
            medians = dict(self.medians)
            self.plan_medians = {layer: medians[layer] for layer in self.policy_layers if layer in medians}
        out, waiting = [], []
        for t in templates:
            actions = [a.resolve(medians.get(a.layer)) if isinstance(a, RelativeAdd) else a for a in t.actions]
            ready = [a for a in actions if a is not None]
            if len(ready) < len(actions):
                waiting.append(t.name)
            if ready:
                out.append(pb.SteeringPolicy(name=t.name, selector=t.selector, actions=ready))
        return out, waiting
