"""Steering: turn rule actions and policies into directives the plugin applies per request.

The plugin cannot run an SAE; it gets, per clamped feature, the encoder column, bias, threshold and
decoder row it needs (`SAE.clamp_params`), so clamping keeps the SAE error term inside vLLM.
"""

from __future__ import annotations

import io
import itertools
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from monitor.evaluate.loader import clip
from monitor.files import read_regular_file
from monitor.act.units import RelativeAdd, ResidualNorms
from monitor.evaluate.rules import MAX_STEER, SteerSpec
from monitor.protocol import pb

# A direction is d_model numbers (64 KiB of float32 at d = 16384); a file holding more than this is
# not a steering direction.
MAX_DIRECTION_BYTES = 16 * 1024 * 1024


class DirectionRefused(ValueError):
    """A steering vector that cannot be used; `field` is the offending field of the `add` spec."""

    def __init__(self, message: str, field: str = "direction_file") -> None:
        self.field = field
        super().__init__(clip(message, 300))


def tensor_f32(vector, what: str = "tensor") -> pb.Tensor:
    """A float32 wire tensor; refuses values that are not finite once in float32."""
    vector = np.asarray(vector)
    with np.errstate(over="ignore", invalid="ignore"):
        vector = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
    if not np.isfinite(vector).all():
        raise ValueError(f"{what}: values must be finite")
    return pb.Tensor(dtype=pb.FLOAT32, shape=[vector.shape[0]], data=vector.tobytes())


def finite_f32(value: float, what: str) -> float:
    """`value` as the float32 a directive carries: finite and within ±MAX_STEER, or ValueError."""
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = float(np.float32(value))
    if not np.isfinite(as32):
        raise ValueError(f"{what} must be finite (got {value!r}, {as32!r} as float32)")
    return as32


def resolve_direction_path(path: str | Path, directions: Sequence[Path]) -> Path:
    """The real path of a direction file, which must lie inside one of `directions` (symlinks resolved)."""
    if not directions:
        raise DirectionRefused(f"{path}: no direction directories are configured (sidecar config direction_dirs)")
    candidate = Path(path) if Path(path).is_absolute() else Path(directions[0]) / path
    real = os.path.realpath(candidate)
    for root in directions:
        root = os.path.realpath(root)
        if os.path.commonpath([root, real]) == root:
            return Path(real)
    raise DirectionRefused(f"{path}: outside the direction directories {[str(d) for d in directions]}")


