"""The fused Triton subset-encode kernel, checked on CPU through Triton's interpreter.

The interpreter only works when TRITON_INTERPRET=1 is set before triton is imported (triton's
own @jit library functions are built at import), so ``test_kernels.py`` runs this module in a
child process with it set; on its own in an ordinary run it skips. CI: ``TRITON_INTERPRET=1
pytest tests/engine/test_kernels_interpreted.py`` runs it directly too.

bf16 is not checked here: Triton 3.9's interpreter holds bf16 values as raw 16-bit integers in
numpy, so bf16 arithmetic inside a kernel is wrong there (tl.dot on bf16 returns values ~1e10,
a bf16 subtraction NaN) whatever the kernel; fp16 runs the same code path and is checked.
"""

from __future__ import annotations

import math

import pytest
import torch

from monitor.encode import JumpReLUSAE, StandardSAE, kernels

from .conftest import max_abs

if not kernels.triton_available():
    pytest.skip("triton not installed", allow_module_level=True)
if not kernels._interpreting():
    pytest.skip("needs TRITON_INTERPRET=1 from process start (test_kernels.py runs it so)", allow_module_level=True)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("FEATUREWATCH_TRITON", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_b_dec", [True, False])
@pytest.mark.parametrize("n,d,m", [(37, 70, 19), (5, 32, 64), (64, 48, 33)])
def test_kernel_matches_reference(interpret, gen, dtype, with_b_dec, n, d, m):
    x = torch.randn(n, d, generator=gen).to(dtype)
    W = (torch.randn(d, m, generator=gen) / math.sqrt(d)).to(dtype)
    b = torch.randn(m, generator=gen) * 0.2
    t = (torch.rand(m, generator=gen) * 0.6).clamp(min=0.1)
    t[::4] = 0.0  # ReLU columns
    b_dec = (torch.randn(d, generator=gen) * 0.3).to(dtype) if with_b_dec else None
    out = kernels.fused_subset_encode(x, b_dec, W, b, t)
    ref = kernels.subset_encode_reference(x, b_dec, W, b, t)
    assert out.dtype == torch.float32 and out.shape == (n, m)
    assert 0 < int((ref > 0).sum()) < ref.numel()
    assert max_abs(out, ref) <= (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("cls", [StandardSAE, JumpReLUSAE])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_watch_runs_the_kernel(interpret, monkeypatch, gen, cls, apply_b_dec):
    d, n = 40, 120
    kw = {"threshold": torch.rand(n, generator=gen) * 0.5} if cls is JumpReLUSAE else {}
    sae = cls(
        torch.randn(d, n, generator=gen) / math.sqrt(d), torch.randn(n, generator=gen) * 0.2,
        torch.randn(n, d, generator=gen), torch.randn(d, generator=gen) * 0.5,
        apply_b_dec_to_input=apply_b_dec, **kw,
    )  # fmt: skip
    calls = []
    real = kernels.fused_subset_encode
    monkeypatch.setattr(kernels, "fused_subset_encode", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(23, d, generator=gen)
    feats = [0, 5, 77, 119, 5]
    out = sae.watch(feats)(x)
    assert calls, "the Triton path was not taken"
    assert max_abs(out, sae.encode(x)[:, feats]) <= 1e-5
