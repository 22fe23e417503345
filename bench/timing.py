"""Timing for the encode benchmark on any device: contenders in turns, CUDA events and CUDA-graph
replays on a GPU, input buffers that defeat the L2 cache, and a roofline measured in the same run."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable

import torch


@contextlib.contextmanager
def triton_mode(mode: str | None):
    """FEATUREWATCH_TRITON for the duration (None: leave as is)."""
    if mode is None:
        yield
        return
    old = os.environ.get("FEATUREWATCH_TRITON")
    os.environ["FEATUREWATCH_TRITON"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FEATUREWATCH_TRITON", None)
        else:
            os.environ["FEATUREWATCH_TRITON"] = old


class Timer:
    """Median seconds per call. Contenders take turns in blocks (CUDA events around a block on a
    GPU, perf_counter on CPU), so load from other processes falls on every contender alike and
    caches stay as warm within a block as in a serving loop."""

    def __init__(self, device: torch.device, seconds: float, min_rounds: int = 5, graphs: bool = False):
        self.cuda = device.type == "cuda"
        self.seconds = seconds
        self.min_rounds = min_rounds
        self.block_s = 0.005 if self.cuda else 0.03
        self.graphs = graphs and self.cuda
        self.graph: dict[str, float | None] = {}  # per contender of the last measure(): CUDA-graph seconds per call
        self.graph_error: str | None = None

    def _block(self, fn: Callable[[], object], reps: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    def measure(self, contenders: dict[str, tuple[Callable[[], object], str | None]], best: bool = False,
                graph_calls: int = 0) -> dict[str, float]:
        """contenders: name -> (fn, FEATUREWATCH_TRITON mode or None). best: the fastest block
        instead of the median (for peaks). graph_calls: also time each contender as that many
        calls captured in one CUDA graph (into self.graph)."""
        reps = {}
        for name, (fn, mode) in contenders.items():
            with triton_mode(mode):
                fn()  # warm-up: Triton JIT, allocator, cuBLAS heuristics
                one = self._block(fn, 1)
            reps[name] = max(1, min(1000, int(self.block_s / max(one, 1e-7))))
        runs: dict[str, list[float]] = {k: [] for k in contenders}
        start = time.perf_counter()
        while min(len(r) for r in runs.values()) < self.min_rounds or time.perf_counter() - start < self.seconds:
            for name, (fn, mode) in contenders.items():
                with triton_mode(mode):
                    runs[name].append(self._block(fn, reps[name]))
        self.graph = {}
        if self.graphs and graph_calls and self.graph_error is None:  # after the eager figures: they stand if it fails
            for name, (fn, mode) in contenders.items():
                with triton_mode(mode):
                    self.graph[name] = self._graph(fn, graph_calls)
        return {k: (min(r) if best else statistics.median(r)) for k, r in runs.items()}

    def _graph(self, fn: Callable[[], object], calls: int) -> float | None:
        """Seconds per call replaying ``calls`` calls captured in one CUDA graph: the GPU's own
        time, without Python and launch overhead (which an eager call at a small batch is mostly).
        A capture that fails turns graph timing off for the run (self.graph_error says why)."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph wants
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            graph.replay()
            one = self._block(graph.replay, 1)
            reps = max(1, min(1000, int(self.block_s / max(one, 1e-7))))
            sec = statistics.median(self._block(graph.replay, reps) for _ in range(self.min_rounds)) / calls
            del graph
            return sec
        except Exception as e:  # the eager figures stand without it
            self.graph_error = f"{type(e).__name__}: {str(e)[:300]}"
            return None


def input_pool(n: int, d: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    """Activation buffers to rotate through: on CUDA enough to exceed twice the L2 cache (so each
    call reads its input from HBM, as fresh activations are), one on CPU."""
    count = 1
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or (64 << 20)
        count = max(1, min(64, math.ceil(2 * l2 / max(1, n * d * torch.finfo(dtype).bits // 8))))
    return [(torch.randn(n, d, generator=gen) * 1.5).to(device=device, dtype=dtype) for _ in range(count)]


def roofline(device: torch.device, dtype: torch.dtype, quick: bool, timer: Timer) -> dict:
    """Measured peaks (fastest block): a square matmul in the run's dtype (FLOP/s) and a
    device-to-device copy (bytes/s, read + write)."""
    cuda = device.type == "cuda"
    s = 8192 if cuda else (512 if quick else 2048)
    a = torch.randn(s, s, device=device).to(dtype)
    b = torch.randn(s, s, device=device).to(dtype)
    copy_bytes = (1 << 30) if cuda else ((16 if quick else 64) << 20)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = timer.measure({"mm": (lambda: torch.mm(a, b), None), "copy": (lambda: dst.copy_(src), None)}, best=True)
    return {
        "matmul_flops_per_s": 2 * s**3 / t["mm"],
        "matmul": f"{s}x{s}x{s} {str(dtype).removeprefix('torch.')}",
        "copy_bytes_per_s": 2 * copy_bytes / t["copy"],  # read + write
        "copy": f"{copy_bytes >> 20} MiB device-to-device",
    }