def load_direction(path: str | Path, directions: Sequence[Path] = (), d_model: int | None = None) -> np.ndarray:
    """A steering direction from .npy (no pickles) or .safetensors (tensor named `direction`), read only
    from `directions`, only if a regular file of at most MAX_DIRECTION_BYTES, finite and [d_model]."""
    suffix = Path(path).suffix
    if suffix not in (".npy", ".safetensors"):
        raise DirectionRefused(f"{path}: direction files must be .npy or .safetensors")
    real = resolve_direction_path(path, directions)
    try:
        data = read_regular_file(real, MAX_DIRECTION_BYTES)
    except OSError as exc:
        raise DirectionRefused(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DirectionRefused(str(exc)) from None
    try:
        if suffix == ".npy":
            array = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            from safetensors.numpy import load

            tensors = load(data)
            if "direction" not in tensors:
                raise DirectionRefused(f"{path}: no tensor named 'direction' (has {sorted(tensors)[:10]})")
            array = tensors["direction"]
    except DirectionRefused:
        raise
    except Exception as exc:  # numpy and safetensors raise many types for corrupt files
        raise DirectionRefused(f"{path}: cannot read {suffix}: {type(exc).__name__}: {exc}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
        raise DirectionRefused(f"{path}: a direction must hold numeric values (got dtype {getattr(array, 'dtype', '?')})")
    if d_model is None:
        raise DirectionRefused(f"{path}: cannot check the direction's length: no SAE or probe source is configured")
    if array.size != d_model or array.ndim > 2:
        raise DirectionRefused(f"{path}: direction has {array.size} values (shape {list(array.shape)}), "
                               f"model d_model is {d_model}")
    with np.errstate(over="ignore", invalid="ignore"):
        direction = array.astype(np.float32).reshape(-1)
    if not np.isfinite(direction).all():
        raise DirectionRefused(f"{path}: direction values must be finite (as float32)")
    return direction


def build_steering_action(spec: SteerSpec, dictionaries, directions: Sequence[Path] = ()) -> pb.SteeringAction | RelativeAdd:
    """Resolve a steer spec against the loaded SAEs into a self-contained protobuf action (a
    RelativeAdd for `scale_unit: residual_norm`, resolved when it is sent).

    Every number is checked here again, whatever the schema let through: a directive never carries a
    value that is not finite in float32, nor a clamp value or added element beyond ±MAX_STEER.
    """
    if spec.clamp is not None:
        c = spec.clamp
        value = finite_f32(c.value, "clamp.value")
        if abs(value) > MAX_STEER:
            raise ValueError(f"clamp.value must be within ±{MAX_STEER:g} (got {value:g})")
        params = dictionaries.saes[c.source].clamp_params(c.feature)
        clamp = pb.Clamp(
            source=c.source, feature=c.feature, encoder=tensor_f32(params.encoder, "clamp.encoder"),
            bias=finite_f32(params.bias, "clamp.bias"), threshold=finite_f32(params.threshold, "clamp.threshold"),
            decoder=tensor_f32(params.decoder, "clamp.decoder"), value=value,
        )
        if params.gate_encoder is not None:
            clamp.gate_encoder.CopyFrom(tensor_f32(params.gate_encoder, "clamp.gate_encoder"))
            clamp.gate_bias = finite_f32(params.gate_bias, "clamp.gate_bias")
        layer = c.layer if c.layer is not None else dictionaries.layer_of(c.source)
        return pb.SteeringAction(layer=layer, clamp=clamp)
    a = spec.add
    scale = finite_f32(a.scale, "add.scale")
    if a.direction_file is not None:
        direction = unit(load_direction(a.direction_file, directions, dictionaries.d_model()), a.direction_file)
        layer = a.layer
    else:  # the decoder row only: any architecture, TopK included (no encoder column needed)
        direction = dictionaries.saes[a.source].direction(a.feature).numpy()
        layer = a.layer if a.layer is not None else dictionaries.layer_of(a.source)
    tensor = tensor_f32(direction, "add.direction")
    if a.scale_unit == "residual_norm":
        return RelativeAdd(layer, tensor, scale)  # bounded when resolved against the measured norm
    peak = float(np.abs(np.frombuffer(tensor.data, np.float32)).max(initial=0.0)) * abs(scale)
    if not peak <= MAX_STEER:
        raise DirectionRefused(f"scale × direction reaches {peak:g} in one element, limit {MAX_STEER:g}", field="scale")
    return pb.SteeringAction(layer=layer, add=pb.AddDirection(direction=tensor, scale=scale))


def unit(direction: np.ndarray, what: str) -> np.ndarray:
    """``direction`` scaled to unit L2 norm: `add.scale` is then the norm of what is added."""
    with np.errstate(over="ignore", invalid="ignore"):
        norm = float(np.linalg.norm(direction.astype(np.float64)))
    if not (norm > 0 and np.isfinite(norm)):
        raise DirectionRefused(f"{what}: the direction has norm {norm:g}; it must be non-zero")
    return (direction.astype(np.float64) / norm).astype(np.float32)


def action_is_finite(action: pb.SteeringAction) -> bool:
    """Re-check a ready action (cheap: a few d-vectors) before it leaves in a directive."""
    kind = action.WhichOneof("kind")
    if kind == "clamp":
        c = action.clamp
        scalars = [c.value, c.bias, c.threshold, c.gate_bias]
        tensors = [c.encoder, c.decoder] + ([c.gate_encoder] if c.HasField("gate_encoder") else [])
        bounded = abs(c.value) <= MAX_STEER
    elif kind == "add":
        scalars, tensors = [action.add.scale], [action.add.direction]
        bounded = abs(action.add.scale) <= MAX_STEER
    else:
        return False
    if not (bounded and np.isfinite(scalars).all()):
        return False
    for t in tensors:
        if t.dtype != pb.FLOAT32 or len(t.data) % 4 or not np.isfinite(np.frombuffer(t.data, "<f4")).all():
            return False
    return True


class SteeringController:
    """Decides which fired rules become directives; the kill switch and failure mode live here."""

    def __init__(self, enabled: bool, failure_mode: str, norms: ResidualNorms | None = None, on_withheld=None) -> None:
        self.enabled = enabled
        self.failure_mode = failure_mode
        self.norms = norms or ResidualNorms()
        self.on_withheld = on_withheld  # called with a reason for each action not sent
        self._ids = itertools.count(1)
        self.steered: dict[str, float] = {}  # request id -> first steered time
        self.dropped_nonfinite = 0  # actions withheld because a value was not finite or out of bounds

    def resolve(self, actions, count: bool = True) -> list[pb.SteeringAction]:
        """Relative adds against the layers' measured residual norms; those that cannot be are withheld
        (counted unless ``count`` is False: shadow actions are never sent anyway)."""
        out = []
        for a in actions:
            if isinstance(a, RelativeAdd):
                norm = self.norms.median(a.layer)
                a = a.resolve(norm)
                if a is None:
                    if count:
                        self._withheld("residual_norm_unknown" if norm is None else "out_of_bounds")
                    continue
            out.append(a)
        return out

    def _withheld(self, reason: str) -> None:
        if self.on_withheld is not None:
            self.on_withheld(reason)

    def directive(self, request_id: str, rule: str, position: int, actions, *,
                  shadow: bool = False) -> pb.SteeringDirective | None:
        """The directive a fired rule sends. ``shadow``: the same directive, computed for the audit
        only (`mode: shadow`): it is never sent, so it neither marks the request steered nor counts
        withheld actions."""
        if not self.enabled or not actions:
            return None
        actions = self.resolve(actions, count=not shadow)
        checked = [a for a in actions if action_is_finite(a)]
        for _ in range(0 if shadow else len(actions) - len(checked)):  # steering_withheld_actions{reason="nonfinite"}
            self.dropped_nonfinite += 1
            self._withheld("nonfinite")
        if not checked:
            return None
        actions = checked
        if not shadow:
            self.steered.setdefault(request_id, time.time())
        return pb.SteeringDirective(
            directive_id=f"{'s' if shadow else 'd'}{next(self._ids)}", request_id=request_id, rule=rule,
            from_position=position + 1, actions=list(actions),
        )

    def shadow_policies(self, templates, metadata: dict) -> list[tuple[str, list[pb.SteeringAction]]]:
        """The `mode: shadow` policies a new request matches, each with the actions a plan would
        carry now (relative adds resolved; a policy left without actions, as a plan would leave it
        out, is not listed). Matching is the plugin's: every selector key equal in the metadata."""
        if not self.enabled:
            return []
        out = []
        for t in templates:
            if all(metadata.get(k) == v for k, v in t.selector.items()):
                actions = [a for a in self.resolve(t.actions, count=False) if action_is_finite(a)]
                if actions:
                    out.append((t.name, actions))
        return out

    def forget(self, request_id: str) -> None:
        self.steered.pop(request_id, None)
