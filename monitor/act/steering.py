"""Steering: turn rule actions and policies into directives the plugin applies per request.

The plugin cannot run an SAE; it gets, per clamped feature, the encoder column, bias, threshold and
decoder row it needs (`SAE.clamp_params`), so clamping keeps the SAE error term inside vLLM.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

from monitor.evaluate.rules import SteerSpec
from monitor.protocol import pb


def tensor_f32(vector: np.ndarray) -> pb.Tensor:
    vector = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
    return pb.Tensor(dtype=pb.FLOAT32, shape=[vector.shape[0]], data=vector.tobytes())


def load_direction(path: Path) -> np.ndarray:
    """A steering direction from .npy (no pickles) or .safetensors (tensor named `direction`)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "direction" not in tensors:
            raise ValueError(f"{path}: no tensor named 'direction' (has {sorted(tensors)})")
        return tensors["direction"].astype(np.float32).reshape(-1)
    raise ValueError(f"{path}: direction files must be .npy or .safetensors")


def build_steering_action(spec: SteerSpec, dictionaries) -> pb.SteeringAction:
    """Resolve a steer spec against the loaded SAEs into a self-contained protobuf action."""
    if spec.clamp is not None:
        c = spec.clamp
        params = dictionaries.saes[c.source].clamp_params(c.feature)
        clamp = pb.Clamp(
            source=c.source, feature=c.feature, encoder=tensor_f32(params.encoder), bias=float(params.bias),
            threshold=float(params.threshold), decoder=tensor_f32(params.decoder), value=float(c.value),
        )
        if params.gate_encoder is not None:
            clamp.gate_encoder.CopyFrom(tensor_f32(params.gate_encoder))
            clamp.gate_bias = float(params.gate_bias)
        layer = c.layer if c.layer is not None else dictionaries.layer_of(c.source)
        return pb.SteeringAction(layer=layer, clamp=clamp)
    a = spec.add
    if a.direction_file is not None:
        direction = load_direction(a.direction_file)
        d_model = dictionaries.d_model()
        if d_model is not None and direction.shape[0] != d_model:
            raise ValueError(f"{a.direction_file}: direction has {direction.shape[0]} values, model d={d_model}")
        layer = a.layer
    else:
        direction = dictionaries.saes[a.source].clamp_params(a.feature).decoder
        layer = a.layer if a.layer is not None else dictionaries.layer_of(a.source)
    return pb.SteeringAction(layer=layer, add=pb.AddDirection(direction=tensor_f32(direction), scale=float(a.scale)))


class SteeringController:
    """Decides which fired rules become directives; the kill switch and failure mode live here."""

    def __init__(self, enabled: bool, failure_mode: str) -> None:
        self.enabled = enabled
        self.failure_mode = failure_mode
        self._ids = itertools.count(1)
        self.steered: dict[str, float] = {}  # request id -> first steered time

    def directive(self, request_id: str, rule: str, position: int, actions) -> pb.SteeringDirective | None:
        if not self.enabled or not actions:
            return None
        self.steered.setdefault(request_id, time.time())
        return pb.SteeringDirective(
            directive_id=f"d{next(self._ids)}", request_id=request_id, rule=rule,
            from_position=position + 1, actions=list(actions),
        )

    def forget(self, request_id: str) -> None:
        self.steered.pop(request_id, None)
