"""Steering actions as the plugin receives them: parsed from the proto, bounded, content-keyed.

The sidecar validates what it sends, but the plugin runs inside vLLM and must not trust the
stream: a value that is not finite, or large enough to overflow the residual stream, would reach
every token of a request and, through the KV cache, other requests. So every number is checked
here, and an action that fails is refused with a short message naming the field and the value.

Bounds (documented in docs/plugin.md):

* every scalar (``bias``, ``threshold``, ``gate_bias``, ``value``, ``scale``) and every vector
  element is finite and at most :data:`MAX_ABS` in magnitude;
* what an action can add to a row is capped in absolute terms: ``|scale| * |direction|`` and
  ``|value| * |decoder|`` are at most ``max_norm`` (``FEATUREWATCH_STEER_MAX_NORM``, default 1e5,
  at most a sixteenth of the model dtype's largest value). An absolute cap is checked once, at
  parse time, and costs nothing in the forward; the in-graph finiteness check (ops.py) catches
  whatever still overflows.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from monitor.protocol import pb

MAX_ABS = 1e6  # any scalar or vector element of an action
DEFAULT_MAX_NORM = 1e5  # what one action may add to a row (L2), before the dtype cap
MAX_NORM_CAP = 1e30  # whatever the setting (see ops.steer_math)


@dataclass(frozen=True)
class ActionLimits:
    max_abs: float = MAX_ABS
    max_norm: float = DEFAULT_MAX_NORM

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, max_norm: float = DEFAULT_MAX_NORM) -> ActionLimits:
        """``max_norm`` capped at a sixteenth of the dtype's range (fp16: 4094) and at 1e30
        (the op relies on it: adding that much to a finite fp32/bf16 row cannot overflow)."""
        top = float(torch.finfo(dtype).max) / 16 if dtype.is_floating_point else MAX_NORM_CAP
        if not (math.isfinite(max_norm) and max_norm > 0):
            max_norm = DEFAULT_MAX_NORM
        return cls(max_norm=min(max_norm, top, MAX_NORM_CAP))


DEFAULT_LIMITS = ActionLimits()


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def check_scalar(value: float, what: str, limits: ActionLimits) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what}={_fmt(v)} is not finite")
    if abs(v) > limits.max_abs:
        raise ValueError(f"{what}={_fmt(v)} is out of bounds (|{what}| <= {_fmt(limits.max_abs)})")
    return v


def tensor_to_vector(t: pb.Tensor, d_model: int, what: str,
                     limits: ActionLimits = DEFAULT_LIMITS) -> np.ndarray:
    shape = list(t.shape)
    n = int(np.prod(shape)) if shape else 0
    if t.dtype in (pb.FLOAT32, pb.DTYPE_UNSPECIFIED):
        itemsize = 4
    elif t.dtype in (pb.FLOAT16, pb.BFLOAT16):
        itemsize = 2
    else:
        raise ValueError(f"{what}: unsupported dtype {t.dtype}")
    if len(t.data) != d_model * itemsize or (shape and n != d_model):
        raise ValueError(f"{what}: expected {d_model} values, got shape {shape[:4]} / "
                         f"{len(t.data) // itemsize}")
    if t.dtype in (pb.FLOAT32, pb.DTYPE_UNSPECIFIED):
        arr = np.frombuffer(t.data, dtype="<f4")
    elif t.dtype == pb.FLOAT16:
        arr = np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    else:
        bits = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        arr = bits.view(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        i = int(np.argmin(finite))
        raise ValueError(f"{what}[{i}]={_fmt(float(arr[i]))} is not finite")
    big = np.abs(arr) > limits.max_abs
    if big.any():
        i = int(np.argmax(big))
        raise ValueError(f"{what}[{i}]={_fmt(float(arr[i]))} is out of bounds "
                         f"(|x| <= {_fmt(limits.max_abs)})")
    return np.array(arr, dtype=np.float32)


def _check_norm(norm: float, what: str, limits: ActionLimits) -> None:
    if not norm <= limits.max_norm:
        raise ValueError(f"{what}={_fmt(norm)} exceeds the steering cap {_fmt(limits.max_norm)} "
                         f"(FEATUREWATCH_STEER_MAX_NORM)")


def _digest(*parts: bytes | str | float) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str):
            p = p.encode()
        elif isinstance(p, float):
            p = np.float32(p).tobytes()
        h.update(p)
        h.update(b"\x00")
    return h.hexdigest()[:24]


@dataclass(frozen=True, eq=False)
class ClampAction:
    layer: int
    encoder: np.ndarray
    bias: float
    threshold: float
    decoder: np.ndarray
    value: float
    gate_encoder: np.ndarray | None
    gate_bias: float
    feature: int = 0
    source: str = ""
    key: str = ""

    @property
    def kind(self) -> str:
        return "clamp"


@dataclass(frozen=True, eq=False)
class AddAction:
    layer: int
    vector: np.ndarray  # scale * direction
    key: str = ""

    @property
    def kind(self) -> str:
        return "add"


Action = ClampAction | AddAction


def parse_action(a: pb.SteeringAction, d_model: int,
                 limits: ActionLimits = DEFAULT_LIMITS) -> Action:
    """One proto action, checked against ``limits``; raises ValueError naming the field."""
    which = a.WhichOneof("kind")
    if which == "clamp":
        c = a.clamp
        enc = tensor_to_vector(c.encoder, d_model, "clamp.encoder", limits)
        dec = tensor_to_vector(c.decoder, d_model, "clamp.decoder", limits)
        gate = (
            tensor_to_vector(c.gate_encoder, d_model, "clamp.gate_encoder", limits)
            if len(c.gate_encoder.data)
            else None
        )
        bias = check_scalar(c.bias, "clamp.bias", limits)
        threshold = check_scalar(c.threshold, "clamp.threshold", limits)
        value = check_scalar(c.value, "clamp.value", limits)
        gate_bias = check_scalar(c.gate_bias, "clamp.gate_bias", limits)
        _check_norm(abs(value) * float(np.linalg.norm(dec.astype(np.float64))),
                    "|clamp.value| * |clamp.decoder|", limits)
        key = _digest("clamp", str(a.layer), enc.tobytes(), bias, threshold, dec.tobytes(),
                      value, b"" if gate is None else gate.tobytes(), gate_bias)
        return ClampAction(a.layer, enc, bias, threshold, dec, value, gate, gate_bias,
                           c.feature, c.source, key)
    if which == "add":
        direction = tensor_to_vector(a.add.direction, d_model, "add.direction", limits)
        scale = check_scalar(a.add.scale, "add.scale", limits)
        vec = (direction.astype(np.float64) * scale).astype(np.float32)
        _check_norm(float(np.linalg.norm(vec.astype(np.float64))),
                    "|add.scale * add.direction|", limits)
        key = _digest("add", str(a.layer), vec.tobytes())
        return AddAction(a.layer, vec, key)
    raise ValueError("steering action without clamp or add")


def program_key(actions: tuple[Action, ...]) -> str:
    return _digest(*sorted(a.key for a in actions)) if actions else ""


def policy_hash(policy: pb.SteeringPolicy) -> str:
    return _digest("policy", policy.name,
                   *[a.SerializeToString(deterministic=True) for a in policy.actions])
