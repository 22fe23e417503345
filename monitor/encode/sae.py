"""The canonical in-memory SAE: the base every architecture class (architectures.py, one per
SAELens architecture) shares, plus ``Watch`` (the gathered subset encode) and ``ClampParams``.

Every loader (formats.py) turns its file into the same tensors, in SAELens's orientation:
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, plus
``threshold`` (jumprelu), ``k`` (topk) or ``b_gate``/``b_mag``/``r_mag`` (gated). Scalar input
scaling is folded into the weights at load; per-token normalisation (``layer_norm``,
``constant_norm_rescale``) runs at encode time with SAELens's exact formulas, so encodings
match ``sae_lens`` to float rounding.

Compute dtype: float32 on CPU (half inputs are upcast); on CUDA the weights' dtype (bf16 by
default). Thresholds are always float32: bf16 would turn 1.1 into 1.1016 and move features
across their threshold. Outputs are always float32.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import kernels

NORMALISATIONS = ("none", "layer_norm", "constant_norm_rescale")
LAYER_NORM_EPS = 1e-5  # SAELens's run_time_activation_ln_in default


def compute_dtype(device: torch.device | str, dtype: torch.dtype | None) -> torch.dtype:
    """CPU always computes in fp32 (half matmuls are slow and lossy there); CUDA defaults to bf16."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return dtype or torch.bfloat16


def _feature_index(features: int | Sequence[int] | torch.Tensor, d_sae: int) -> torch.Tensor:
    idx = torch.as_tensor(features, dtype=torch.int64).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("no features given")
    bad = (idx < 0) | (idx >= d_sae)
    if bool(bad.any()):
        raise ValueError(f"feature index {int(idx[bad][0])} out of range [0, {d_sae})")
    return idx


