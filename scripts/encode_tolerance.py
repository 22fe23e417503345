"""The tolerance of issue 15's GPU encode check: each architecture's encode restated in float64,
and a bound on how far a bf16/fp16/fp32 computation of it may land from the float32 CPU reference.

For an output whose pre-activation is v = a·((x − b_dec)·w) + b (a = exp(r_mag) for gated SAEs,
else 1), computed with unit roundoff u (bf16 2^-8, fp16 2^-11, fp32 2^-24) over D = d_in terms:

    tol = 8·(u + √D·2^-24)·a·‖(|x| + |b_dec|)∘w‖₂ + 2u·(|b| + |v| + (1 + |r_mag|)·|a·(x − b_dec)·w|)

Why: each product term x_k·w_k picks up at most four independent roundings of relative size ≤ u
(x and b_dec to the compute dtype, the subtraction, w), so the sum's error has a standard deviation
≤ (2/√3)·u·‖(|x|+|b_dec|)∘w‖₂, and 8 of those is ~7σ (the worst case, u·Σ|x_k||w_k|, is √D
times looser and would let a dropped b_dec pass). fp32 accumulation in any order adds ~√D·2^-24 of
the same norm, which also covers the fp32 reference's own error; rounding b, the result and (gated)
exp(r_mag) to the compute dtype add the 2u·(…) term. A probe's probability: |a_platt|/4·tol_logit +
4·2^-24 (the sigmoid's slope is ≤ 1/4). Where the float64 pre-activation lies within tol of a jump
(a JumpReLU threshold, the gated gate at 0, TopK's k-th value) either side is right: there the
output must be within tol of 0 or of the active value, and the element counts as ambiguous.
"""

from __future__ import annotations

import math

import torch

EPS32 = 2.0**-24
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: EPS32}  # unit roundoff
C = 8.0  # standard deviations of the rounding error a product may be off by (~7σ, see above)


class Pre:
    """v = a·((x − β)·W) + b in float64, with what the tolerance needs."""

    def __init__(self, x, W, b=None, beta=None, a=None, r=None):
        x64, W64 = x.double(), W.double()
        A = x64.abs() + (beta.double().abs() if beta is not None else 0)
        u = x64 - beta.double() if beta is not None else x64
        h = u @ W64
        a64 = a.double() if a is not None else torch.ones(W.shape[1], dtype=torch.float64)
        self.ah = h * a64
        self.b = b.double() if b is not None else torch.zeros(W.shape[1], dtype=torch.float64)
        self.v = self.ah + self.b
        self.Q = (A.square() @ W64.square()).sqrt() * a64
        self.r = r.double().abs() if r is not None else torch.zeros(W.shape[1], dtype=torch.float64)
        self.D = W.shape[0]

    def tol(self, u: float) -> torch.Tensor:
        return C * (u + math.sqrt(self.D) * EPS32) * self.Q + 2 * u * (self.b.abs() + self.v.abs() + (1 + self.r) * self.ah.abs())


class Expected:
    """Per element: the float64 output, the active value, the tolerance, and where either side
    of a jump is right."""

    FIELDS = ("val", "on", "tol", "amb")

    def __init__(self, val, on, tol, amb):
        self.val, self.on, self.tol, self.amb = val, on, tol, amb

    def cols(self, idx) -> Expected:
        return Expected(*(getattr(self, k)[:, idx] for k in self.FIELDS))

    @staticmethod
    def cat(parts: list[Expected]) -> Expected:
        return Expected(*(torch.cat([getattr(p, k) for p in parts], 1) for k in Expected.FIELDS))


