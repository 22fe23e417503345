"""The sidecar's encode stage: load the configured dictionaries and turn a layer's activation rows
into the signal columns the rules need (watched SAE features and probe probabilities).

Only features that rules reference are computed (an [N, d] x [d, M] product per SAE), so watching a
handful of features of a 16k-feature SAE costs a small fraction of a full encode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.config import SourceConfig
from monitor.encode import load_probes, load_sae


@dataclass(frozen=True)
class SignalKey:
    """One column of a layer's signal matrix: an SAE feature or a probe of a named source."""

    source: str
    feature: int | None = None
    probe: str | None = None

    @property
    def label(self) -> str:
        return str(self.feature) if self.feature is not None else str(self.probe)


class Dictionaries:
    """The SAEs and probe banks named in the config, loaded once at start-up."""

    def __init__(self, sources: list[SourceConfig], device: str = "cpu") -> None:
        self.configs = {s.name: s for s in sources}
        self.saes = {}
        self.probes = {}
        for source in sources:
            if source.kind == "sae":
                self.saes[source.name] = load_sae(source.path, format=source.format, device=device)
            else:
                self.probes[source.name] = load_probes(source.path, device=device)

    def layer_of(self, source: str) -> int:
        return self.configs[source].layer

    def d_model(self) -> int | None:
        dims = {sae.d_in for sae in self.saes.values()} | {bank.d_in for bank in self.probes.values()}
        if len(dims) > 1:
            raise ValueError(f"sources disagree on d_model: {sorted(dims)}")
        return dims.pop() if dims else None


@dataclass
class LayerSignals:
    """What to compute on one layer: watched features per SAE and every probe of each bank."""

    layer: int
    columns: list[SignalKey] = field(default_factory=list)
    _parts: list = field(default_factory=list)  # (callable x -> [N, k], width)

    def compute(self, x: torch.Tensor) -> np.ndarray:
        """[N, d] activations -> [N, len(columns)] float32 signals."""
        if not self._parts:
            return np.zeros((x.shape[0], 0), dtype=np.float32)
        blocks = [fn(x) for fn, _ in self._parts]
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return out.detach().to("cpu", torch.float32).numpy()


class EncodeStage:
    """Per-layer signal plans, built from the columns the compiled rules ask for."""

    def __init__(self, dictionaries: Dictionaries, wanted: list[SignalKey]) -> None:
        self.layers: dict[int, LayerSignals] = {}
        by_source: dict[str, list[SignalKey]] = {}
        for key in dict.fromkeys(wanted):  # unique, in order
            by_source.setdefault(key.source, []).append(key)
        for source, keys in by_source.items():
            layer = dictionaries.layer_of(source)
            plan = self.layers.setdefault(layer, LayerSignals(layer))
            if source in dictionaries.saes:
                features = [k.feature for k in keys]
                watch = dictionaries.saes[source].watch(features)
                plan._parts.append((watch, len(features)))
                plan.columns.extend(keys)
            else:
                bank = dictionaries.probes[source]
                plan._parts.append((bank.score, len(bank.names)))
                plan.columns.extend(SignalKey(source, probe=name) for name in bank.names)

    def column(self, key: SignalKey) -> tuple[int, int]:
        for layer, plan in self.layers.items():
            if key in plan.columns:
                return layer, plan.columns.index(key)
        raise KeyError(key)

    def compute(self, layer: int, x: torch.Tensor) -> np.ndarray | None:
        plan = self.layers.get(layer)
        return None if plan is None else plan.compute(x)
