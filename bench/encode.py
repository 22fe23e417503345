"""Encode benchmark: the featurewatch engine against a SAELens-style reference, in one run.

Shape of Gemma-2-2B's width-16k residual SAEs (d_in 2304, d_sae 16384), JumpReLU. The reference
is the real ``sae_lens.JumpReLUSAE`` on the same weights when sae-lens is installed (a plain
torch re-statement of its encode otherwise): to watch M features it encodes all 16384 and
indexes, the way a SAELens user would. Printed: tokens/s and ratios, side by side.

    python bench/encode.py                      # batch 256, M = 16, 64, 256, 1024, 16 probes
    python bench/encode.py --batch 64 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from monitor.encode import JumpReLUSAE, ProbeBank


def timed(fns: dict[str, Callable[[], object]], min_seconds: float, min_runs: int = 5) -> dict[str, float]:
    """Median seconds per call of each function. Contenders take turns in blocks of ~30 ms
    (so caches stay warm within a block, as in a serving loop) and the turns repeat, so load
    from other processes on a shared machine falls on every contender alike."""
    reps = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up and calibration
        reps[name] = max(1, int(0.03 / max(time.perf_counter() - t0, 1e-6)))
    runs: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while min(len(r) for r in runs.values()) < min_runs or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            for _ in range(reps[name]):
                t0 = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t0)
    return {k: statistics.median(r) for k, r in runs.items()}


def saelens_reference(W_enc, b_enc, W_dec, b_dec, threshold):
    """(encode callable, label): the real SAELens JumpReLU SAE sharing our weights if available."""
    try:
        from sae_lens import JumpReLUSAE as SLJumpReLU
        from sae_lens import JumpReLUSAEConfig
    except Exception:  # pragma: no cover - optional
        def encode(x):
            pre = (x - b_dec) @ W_enc + b_enc
            return torch.relu(pre) * (pre > threshold)

        return encode, "SAELens-style (torch)"
    sl = SLJumpReLU(JumpReLUSAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], device="meta"))
    sl.load_state_dict({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}, assign=True)
    sl.cfg.device = "cpu"
    return sl.encode, "sae_lens.JumpReLUSAE"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--m", default="16,64,256,1024", help="watched feature counts")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). On a CPU shared with other busy processes, "
                         "several threads stall at OpenMP barriers (~10 ms per small op measured here)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum timing per measurement")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, n, N = args.d_in, args.d_sae, args.batch

    W_enc = torch.randn(d, n) / math.sqrt(d)
    W_dec = torch.randn(n, d) / math.sqrt(d)
    b_enc = torch.randn(n) * 0.1
    b_dec = torch.randn(d) * 0.1
    threshold = torch.rand(n) * 0.5 + 0.5
    ours = JumpReLUSAE(W_enc, b_enc, W_dec, b_dec, threshold=threshold)
    ref_encode, ref_label = saelens_reference(W_enc, b_enc, W_dec, b_dec, threshold)
    x = torch.randn(N, d) * 1.5
    with torch.no_grad():
        assert float((ours.encode(x) - ref_encode(x)).abs().max()) <= 1e-4

    print(f"featurewatch encode bench: d_in={d} d_sae={n} batch={N} jumprelu fp32 cpu, "
          f"torch threads={torch.get_num_threads()}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}")  # fmt: skip
    print(f"reference: {ref_label} (full encode, then index the watched columns)\n")

    def row(name: str, sec: float, ref_sec: float | None = None, ref_name: str = "", per_batch: bool = True) -> None:
        ratio = f"{ref_sec / sec:9.1f}x faster than {ref_name}" if ref_sec else ""
        rate = f"{N / sec:14,.0f} tok/s" if per_batch else " " * 20
        print(f"  {name:<34} {sec * 1e3:10.3f} ms {rate}   {ratio}")

    with torch.no_grad():
        t = timed({"mm": lambda: torch.mm(x, W_enc), "ref": lambda: ref_encode(x), "ours": lambda: ours.encode(x)},
                  args.seconds * 3)  # fmt: skip
        print("full encode")
        row("bare matmul x @ W_enc", t["mm"])
        row(f"reference {ref_label}", t["ref"])
        row("featurewatch encode", t["ours"], t["ref"], "reference")
        print(f"  featurewatch encode / bare matmul = {t['ours'] / t['mm']:.2f}  (goal <= 1.3)\n")

        print("subset encode (M watched features)")
        g = torch.Generator().manual_seed(1)
        for m in [int(v) for v in args.m.split(",")]:
            feats = torch.randperm(n, generator=g)[:m]
            watch = ours.watch(feats)
            assert float((watch(x) - ref_encode(x)[:, feats]).abs().max()) <= 1e-4
            t = timed({
                "ref": lambda f=feats: ref_encode(x)[:, f],
                "watch": lambda w=watch: w(x),
                "gather": lambda f=feats: ours.watch(f),
            }, args.seconds)  # fmt: skip
            print(f" M={m}")
            row("reference full encode + index", t["ref"])
            row("featurewatch watch(feats)(x)", t["watch"], t["ref"], "reference")
            row("  (once per feature set: gather)", t["gather"], per_batch=False)
            row("  gather + one watch call", t["gather"] + t["watch"], t["ref"], "reference")
        print()

        P = args.probes
        w = torch.randn(P, d) * 0.05
        bank = ProbeBank(w, torch.randn(P), names=[f"p{i}" for i in range(P)], layer=0,
                         mean=torch.randn(d) * 0.1, scale=torch.rand(d) + 0.5,
                         platt_a=torch.ones(P), platt_b=torch.zeros(P))  # fmt: skip
        mean, scale = bank.source["mean"], bank.source["scale"]

        def per_probe():
            z = (x - mean) / scale
            return torch.stack([torch.sigmoid(z @ w[p] + bank.source["bias"][p]) for p in range(P)], dim=1)

        assert float((bank.score(x) - per_probe()).abs().max()) <= 1e-5
        t = timed({"loop": per_probe, "bank": lambda: bank.score(x)}, args.seconds / 2, min_runs=20)
        print(f"probes ({P} probes, standardised + Platt)")
        row("one probe at a time (reference)", t["loop"])
        row("featurewatch ProbeBank.score", t["bank"], t["loop"], "reference")


if __name__ == "__main__":
    main()