@dataclass(frozen=True)
class ClampParams:
    """Per-feature data the vLLM plugin needs to clamp one feature with the error term kept.

    ``b_dec`` subtraction and scalar input scaling are folded into ``encoder``/``bias``, so
    ``pre = x·encoder + bias; f = pre·1[pre > threshold]`` (times ``1[x·gate_encoder + gate_bias
    > 0]`` for gated SAEs) and ``x' = x + (value − f)·decoder`` reproduce ``SAE.clamp`` exactly.
    Tensors are float32 on CPU so they can be serialised and shipped as they are.
    """

    feature: int
    encoder: torch.Tensor
    bias: float
    threshold: float
    decoder: torch.Tensor
    gate_encoder: torch.Tensor | None = None
    gate_bias: float = 0.0

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) for rows of x [N, d] (reference of the plugin's math)."""
        x = x.float()
        pre = x @ self.encoder + self.bias
        f = pre * (pre > self.threshold)
        if self.gate_encoder is not None:
            f = f * ((x @ self.gate_encoder + self.gate_bias) > 0)
        return f

    def apply(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """x' = x + (value − f(x))·decoder for rows of x [N, d], in float32."""
        x = x.float()
        return x + (value - self.activation(x))[:, None] * self.decoder


class Watch:
    """Encoder columns of a fixed feature set, gathered once: the sidecar's per-batch hot path.

    ``watch(x) -> [N, M]`` float32 equals ``sae.encode(x)[:, features]`` but costs an
    [N, d]×[d, M] product instead of [N, d]×[d, d_sae]. On CUDA the ReLU/JumpReLU case runs as
    one fused Triton kernel (b_dec subtraction, matmul, bias, threshold). A TopK SAE has no
    subset encode: its watch runs the full encode and gathers (``exact_subset`` is False), so
    the sidecar can still serve it. Build watches after ``sae.to(...)``: they hold copies.
    """

    def __init__(self, sae: SAE, features: torch.Tensor):
        self.sae = sae
        self.features = features
        self.exact_subset = sae.subset_encodable
        idx = features.to(sae.device)
        self._cols = sae._columns(idx) if self.exact_subset else {"idx": idx}

    def __len__(self) -> int:
        return int(self.features.numel())

    def affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(W [d_in, M], c [M])`` float32 with pre-activations ``z = x·W + c`` for raw inputs x,
        so a caller can stack several encoders of one layer into a single product and finish
        with :meth:`activate`. None where that does not hold: input normalisation (not affine),
        no subset encode (TopK), hook_z inputs, or a non-float32 / non-CPU SAE."""
        sae = self.sae
        if (not self.exact_subset or sae.normalize != "none" or sae.hook_z or sae.dtype != torch.float32
                or sae.device.type != "cpu"):
            return None
        W = self._cols["W"]
        c = self._cols["b"] if "b" in self._cols else torch.zeros(W.shape[1], dtype=W.dtype)
        if sae.apply_b_dec_to_input:
            c = c - sae.b_dec @ W
        return W, c

    @torch.no_grad()
    def activate(self, z: torch.Tensor) -> torch.Tensor:
        """Watched activations from pre-activations ``x·W + c`` of :meth:`affine` (may reuse z)."""
        return self.sae._activate(z, self._cols)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        xn, _ = sae._normalise(sae._prepare(x))
        cols = self._cols
        if not self.exact_subset:
            return sae._apply(sae._sae_in(xn), sae._columns(None)).float().index_select(1, cols["idx"])
        if kernels.use_triton(xn) and "t32" in cols:
            b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
            return kernels.fused_subset_encode(xn, b_dec, cols["W"], cols["b32"], cols["t32"])
        return sae._apply(sae._sae_in(xn), cols).float()


class SAE:
    """Base: input handling, normalisation, decode, subset encode, clamping.

    Subclasses define ``_columns`` (the encoder data for all or some features) and
    ``_apply`` (pre-activation and activation), so the full encode and the gathered
    ``watch`` run the same arithmetic.
    """

    architecture: ClassVar[str] = ""
    subset_encodable: ClassVar[bool] = True  # one feature needs only its own encoder column

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor | None,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        apply_b_dec_to_input: bool = True,
        normalize: str = "none",
        hook_z: bool = False,
        metadata: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ):
        if W_enc.dim() != 2 or W_dec.shape != (W_enc.shape[1], W_enc.shape[0]):
            raise ValueError(f"W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} disagree")
        if normalize not in NORMALISATIONS:
            raise ValueError(f"normalize must be one of {NORMALISATIONS}, got {normalize!r}")
        self.W_enc = W_enc
        self.b_enc = b_enc
        self.W_dec = W_dec
        self.b_dec = b_dec
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize = normalize
        self.hook_z = hook_z
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.to(device, dtype)

    # ---- shape, device -------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    _weight_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")
    _fp32_names: ClassVar[tuple[str, ...]] = ()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        """Move (in place) to a device; weights in the compute dtype, thresholds stay fp32."""
        device = torch.device(device) if device is not None else self.device
        new_dtype = compute_dtype(device, dtype)
        moved = {}
        for name in self._weight_names:
            t = getattr(self, name)
            if t is not None:
                moved[name] = cast = t.to(device=device, dtype=new_dtype).contiguous()
                if new_dtype == torch.float16:  # max 65504: a real weight can overflow to inf
                    lo, hi = (float(v) for v in torch.aminmax(cast))
                    if not (math.isfinite(lo) and math.isfinite(hi)):  # refused before anything moves
                        n_bad = int((~torch.isfinite(cast)).sum())
                        raise ValueError(f"{name}: {n_bad} of {cast.numel()} values overflow {new_dtype}; use bfloat16")
        self.dtype, self.device = new_dtype, device
        for name, cast in moved.items():
            setattr(self, name, cast)
        for name in self._fp32_names:
            setattr(self, name, getattr(self, name).to(device=device, dtype=torch.float32).contiguous())
        self._prepared()
        self._subset_cache: dict[bytes, Watch] = {}  # insertion-ordered: oldest first
        self._cache_lock = threading.Lock()
        return self

    def _prepared(self) -> None:
        """Derived tensors (recomputed after every move)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d_in={self.d_in}, d_sae={self.d_sae}, normalize={self.normalize!r}, "
            f"apply_b_dec_to_input={self.apply_b_dec_to_input}, device={self.device}, dtype={self.dtype})"
        )

    # ---- input handling ------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Any [..., d_in] (or [..., heads, d_head] for hook_z SAEs) -> [N, d_in] in compute dtype."""
        x = torch.as_tensor(x)
        if self.hook_z and x.dim() >= 2 and x.shape[-1] != self.d_in and x.shape[-2] * x.shape[-1] == self.d_in:
            x = x.flatten(-2)
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            raise ValueError(f"expected activations [..., {self.d_in}], got {tuple(x.shape)}")
        return x.reshape(-1, self.d_in).to(device=self.device, dtype=self.dtype)

    def _normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """SAELens's run-time input normalisation; returns the per-token state to undo it."""
        if self.normalize == "constant_norm_rescale":
            coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (coeff,)
        if self.normalize == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + LAYER_NORM_EPS), (mu, std)
        return x, None

    def _denormalise(self, y: torch.Tensor, state: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """SAELens's output mapping (layer_norm uses std without eps, as SAELens does)."""
        if self.normalize == "constant_norm_rescale":
            return y / state[0]
        if self.normalize == "layer_norm":
            return y * state[1] + state[0]
        return y

    def _delta_to_input(self, delta: torch.Tensor, state: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """Map a change of the reconstruction back to input space as SAELens's output mapping
        does, so clamp(x) == decode(f') + (x − decode(f)) (SAELens with use_error_term)."""
        if self.normalize == "constant_norm_rescale":
            return delta / state[0].float()
        if self.normalize == "layer_norm":
            return delta * state[1].float()
        return delta

    def _sae_in(self, xn: torch.Tensor) -> torch.Tensor:
        return xn - self.b_dec if self.apply_b_dec_to_input else xn

    # ---- per-architecture hooks ----------------------------------------------------------
    def _columns(self, idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Encoder data for features idx (None: all, without copies)."""
        raise NotImplementedError

    def _apply(self, u: torch.Tensor, cols: dict[str, torch.Tensor]) -> torch.Tensor:
        """Activations from the SAE input u = normalise(x) − b_dec."""
        raise NotImplementedError

    def _activate(self, z: torch.Tensor, cols: dict[str, torch.Tensor]) -> torch.Tensor:
        """Activations from the pre-activations z = u·W + cols.get("b", 0) (may work in place):
        the part of ``_apply`` after the product, for encoders that share one product."""
        raise NotImplementedError

    def _decoder_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Effective decoder rows [M, d_in] (what one unit of each feature adds), float32."""
        return self.W_dec.index_select(0, idx).float()

    # ---- public API ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations [N, d_sae] float32 for activations [..., d_in]."""
        xn, _ = self._normalise(self._prepare(x))
        return self._apply(self._sae_in(xn), self._columns(None)).float()

    def watch(self, features: int | Sequence[int] | torch.Tensor) -> Watch:
        """Precompute the gathered weights of a feature set; ``watch(x) -> [N, M]``."""
        return Watch(self, _feature_index(features, self.d_sae))

    _SUBSET_CACHE = 4  # gathered feature sets kept by encode_subset

    @torch.no_grad()
    def encode_subset(self, x: torch.Tensor, features: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Activations [N, M] of the given features only. The columns are gathered once and
        kept for the last few feature sets (a strided gather from W_enc costs more than the
        product itself); hold a ``watch`` for a fixed set."""
        if not self.subset_encodable:
            raise ValueError(
                f"{type(self).__name__}: a feature's activation depends on every other feature; "
                "use encode() (or watch(), which encodes fully and gathers)"
            )
        idx = _feature_index(features, self.d_sae)
        key = idx.numpy().tobytes()
        with self._cache_lock:
            watch = self._subset_cache.pop(key, None)
            if watch is None:
                watch = Watch(self, idx)
            self._subset_cache[key] = watch
            while len(self._subset_cache) > self._SUBSET_CACHE:
                self._subset_cache.pop(next(iter(self._subset_cache)))
        return watch(x)

    @torch.no_grad()
    def encode_top(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest activations per token: (values [N, k] float32, indices [N, k] int32)."""
        if not 0 < k <= self.d_sae:
            raise ValueError(f"k must be in [1, {self.d_sae}], got {k}")
        values, indices = torch.topk(self.encode(x), k, dim=1)
        return values, indices.to(torch.int32)

    @torch.no_grad()
    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction [N, d_in] float32 of activations f [N, d_sae].

        Per-token normalised SAEs (layer_norm, constant_norm_rescale) need the inputs ``x`` the
        activations came from to map the reconstruction back to input space (SAELens keeps that
        state from the last encode; we take it explicitly).
        """
        f = torch.as_tensor(f).reshape(-1, self.d_sae).to(device=self.device, dtype=self.dtype)
        y = self._decode_normalised(f)
        if self.normalize != "none":
            if x is None:
                raise ValueError(f"decode of a {self.normalize} SAE needs the inputs x to undo the normalisation")
            _, state = self._normalise(self._prepare(x))
            y = self._denormalise(y, state)
        return y.float()

    def _decode_normalised(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def _feature_acts(self, xn: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._apply(self._sae_in(xn), self._columns(idx)).float()

    @torch.no_grad()
    def clamp(
        self,
        x: torch.Tensor,
        feature: int | Sequence[int],
        value: float | Sequence[float] | torch.Tensor,
    ) -> torch.Tensor:
        """x + (value − f_i(x))·W_dec[i], mapped through the input normalisation; the SAE's
        reconstruction error stays in x: the result equals SAELens's ``decode(f') + (x −
        decode(f))`` with f' = f except f_i = value. Returns x's shape and dtype. ``value=0``
        suppresses the feature and leaves tokens where it did not fire unchanged.
        """
        x_in = torch.as_tensor(x)
        idx = _feature_index(feature, self.d_sae).to(self.device)
        xf = self._prepare(x_in)
        xn, state = self._normalise(xf)
        f = self._feature_acts(xn, idx)
        target = torch.as_tensor(value, dtype=torch.float32, device=self.device).reshape(-1)
        delta = (target - f) @ self._decoder_rows(idx)
        out = xf.float() + self._delta_to_input(delta, state)
        return out.reshape(x_in.shape).to(device=x_in.device, dtype=x_in.dtype)

    def clamp_params(self, feature: int) -> ClampParams:
        """Folded per-feature data for the plugin (see ClampParams)."""
        if self.normalize != "none":
            raise ValueError(
                f"clamp_params: {self.normalize} normalisation is per token; the plugin cannot "
                "reproduce it from one encoder column"
            )
        i = int(_feature_index(feature, self.d_sae)[0])
        return self._clamp_params(i)

    @torch.no_grad()
    def direction(self, feature: int) -> torch.Tensor:
        """The unit-norm direction feature ``feature`` writes into input (residual) space: its
        effective decoder row, normalised, float32 on CPU. Every architecture has one (TopK too:
        adding a direction needs no encoder); scalar input normalisation is folded into the row,
        and a per-token one (layer_norm) only rescales it per token, which leaves the direction."""
        i = _feature_index(feature, self.d_sae)
        row = self._decoder_rows(i.to(self.device))[0].float().cpu()
        norm = float(torch.linalg.vector_norm(row))
        if not (norm > 0 and norm < float("inf")):
            raise ValueError(f"feature {int(i[0])}: its decoder row has norm {norm:g}, no direction to add")
        return row / norm

    def _fold_b_dec(self, column: torch.Tensor, bias: torch.Tensor) -> float:
        """bias − b_dec·column in float64, so pre = x·column + result needs no b_dec."""
        b = bias.double().cpu()
        if self.apply_b_dec_to_input:
            b = b - self.b_dec.double().cpu() @ column.double().cpu()
        return float(b)

    def _clamp_params(self, i: int) -> ClampParams:
        raise NotImplementedError


__all__ = ["NORMALISATIONS", "SAE", "ClampParams", "Watch", "compute_dtype"]