class Reference:
    """An architecture's math in float64 (SAELens's formulas) on one input: the products are
    computed once, the expectation at any compute roundoff u."""

    def __init__(self, w: dict, x: torch.Tensor):
        self.w = w
        beta = w["b_dec"] if w["apply_b_dec"] else None
        if w["arch"] == "gated":
            self.mag = Pre(x, w["W_enc"], w["b_mag"], beta, w["r_mag"].exp(), w["r_mag"])
            self.gate = Pre(x, w["W_enc"], w["b_gate"], beta)
        else:
            self.pre = Pre(x, w["W_enc"], w["b_enc"], beta)

    def at(self, u: float) -> Expected:
        w = self.w
        if w["arch"] == "gated":
            on = self.mag.v.relu()
            return Expected(on * (self.gate.v > 0), on, self.mag.tol(u), self.gate.v.abs() <= self.gate.tol(u))
        v = self.pre.v
        tol, on = self.pre.tol(u), v.relu()
        if w["arch"] == "topk":
            top = torch.topk(v, w["k"], dim=1)
            val = torch.zeros_like(on).scatter_(1, top.indices, top.values.relu())
            return Expected(val, on, tol, (v - top.values[:, -1:]).abs() <= tol + tol.amax(1, keepdim=True))
        t = w["threshold"].double().clamp(min=0) if w["arch"] == "jumprelu" else torch.zeros(v.shape[1], dtype=torch.float64)
        return Expected(on * (v > t), on, tol, (v - t).abs() <= tol)


def compare(name: str, group: str, out: torch.Tensor, ref: torch.Tensor, exp: Expected, **meta) -> dict:
    """Every element within tol of the reference, or (where ambiguous) of 0 or the active value."""
    rec = {"name": name, "group": group, **meta}
    out_c = out.detach().to("cpu")
    if out_c.dtype != torch.float32 or tuple(out_c.shape) != tuple(ref.shape):
        return {**rec, "passed": False, "error": f"got {out_c.dtype} {tuple(out_c.shape)}, expected float32 {tuple(ref.shape)}"}
    o, r = out_c.double(), ref.double()
    err = (o - r).abs()
    ok = (err <= exp.tol) | (exp.amb & ((o.abs() <= exp.tol) | ((o - exp.on).abs() <= exp.tol)))
    plain = ~exp.amb
    ratio = err / exp.tol.clamp(min=1e-300)
    worst = float(ratio[plain].max()) if bool(plain.any()) else 0.0
    bad = int((~ok).sum())
    rec.update(passed=bad == 0 and bool(torch.isfinite(o).all()), elements=int(o.numel()), ambiguous=int(exp.amb.sum()),
               failures=bad, max_err=float(err.max()) if err.numel() else 0.0, max_err_over_tol=worst)  # fmt: skip
    if bad:
        i = int((~ok).flatten().nonzero()[0])
        n, j = divmod(i, o.shape[1])
        rec["first_failure"] = {"row": n, "col": j, "out": float(o[n, j]), "ref": float(r[n, j]), "tol": float(exp.tol[n, j])}
    return rec


def probe_expected(bank, x: torch.Tensor, u: float) -> Expected:
    """A probe bank's probabilities in float64 from its folded affine map (a CPU float32 bank)."""
    W, c = bank.affine()
    p = Pre(x, W, c)
    a, b = bank.source["platt_a"].double(), bank.source["platt_b"].double()
    prob = torch.sigmoid(a * p.v + b)
    return Expected(prob, prob, a.abs() / 4 * p.tol(u) + 4 * EPS32, torch.zeros_like(prob, dtype=torch.bool))


def synthetic(arch: str, d: int, n: int, seed: int, apply_b_dec: bool = True, k: int = 32) -> dict:
    """Float32 CPU weights of one architecture, shaped like trained ones (nothing is downloaded)."""
    g = torch.Generator().manual_seed(seed)
    w = {"arch": arch, "apply_b_dec": apply_b_dec, "W_enc": torch.randn(d, n, generator=g) / math.sqrt(d),
         "W_dec": torch.randn(n, d, generator=g) / math.sqrt(d), "b_dec": torch.randn(d, generator=g) * 0.3}  # fmt: skip
    if arch == "gated":
        w.update(b_gate=torch.randn(n, generator=g) * 0.3, b_mag=torch.randn(n, generator=g) * 0.3,
                 r_mag=torch.randn(n, generator=g) * 0.3)  # fmt: skip
    else:
        w["b_enc"] = torch.randn(n, generator=g) * 0.3
    if arch == "jumprelu":
        w["threshold"] = torch.rand(n, generator=g) * 1.2 - 0.2  # some ≤ 0: plain ReLU there
    if arch == "topk":
        w["k"] = min(k, n)
    return w


def activations(n: int, d: int, seed: int) -> torch.Tensor:
    """Float32 values exactly representable in bf16 and fp16, so every input dtype carries the same x."""
    x = (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 1.5).to(torch.bfloat16).float()
    return torch.where(x.abs() < 2.0**-14, torch.zeros_like(x), x)


