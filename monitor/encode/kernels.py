"""Fused subset encode for ReLU/JumpReLU SAEs on GPU: (x − b_dec)·W[:, feats] + b, threshold.

On CUDA, torch would run this as a matmul, a bias add, a comparison and a multiply (four
launches and three round trips of the [N, M] result through memory); one Triton kernel does it
while the tile is in registers, with the bias and threshold in float32 whatever the input dtype.
The kernel is built lazily so ``TRITON_INTERPRET=1`` (read by ``triton.jit``) can be set by the
tests after import; CI checks it on CPU through Triton's interpreter.

``FEATUREWATCH_TRITON``: ``0`` never use the kernel, ``1`` use it wherever it can run (CPU
tensors too, under ``TRITON_INTERPRET=1``), unset: CUDA tensors only.
"""

import functools
import os

import torch

try:  # triton ships with vLLM; the engine must work without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: torch.Tensor) -> bool:
    """Whether the fused kernel should serve this (already prepared) input."""
    mode = os.environ.get("FEATUREWATCH_TRITON", "")
    if triton is None or mode == "0":
        return False
    if x.is_cuda:
        return True
    return mode == "1" and _interpreting()


if triton is not None:

    def _subset_encode_kernel(
        x_ptr, bdec_ptr, w_ptr, b_ptr, t_ptr, out_ptr,
        N, D, M,
        stride_xn, stride_wd, stride_on,
        HAS_BDEC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(x_ptr + rn[:, None] * stride_xn + rd[None, :], mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0)
            if HAS_BDEC:
                a = a - tl.load(bdec_ptr + rd, mask=rd < D, other=0.0)[None, :]
            w = tl.load(w_ptr + rd[:, None] * stride_wd + rm[None, :], mask=(rd[:, None] < D) & (rm[None, :] < M), other=0.0)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        bias = tl.load(b_ptr + rm, mask=rm < M, other=0.0)
        thr = tl.load(t_ptr + rm, mask=rm < M, other=0.0)
        acc = acc + bias[None, :]
        acc = tl.where(acc > thr[None, :], acc, 0.0)
        tl.store(out_ptr + rn[:, None] * stride_on + rm[None, :], acc, mask=(rn[:, None] < N) & (rm[None, :] < M))


@functools.cache
def _compiled(interpret: bool):
    """triton.jit reads TRITON_INTERPRET when it decorates: build per mode, on first use."""
    del interpret  # part of the cache key only
    return triton.jit(_subset_encode_kernel)


def fused_subset_encode(
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W: torch.Tensor,
    bias32: torch.Tensor,
    threshold32: torch.Tensor,
) -> torch.Tensor:
    """out[N, M] float32 = z·1[z > t] with z = (x − b_dec)·W + b (b, t float32; x, W same dtype).

    For ReLU pass t = 0; for JumpReLU t = max(θ, 0) (equal to ReLU then the jump).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    x = x.contiguous()
    W = W.contiguous()
    N, D = x.shape
    M = W.shape[1]
    out = torch.empty((N, M), dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    block_n = 16 if N <= 16 else (32 if N <= 32 else 64)
    block_m = 32 if M <= 32 else 64
    block_d = 32 if x.dtype == torch.float32 else 64
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    _compiled(_interpreting())[grid](
        x, b_dec if b_dec is not None else x, W, bias32, threshold32, out,
        N, D, M,
        x.stride(0), W.stride(0), out.stride(0),
        HAS_BDEC=b_dec is not None, IEEE=x.dtype == torch.float32,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def subset_encode_reference(
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W: torch.Tensor,
    bias32: torch.Tensor,
    threshold32: torch.Tensor,
) -> torch.Tensor:
    """The same math in plain torch (the test oracle and the fallback)."""
    u = x - b_dec if b_dec is not None else x
    z = (u.float() @ W.float()) + bias32
    return z * (z > threshold32)
