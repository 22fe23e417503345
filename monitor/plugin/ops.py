"""The in-forward part of the plugin: static buffers and one opaque custom op per hooked layer.

Everything the forward pass touches is preallocated at model load and never reallocated, so the
same kernels keep working when vLLM captures them in a CUDA graph (FULL or PIECEWISE): the host
changes only the *contents* of these tensors between steps.

Per hooked layer ``l`` and token ``t`` with steering row ``r = steer_idx[t]``::

    x      = hidden + residual                       # the residual stream after layer l
    pre    = x . encoder[c] + bias[c]                 # every clamp slot c of layer l
    f      = pre * 1[pre > threshold[c]] * 1[x . gate_encoder[c] + gate_bias[c] > 0]
    delta  = sum_c active[r, c] * (value[c] - f) * decoder[c]  +  add[r]
    residual' = residual + delta      if row_on[r], residual + delta finite, |delta| <= max_norm
              = residual (bit for bit) otherwise      (nonfinite[l, r] += 1 when the steering,
                                                       not the model, broke a finite row)
    tap[l, t] = hidden + residual'

Row 0 is the no-op row: its tokens keep the exact residual tensor values. The guard is the last
line of defence (actions are bounded when parsed, actions.py, but a clamp's removal term depends
on x): whatever the tables hold, steering never writes NaN, Inf or more than ``max_norm`` into a
residual row, hence never into the KV cache that later requests may reuse. The host reads
``nonfinite`` after the step and drops the actions of a flagged row (guard.py). The op is a
registered torch library op, so Dynamo treats it as opaque (its mutations of ``tap`` and
``nonfinite`` are declared in the schema), which keeps the hooks valid under vLLM's torch.compile
and inside CUDA graphs.

Outside graph capture (CPU, eager, compiled-without-graphs) the op takes a host-side fast path when
the step has no steered token; while a CUDA graph is being captured it always records the full
static math, because a graph replays whatever was captured.
"""

from __future__ import annotations

import torch

# Set by the runner adapter before each forward: does any token of this step use a non-zero row?
_STEP = {"live": False}
_CUDA = torch.cuda.is_available()


def set_step_live(live: bool) -> None:
    _STEP["live"] = bool(live)


def step_live() -> bool:
    return _STEP["live"]


def capturing() -> bool:
    return _CUDA and torch.cuda.is_current_stream_capturing()


