"""The SAE architectures SAELens defines, one class each on the shared base of sae.py.

Each defines ``_columns`` (encoder data for all or some features) and ``_apply``/``_activate``
(pre-activation and activation), so the full encode and the gathered ``watch`` run the same
arithmetic, plus the per-feature clamp data the vLLM plugin needs where one exists.
"""

from __future__ import annotations

import torch

from .sae import SAE, ClampParams

class StandardSAE(SAE):
    """ReLU SAE: f = ReLU(u·W_enc + b_enc)."""

    architecture = "standard"

    def _columns(self, idx):
        if idx is None:
            return {"W": self.W_enc, "b": self.b_enc}
        b = self.b_enc.index_select(0, idx).contiguous()
        return {
            "W": self.W_enc.index_select(1, idx).contiguous(),
            "b": b,
            "b32": b.float(),
            "t32": torch.zeros(idx.numel(), dtype=torch.float32, device=self.device),
        }

    def _apply(self, u, cols):
        return self._activate(torch.addmm(cols["b"], u, cols["W"]), cols)

    def _activate(self, z, cols):
        return z.relu_()

    def _clamp_params(self, i):
        col = self.W_enc[:, i].float().cpu()
        return ClampParams(
            feature=i,
            encoder=col.contiguous(),
            bias=self._fold_b_dec(col, self.b_enc[i].cpu()),
            threshold=0.0,
            decoder=self._decoder_rows(torch.tensor([i], device=self.device))[0].cpu(),
        )


class JumpReLUSAE(StandardSAE):
    """JumpReLU SAE (Gemma Scope, BatchTopK after training): f = z·1[z > θ] for z = u·W_enc + b_enc > 0."""

    architecture = "jumprelu"
    _fp32_names = ("threshold",)

    def __init__(self, W_enc, b_enc, W_dec, b_dec, threshold: torch.Tensor, **kw):
        self.threshold = threshold
        super().__init__(W_enc, b_enc, W_dec, b_dec, **kw)

    def _prepared(self):
        # relu(z)·1[z > θ] == z·1[z > max(θ, 0)]: one comparison, same result.
        self._t = self.threshold.clamp(min=0.0)

    def _columns(self, idx):
        cols = super()._columns(idx)
        cols["t32"] = self._t if idx is None else self._t.index_select(0, idx).contiguous()
        return cols

    def _activate(self, z, cols):
        # 1[z > t] as sign(max(z − t, 0)): exact (IEEE: a − b > 0 iff a > b) and, on CPU,
        # about twice as fast as building and multiplying by a bool mask.
        return z.mul_((z - cols["t32"]).clamp_(min=0).sign_())

    def _clamp_params(self, i):
        p = super()._clamp_params(i)
        return ClampParams(p.feature, p.encoder, p.bias, float(self._t[i]), p.decoder)


class GatedSAE(SAE):
    """Gated SAE: 1[u·W_enc + b_gate > 0] · ReLU(u·(W_enc ⊙ exp r_mag) + b_mag).

    One matmul serves both paths: u·(W_enc ⊙ e^r) = (u·W_enc) ⊙ e^r.
    """

    architecture = "gated"
    _weight_names = ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag")

    def __init__(self, W_enc, W_dec, b_dec, b_gate, b_mag, r_mag, **kw):
        self.b_gate, self.b_mag, self.r_mag = b_gate, b_mag, r_mag
        super().__init__(W_enc, None, W_dec, b_dec, **kw)

    def _prepared(self):
        self._mag_scale = self.r_mag.exp()

    def _columns(self, idx):
        if idx is None:
            return {"W": self.W_enc, "b_gate": self.b_gate, "b_mag": self.b_mag, "scale": self._mag_scale}
        return {
            "W": self.W_enc.index_select(1, idx).contiguous(),
            "b_gate": self.b_gate.index_select(0, idx),
            "b_mag": self.b_mag.index_select(0, idx),
            "scale": self._mag_scale.index_select(0, idx),
        }

    def _apply(self, u, cols):
        return self._activate(u @ cols["W"], cols)

    def _activate(self, h, cols):
        gate = (h + cols["b_gate"]).clamp_(min=0).sign_()  # 1[h + b_gate > 0], as in JumpReLU
        return torch.addcmul(cols["b_mag"], h, cols["scale"]).relu_().mul_(gate)

    def _clamp_params(self, i):
        gate_col = self.W_enc[:, i].float().cpu()
        mag_col = (self.W_enc[:, i] * self._mag_scale[i]).float().cpu()
        return ClampParams(
            feature=i,
            encoder=mag_col.contiguous(),
            bias=self._fold_b_dec(mag_col, self.b_mag[i].cpu()),
            threshold=0.0,
            decoder=self._decoder_rows(torch.tensor([i], device=self.device))[0].cpu(),
            gate_encoder=gate_col.contiguous(),
            gate_bias=self._fold_b_dec(gate_col, self.b_gate[i].cpu()),
        )


class TopKSAE(SAE):
    """TopK SAE: keep the k largest of z = u·W_enc + b_enc, then ReLU.

    Whether a feature fires depends on all others, so there is no subset encode and no
    per-feature clamp data: ``encode_subset`` and ``clamp_params`` raise ValueError, and
    ``watch`` encodes fully then gathers.
    """

    architecture = "topk"
    subset_encodable = False

    def __init__(self, W_enc, b_enc, W_dec, b_dec, k: int, rescale_acts_by_decoder_norm: bool = False, **kw):
        self.k = int(k)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        super().__init__(W_enc, b_enc, W_dec, b_dec, **kw)
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k={self.k} out of range for d_sae={self.d_sae}")

    def _prepared(self):
        self._dec_norm = self.W_dec.norm(dim=-1) if self.rescale_acts_by_decoder_norm else None

    def _columns(self, idx):
        if idx is not None:
            raise ValueError("TopK SAE: no per-feature encoder columns")
        return {"W": self.W_enc, "b": self.b_enc}

    def _pre(self, u):
        pre = torch.addmm(self.b_enc, u, self.W_enc)
        return pre * self._dec_norm if self._dec_norm is not None else pre

    def _apply(self, u, cols):
        pre = self._pre(u)
        values, indices = torch.topk(pre, self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu_())

    @torch.no_grad()
    def encode_top(self, x, k):
        if not 0 < k <= self.d_sae:
            raise ValueError(f"k must be in [1, {self.d_sae}], got {k}")
        if k > self.k:
            return super().encode_top(x, k)
        xn, _ = self._normalise(self._prepare(x))
        values, indices = torch.topk(self._pre(self._sae_in(xn)), k, dim=-1)
        return values.relu_().float(), indices.to(torch.int32)

    def _feature_acts(self, xn, idx):
        return self._apply(self._sae_in(xn), {}).float().index_select(1, idx)

    def _decode_normalised(self, f):
        if self._dec_norm is not None:
            f = f * (1 / self._dec_norm)
        return f @ self.W_dec + self.b_dec

    def _decoder_rows(self, idx):
        rows = self.W_dec.index_select(0, idx).float()
        if self._dec_norm is not None:
            rows = rows / self._dec_norm.index_select(0, idx).float()[:, None]
        return rows

    def clamp_params(self, feature):
        raise ValueError("clamp_params: a TopK SAE's activation depends on every feature; the plugin cannot clamp one")


ARCHITECTURES: dict[str, type[SAE]] = {
    cls.architecture: cls for cls in (StandardSAE, JumpReLUSAE, TopKSAE, GatedSAE)
}

__all__ = ["ARCHITECTURES", "GatedSAE", "JumpReLUSAE", "StandardSAE", "TopKSAE"]
