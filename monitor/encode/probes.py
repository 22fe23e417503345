"""Linear probes: all probes of a layer scored in one [N, d]×[d, P] product.

File (safetensors): ``weight [P, d]``, ``bias [P]``, optional ``mean [d]``/``scale [d]``
(input standardisation ``(x − mean)/scale``), ``platt_a [P]``/``platt_b [P]`` (calibrated
probability ``sigmoid(a·logit + b)``), ``threshold [P]`` (decision threshold on the probability,
e.g. set at 1 % FPR on benign traffic); metadata ``{"names": JSON list, "layer": "N"}``.
The standardisation is folded into the weights at load, so scoring is one addmm.

Every tensor must be finite and within ``checks.MAX_MAGNITUDE`` (1e20), and so must the
folded weights (a tiny ``scale`` would overflow them); ``scale`` may not contain 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import tensor_problem
from .errors import ProbeFormatError, short

_OPTIONAL = ("mean", "scale", "platt_a", "platt_b", "threshold")


class ProbeBank:
    """P linear probes reading one layer's activations; scores are float32 probabilities."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        *,
        names: Sequence[str],
        layer: int,
        mean: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        platt_a: torch.Tensor | None = None,
        platt_b: torch.Tensor | None = None,
        threshold: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ):
        tensors = _validated(
            {"weight": weight, "bias": bias, "mean": mean, "scale": scale,
             "platt_a": platt_a, "platt_b": platt_b, "threshold": threshold},
            names,
        )  # fmt: skip
        self.names = list(names)
        self.layer = int(layer)
        self.device = torch.device(device)
        self.source = {k: v for k, v in tensors.items()}  # as given, float32 on CPU (for save)
        w, b = _folded(tensors, "<probes>")
        self._W = w.T.contiguous().float().to(self.device)  # [d, P]
        self._b = b.float().to(self.device)
        self.calibrated = "platt_a" in tensors
        self._a = tensors["platt_a"].to(self.device) if self.calibrated else None
        self._pb = tensors["platt_b"].to(self.device) if self.calibrated else None
        self.threshold = tensors["threshold"].to(self.device) if "threshold" in tensors else None

    @property
    def n_probes(self) -> int:
        return len(self.names)

    @property
    def d_in(self) -> int:
        return int(self._W.shape[0])

    def __len__(self) -> int:
        return self.n_probes

    def __repr__(self) -> str:
        return f"ProbeBank(layer={self.layer}, probes={self.names}, d_in={self.d_in}, calibrated={self.calibrated})"

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no probe named {name!r} (have {self.names})") from None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            raise ValueError(f"expected activations [..., {self.d_in}], got {tuple(x.shape)}")
        return x.reshape(-1, self.d_in).to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """[N, P] logits, Platt-calibrated (a·logit + b) when the bank has calibration."""
        z = torch.addmm(self._b, self._prepare(x), self._W)
        if calibrated and self.calibrated:
            z = torch.addcmul(self._pb, z, self._a)
        return z

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """[N, P] calibrated probabilities, float32."""
        return torch.sigmoid_(self.logits(x))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(W [d_in, P], c [P])`` with raw logits ``x·W + c`` (mean/scale folded in), so the
        sidecar can stack the bank with a layer's SAE watches into one product; None off CPU."""
        return (self._W, self._b) if self.device.type == "cpu" else None

    @torch.no_grad()
    def activate(self, z: torch.Tensor) -> torch.Tensor:
        """Probabilities from raw logits of :meth:`affine`, in place: Platt then sigmoid."""
        if self.calibrated:
            z.mul_(self._a).add_(self._pb)
        return torch.sigmoid_(z)

    def decide(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Bool [N, P]: probability ≥ each probe's threshold (0.5 where the file sets none)."""
        t = self.threshold if self.threshold is not None else torch.full((self.n_probes,), 0.5, device=self.device)
        return probabilities >= t.to(probabilities.device)

    def save(self, path: str | Path) -> None:
        s = self.source
        save_probes(path, s["weight"], s["bias"], names=self.names, layer=self.layer,
                    **{k: s.get(k) for k in _OPTIONAL})  # fmt: skip


def _validated(tensors: dict[str, Any], names: Sequence[str], path: str | Path = "<probes>") -> dict[str, torch.Tensor]:
    """Shapes, dtypes, finiteness and names of a probe bank; ProbeFormatError naming the problem."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if v is None:
            continue
        t = torch.as_tensor(v)
        if not t.is_floating_point():
            raise ProbeFormatError(path, f"{k} is not a floating-point tensor")
        out[k] = t.detach().to("cpu", torch.float32).contiguous()
    for k in ("weight", "bias"):
        if k not in out:
            raise ProbeFormatError(path, f"missing tensor {k}")
    w = out["weight"]
    if w.dim() != 2:
        raise ProbeFormatError(path, f"weight has shape {list(w.shape)}, expected [P, d]")
    P, d = w.shape
    shapes = {"bias": (P,), "mean": (d,), "scale": (d,), "platt_a": (P,), "platt_b": (P,), "threshold": (P,)}
    for k, t in out.items():
        if k in shapes and tuple(t.shape) != shapes[k]:
            raise ProbeFormatError(path, f"{k} has shape {list(t.shape)}, expected {list(shapes[k])} (weight is [{P}, {d}])")
        problem = tensor_problem(k, t)
        if problem:
            raise ProbeFormatError(path, problem)
    if ("platt_a" in out) != ("platt_b" in out):
        raise ProbeFormatError(path, "platt_a and platt_b must come together")
    if "scale" in out and bool((out["scale"] == 0).any()):
        n = int((out["scale"] == 0).sum())
        raise ProbeFormatError(path, f"scale contains zeros ({n} of {d}): standardisation divides by it")
    _folded(out, path)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ProbeFormatError(path, "names must be a list of non-empty strings")
    if len(names) != P:
        raise ProbeFormatError(path, f"{len(names)} names for {P} probes")
    if len(set(names)) != len(names):
        raise ProbeFormatError(path, "probe names are not unique")
    return out


def _folded(tensors: dict[str, torch.Tensor], path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [P, d] and bias [P] (float64) with the standardisation folded in; refused if
    the fold leaves the bound (weight/scale overflows for a tiny scale)."""
    w = tensors["weight"].double()
    b = tensors["bias"].double()
    if "scale" in tensors:
        w = w / tensors["scale"].double()
    if "mean" in tensors:
        b = b - w @ tensors["mean"].double()
    for name, t in (("weight/scale", w), ("bias − (weight/scale)·mean", b)):
        problem = tensor_problem(name, t)
        if problem:
            raise ProbeFormatError(path, f"standardised {problem}")
    return w, b


def save_probes(
    path: str | Path,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    names: Sequence[str],
    layer: int,
    mean: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    platt_a: torch.Tensor | None = None,
    platt_b: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> Path:
    """Write a probe bank file (validated first, so a written file always loads)."""
    path = Path(path)
    tensors = _validated(
        {"weight": weight, "bias": bias, "mean": mean, "scale": scale,
         "platt_a": platt_a, "platt_b": platt_b, "threshold": threshold},
        list(names), path,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"names": json.dumps(list(names)), "layer": str(int(layer))})
    return path


def load_probes(path: str | Path, *, device: torch.device | str = "cpu") -> ProbeBank:
    """Load a probe bank file; ProbeFormatError (a SAEFormatError) for anything malformed."""
    path = Path(path)
    if not path.exists():
        raise ProbeFormatError(path, "no such file")
    if not path.is_file():  # a FIFO would block the loader
        raise ProbeFormatError(path, "not a regular file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ProbeFormatError(path, f"not a readable safetensors file ({e})") from None
    extra = sorted(set(tensors) - {"weight", "bias", *_OPTIONAL})
    if extra:
        raise ProbeFormatError(path, f"unexpected tensor(s) {', '.join(extra)}")
    try:
        names = json.loads(meta["names"])
    except KeyError:
        raise ProbeFormatError(path, "metadata has no 'names'") from None
    except json.JSONDecodeError as e:
        raise ProbeFormatError(path, f"metadata 'names' is not JSON ({e})") from None
    except RecursionError:
        raise ProbeFormatError(path, "metadata 'names' is nested too deeply") from None
    try:
        layer = int(meta["layer"])
    except KeyError:
        raise ProbeFormatError(path, "metadata has no 'layer'") from None
    except ValueError:
        raise ProbeFormatError(path, f"metadata 'layer' is not an integer: {short(meta['layer'])}") from None
    _validated(tensors, names, path)
    return ProbeBank(**{k: tensors.get(k) for k in ("weight", "bias", *_OPTIONAL)}, names=names, layer=layer, device=device)