def steer_math(
    x: torch.Tensor,
    residual: torch.Tensor,
    idx: torch.Tensor,
    row_on: torch.Tensor,
    active: torch.Tensor,
    add: torch.Tensor,
    encg: torch.Tensor,
    bias: torch.Tensor,
    thr: torch.Tensor,
    gbias: torch.Tensor,
    val: torch.Tensor,
    dec: torch.Tensor,
    max_norm: float = 1e5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The steered residual for one layer (tables already sliced to that layer), and per token
    whether steering was refused because it would have made a finite row non-finite or added
    more than ``max_norm`` (L2) to it."""
    n_clamps = bias.shape[0]
    xf = x.float()
    pre = xf @ encg.t()  # [n, 2C]: clamp encoders then gate encoders
    z = pre[:, :n_clamps] + bias
    f = torch.where(z > thr, z, torch.zeros_like(z))
    gate = (pre[:, n_clamps:] + gbias) > 0
    f = torch.where(gate, f, torch.zeros_like(f))
    coef = torch.where(active.index_select(0, idx), val - f, torch.zeros_like(f))
    delta = coef @ dec + add.index_select(0, idx)
    on = row_on.index_select(0, idx)
    new = (residual.float() + delta).to(residual.dtype)
    # |delta|^2 is NaN or Inf when delta is: one reduction checks "finite and within the cap".
    # Adding at most max_norm (<= 1e30, actions.py) to a finite fp32/bf16 row cannot overflow
    # (half an ulp at their largest value is ~1e31); fp16 rows can, so they are checked too.
    ok = torch.linalg.vector_norm(delta, dim=1) <= max_norm
    if new.dtype == torch.float16:
        ok = ok & torch.isfinite(new).all(dim=1)
    # x was finite iff its encoder products are (a NaN/Inf element reaches every product): a
    # row the model itself made non-finite is kept as it is and not blamed on steering
    refused = on & ~ok & torch.isfinite(pre).all(dim=1)
    return torch.where((on & ok).unsqueeze(1), new, residual), refused


def _tap_steer(
    hidden: torch.Tensor | None,
    residual: torch.Tensor,
    steer_idx: torch.Tensor,
    row_on: torch.Tensor,
    active: torch.Tensor,
    add: torch.Tensor,
    encg: torch.Tensor,
    bias: torch.Tensor,
    thr: torch.Tensor,
    gbias: torch.Tensor,
    val: torch.Tensor,
    dec: torch.Tensor,
    tap: torch.Tensor,
    nonfinite: torch.Tensor,
    do_tap: bool,
    max_norm: float = 1e5,
) -> torch.Tensor:
    # The op runs inside vLLM's compiled graphs, where no Python around it can catch: any
    # failure here returns the residual unchanged (vLLM's own stream; the step is neither
    # harvested nor steered further) and is counted in wrapper_errors["tap_steer"].
    try:
        return _tap_steer_impl(hidden, residual, steer_idx, row_on, active, add, encg, bias,
                               thr, gbias, val, dec, tap, nonfinite, do_tap, max_norm)
    except Exception:  # noqa: BLE001
        from monitor.plugin import failopen, state

        failopen.failed("tap_steer", state.RUNTIME[0])  # and no harvest of this step
        return residual.clone()


def _tap_steer_impl(hidden, residual, steer_idx, row_on, active, add, encg, bias, thr, gbias,
                    val, dec, tap, nonfinite, do_tap, max_norm):
    n = min(residual.shape[0], steer_idx.shape[0])
    res = residual[:n]
    if not _STEP["live"] and not capturing():
        new_res = residual.clone()
    else:
        x = res if hidden is None else hidden[:n] + res
        idx = steer_idx[:n]
        steered, refused = steer_math(
            x, res, idx, row_on, active, add, encg, bias, thr, gbias, val, dec, max_norm
        )
        nonfinite.index_add_(0, idx, refused.to(nonfinite.dtype))
        if n == residual.shape[0]:
            new_res = steered
        else:  # more tokens than the static buffers cover: leave the rest unsteered
            new_res = torch.cat([steered, residual[n:]], dim=0)
    if do_tap:
        if hidden is None:
            tap[:n].copy_(new_res[:n])
        else:
            torch.add(hidden[:n], new_res[:n], out=tap[:n])
    return new_res


def _tap_steer_fake(hidden, residual, steer_idx, row_on, active, add, encg, bias, thr, gbias,
                    val, dec, tap, nonfinite, do_tap, max_norm=1e5):
    return torch.empty_like(residual)


# Registered through torch.library.Library rather than @custom_op: same schema (``tap`` and
# ``nonfinite`` declared mutated, so functionalisation keeps the writes), a fifth of the per-call
# dispatch cost on CPU.
_LIB = torch.library.Library("featurewatch", "FRAGMENT")
_LIB.define(
    "tap_steer(Tensor? hidden, Tensor residual, Tensor steer_idx, Tensor row_on, Tensor active, "
    "Tensor add, Tensor encg, Tensor bias, Tensor thr, Tensor gbias, Tensor val, Tensor dec, "
    "Tensor(a!) tap, Tensor(b!) nonfinite, bool do_tap, float max_norm=100000.0) -> Tensor"
)
_LIB.impl("tap_steer", _tap_steer, "CompositeExplicitAutograd")
torch.library.register_fake("featurewatch::tap_steer", _tap_steer_fake, lib=_LIB)


class SteerTables:
    """The static device buffers shared by all hooked layers of one model."""

    def __init__(
        self,
        *,
        num_layers: int,
        d_model: int,
        rows: int,
        clamps: int,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        do_tap: bool,
        max_norm: float = 1e5,
    ) -> None:
        self.num_layers, self.d_model, self.rows, self.clamps = num_layers, d_model, rows, clamps
        self.max_norm = float(max_norm)  # what steering may add to one row (L2), see the guard
        self.max_tokens, self.device, self.dtype, self.do_tap = max_tokens, device, dtype, do_tap
        f32 = dict(device=device, dtype=torch.float32)
        self.steer_idx = torch.zeros(max_tokens, device=device, dtype=torch.int64)
        self.row_on = torch.zeros(num_layers, rows, device=device, dtype=torch.bool)
        self.active = torch.zeros(num_layers, rows, clamps, device=device, dtype=torch.bool)
        self.add = torch.zeros(num_layers, rows, d_model, **f32)
        self.encg = torch.zeros(num_layers, 2 * clamps, d_model, **f32)
        self.bias = torch.zeros(num_layers, clamps, **f32)
        self.thr = torch.zeros(num_layers, clamps, **f32)
        self.gbias = torch.ones(num_layers, clamps, **f32)
        self.val = torch.zeros(num_layers, clamps, **f32)
        self.dec = torch.zeros(num_layers, clamps, d_model, **f32)
        tap_rows = max_tokens if do_tap else 1
        self.tap = torch.zeros(num_layers, tap_rows, d_model, device=device, dtype=dtype)
        # per layer and row: token rows whose steering was refused as non-finite (guard.py)
        self.nonfinite = torch.zeros(num_layers, rows, device=device, dtype=torch.int32)
        self.on_device = device.type != "cpu"

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.steer_idx, self.row_on, self.active, self.add, self.encg, self.bias,
                      self.thr, self.gbias, self.val, self.dec, self.tap, self.nonfinite)
        )

    ARG_NAMES = ("steer_idx", "row_on", "active", "add", "encg", "bias", "thr", "gbias", "val",
                 "dec", "tap", "nonfinite")

    def layer_args(self, slot: int) -> tuple[torch.Tensor, ...]:
        """Fixed-address views of one layer's tables, in ``tap_steer`` argument order."""
        return (
            self.steer_idx,
            self.row_on[slot],
            self.active[slot],
            self.add[slot],
            self.encg[slot],
            self.bias[slot],
            self.thr[slot],
            self.gbias[slot],
            self.val[slot],
            self.dec[slot],
            self.tap[slot],
            self.nonfinite[slot],
        )
