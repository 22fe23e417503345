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


STACK_ALIGN = 8  # stacked columns padded to a multiple of 8: MKL's product with an odd width is
# slower than with the next multiple of 8 (256 x 2304 rows, one thread: 19 columns 581 us, 24: 437 us)


@dataclass
class LayerSignals:
    """What to compute on one layer: watched features per SAE and every probe of each bank.

    Where every encoder of the layer is an affine map followed by an activation (the usual case:
    ReLU/JumpReLU/gated watches without input normalisation, probe banks), their weights are
    stacked and the layer costs one [N, d] x [d, M + P] product: the activations, which do not
    fit in cache, are read once instead of once per encoder."""

    layer: int
    columns: list[SignalKey] = field(default_factory=list)
    _parts: list = field(default_factory=list)  # encoders: Watch or ProbeBank (affine/activate), in column order
    _stacked: tuple | None = None  # (W [d, K'], c [K']) when every part is affine (K' >= K: padding)

    def add(self, encoder, keys: list[SignalKey]) -> None:
        self._parts.append((encoder, len(keys)))
        self.columns.extend(keys)
        affines = [enc.affine() for enc, _ in self._parts]
        self._stacked = None
        if all(a is not None for a in affines):
            w, c = torch.cat([w for w, _ in affines], dim=1), torch.cat([c for _, c in affines])
            pad = -w.shape[1] % STACK_ALIGN
            if pad:  # zero columns, never returned
                w, c = torch.cat([w, w.new_zeros(w.shape[0], pad)], dim=1), torch.cat([c, c.new_zeros(pad)])
            self._stacked = (w.contiguous(), c.contiguous())

    @property
    def stacked(self) -> bool:
        return self._stacked is not None

    def compute(self, x: torch.Tensor) -> np.ndarray:
        """[N, d] activations -> [N, len(columns)] float32 signals."""
        if not self._parts:
            return np.zeros((x.shape[0], 0), dtype=np.float32)
        if self._stacked is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            with torch.no_grad():
                z = torch.addmm(self._stacked[1], x.reshape(-1, x.shape[-1]), self._stacked[0])
                start = 0
                for encoder, width in self._parts:
                    view = z[:, start:start + width]
                    out = encoder.activate(view)
                    if out is not view:
                        view.copy_(out)
                    start += width
            return z.numpy() if start == z.shape[1] else np.ascontiguousarray(z[:, :start].numpy())
        blocks = [self._evaluate(encoder, x) for encoder, _ in self._parts]
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return out.detach().to("cpu", torch.float32).numpy()

    @staticmethod
    def _evaluate(encoder, x: torch.Tensor) -> torch.Tensor:
        return encoder.score(x) if hasattr(encoder, "score") else encoder(x)


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
                plan.add(dictionaries.saes[source].watch([k.feature for k in keys]), keys)
            else:
                bank = dictionaries.probes[source]
                plan.add(bank, [SignalKey(source, probe=name) for name in bank.names])

    def column(self, key: SignalKey) -> tuple[int, int]:
        for layer, plan in self.layers.items():
            if key in plan.columns:
                return layer, plan.columns.index(key)
        raise KeyError(key)

    def compute(self, layer: int, x: torch.Tensor) -> np.ndarray | None:
        plan = self.layers.get(layer)
        return None if plan is None else plan.compute(x)
