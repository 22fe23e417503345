"""Encode benchmark: the featurewatch engine against a SAELens-style reference, on CPU or GPU.

Shape of Gemma-2-2B's width-16k residual SAEs (d_in 2304, d_sae 16384), JumpReLU, synthetic
weights. The reference is the real ``sae_lens.JumpReLUSAE`` on the same weights when sae-lens is
installed and the device is the CPU (a plain torch re-statement of its encode otherwise): to watch
M features it encodes all 16384 and indexes, the way a SAELens user would. Per batch size it
times: bare matmul, reference encode, featurewatch encode, ``watch(M)`` with and without the
Triton kernel, a stacked layer (two watches + a probe bank as one product) and probes, and prints
each as tokens/s and as a fraction of a roofline measured in the same run (the matmul rate for
full encodes, the device-to-device copy rate for subset encodes and probes).

On CUDA, times come from CUDA events, after warm-up (which also JIT-compiles the Triton kernel),
and inputs rotate through buffers that together exceed twice the L2 cache, so the bytes-roofline
fractions are HBM figures rather than cache figures. Each figure is an eager call (Python and
kernel launches included, as the sidecar calls it) and, beside it, the same calls replayed from a
CUDA graph: the GPU's own time, which small batches hide behind launch overhead. Needs only torch, numpy, safetensors (and
triton for the kernel rows): no vLLM, no sae-lens.

    python bench/encode.py                                  # CPU, batch 256
    python bench/encode.py --device cuda                    # bf16, batches 1, 64, 256, 4096, 16384
    python bench/encode.py --device cuda --dtype fp16 --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.timing import Timer, input_pool, roofline, triton_mode  # noqa: E402, F401  (triton_mode: re-exported)
from monitor.encode import JumpReLUSAE, ProbeBank, kernels  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- contenders ------------------------------------------------------------------------------------
def synthetic_jumprelu(d: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 CPU weights shaped like a trained JumpReLU SAE (nothing is downloaded)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d, n, generator=g) / math.sqrt(d),
        "b_enc": torch.randn(n, generator=g) * 0.1,
        "W_dec": torch.randn(n, d, generator=g) / math.sqrt(d),
        "b_dec": torch.randn(d, generator=g) * 0.1,
        "threshold": torch.rand(n, generator=g) * 0.5 + 0.5,
    }


def saelens_reference(w: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, prefer: str = "auto"):
    """(encode callable, label): SAELens's JumpReLU encode on the same weights. The real
    ``sae_lens.JumpReLUSAE`` on CPU float32 when installed (prefer auto/saelens), else its math in
    plain torch with every tensor in the run's dtype, as a SAELens SAE moved to that dtype runs."""
    if prefer != "torch" and device.type == "cpu" and dtype == torch.float32:
        try:
            from sae_lens import JumpReLUSAE as SLJumpReLU
            from sae_lens import JumpReLUSAEConfig
        except Exception:  # pragma: no cover - optional
            if prefer == "saelens":
                raise
        else:
            d, n = w["W_enc"].shape
            sl = SLJumpReLU(JumpReLUSAEConfig(d_in=d, d_sae=n, device="meta"))
            sl.load_state_dict(dict(w), assign=True)
            sl.cfg.device = "cpu"
            return sl.encode, "sae_lens.JumpReLUSAE"
    W_enc, b_enc, b_dec, thr = (w[k].to(device=device, dtype=dtype) for k in ("W_enc", "b_enc", "b_dec", "threshold"))

    def encode(x):
        pre = (x - b_dec) @ W_enc + b_enc
        return torch.relu(pre) * (pre > thr)

    return encode, "SAELens-style (torch)"


class StackedLayer:
    """A layer's SAE watches and probe bank as one [N, d]x[d, K] product then each part's
    activation, the sidecar's stacking (monitor/encode/stage.py) on any device and dtype.

    ``parts_cpu`` (float32 CPU twins) give the affine maps; ``parts_dev`` (the same encoders on
    the device) apply the activations. ``thresholds`` per part: the kernel threshold of a
    ReLU/JumpReLU watch (max(θ, 0), 0 for ReLU) or None for a probe bank (raw logits, -inf)."""

    def __init__(self, parts_cpu: list, parts_dev: list, thresholds: list, device: torch.device, dtype: torch.dtype):
        affines = [p.affine() for p in parts_cpu]
        if any(a is None for a in affines):
            raise ValueError("every part needs an affine map (ReLU/JumpReLU/gated watches without normalisation, probe banks)")
        W = torch.cat([w for w, _ in affines], dim=1)
        c = torch.cat([c for _, c in affines])
        self.W = W.to(device=device, dtype=dtype).contiguous()
        self.c = c.to(device=device, dtype=dtype)
        self.c32 = c.to(device=device, dtype=torch.float32)
        self.widths = [w.shape[1] for w, _ in affines]
        self.parts = parts_dev
        self.t32 = torch.cat([
            t.float() if t is not None else torch.full((width,), -math.inf)
            for t, width in zip(thresholds, self.widths)
        ]).to(device)  # fmt: skip
        self.fused_parts = [i for i, t in enumerate(thresholds) if t is None]  # still need activate() after the kernel

    def _views(self, z: torch.Tensor):
        start = 0
        for i, width in enumerate(self.widths):
            yield i, z[:, start:start + width]
            start += width

    @torch.no_grad()
    def torch_product(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.addmm(self.c, x, self.W).float()
        for i, view in self._views(z):
            out = self.parts[i].activate(view)
            if out is not view:
                view.copy_(out)
        return z

    @torch.no_grad()
    def triton_product(self, x: torch.Tensor) -> torch.Tensor:
        z = kernels.fused_subset_encode(x, None, self.W, self.c32, self.t32)
        for i, view in self._views(z):
            if i in self.fused_parts:
                self.parts[i].activate(view)
        return z


def kernel_launch(x, b_dec, W, b32, t32, block_n: int, block_m: int, block_d: int, warps: int, stages: int):
    """The fused kernel at a given tiling (kernels.fused_subset_encode picks its own): for the sweep
    that tells, from one GPU run, which tiling kernels.py should use."""
    N, D = x.shape
    M = W.shape[1]
    out = torch.empty((N, M), dtype=torch.float32, device=x.device)
    grid = (math.ceil(N / block_n), math.ceil(M / block_m))
    kernels._compiled(kernels._interpreting())[grid](
        x, b_dec if b_dec is not None else x, W, b32, t32, out, N, D, M,
        x.stride(0), W.stride(0), out.stride(0),
        HAS_BDEC=b_dec is not None, IEEE=x.dtype == torch.float32,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


# ---- the run -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    compute = DTYPES[args.dtype] if device.type == "cuda" else torch.float32  # the engine computes fp32 on CPU
    triton_rows = kernels.triton_available() and (device.type == "cuda" or kernels._interpreting())
    timer = Timer(device, args.seconds, args.rounds, graphs=args.graphs)
    d, n, P = args.d_in, args.d_sae, args.probes
    batches = [int(v) for v in args.batches.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    gen = torch.Generator().manual_seed(1)
    esize = torch.finfo(compute).bits // 8

    w = synthetic_jumprelu(d, n)
    sae_cpu = JumpReLUSAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], threshold=w["threshold"])
    sae = JumpReLUSAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], threshold=w["threshold"], device=device, dtype=compute)
    ref_encode, ref_label = saelens_reference(w, device, compute, args.reference)
    W_enc_dev = sae.W_enc
    t_kernel = w["threshold"].clamp(min=0)
    pw = torch.randn(P, d, generator=gen) * 0.05
    bank_kw = dict(names=[f"p{i}" for i in range(P)], layer=0, mean=torch.randn(d, generator=gen) * 0.1,
                   scale=torch.rand(d, generator=gen) + 0.5, platt_a=torch.ones(P), platt_b=torch.zeros(P))  # fmt: skip
    pb = torch.randn(P, generator=gen)
    bank_cpu, bank = ProbeBank(pw, pb, **bank_kw), ProbeBank(pw, pb, **bank_kw, device=device)
    pw_dev, pb_dev = pw.to(device), pb.to(device)
    mean_dev, scale_dev = bank_kw["mean"].to(device), bank_kw["scale"].to(device)
    stack_feats = [torch.randperm(n, generator=gen)[: args.stack_m] for _ in range(args.stack_saes)]
    stacked = StackedLayer(
        [sae_cpu.watch(f) for f in stack_feats] + [bank_cpu],
        [sae.watch(f) for f in stack_feats] + [bank],
        [t_kernel[f] for f in stack_feats] + [None], device, compute,
    )  # fmt: skip
    stack_watches = [sae.watch(f) for f in stack_feats]
    feats = {m: torch.randperm(n, generator=gen)[:m] for m in ms}
    watches = {m: sae.watch(f) for m, f in feats.items()}

    result = {
        "config": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(compute).removeprefix("torch."), "d_in": d, "d_sae": n, "batches": batches, "m": ms,
            "probes": P, "stack": f"{args.stack_saes} x watch({args.stack_m}) + {P} probes",
            "reference": ref_label, "torch": torch.__version__, "triton_rows": triton_rows,
            "triton_interpreted": kernels._interpreting(), "threads": torch.get_num_threads(),
            "sweep_m": args.sweep_m,
        },
        "roofline": roofline(device, compute, args.quick, timer),
        "rows": [],
        "sweep": [],
    }
    roof = result["roofline"]
    rows = result["rows"]

    def add(section, name, N, t, key, kind, work, ref_key=None):
        rate = roof["matmul_flops_per_s"] if kind == "flops" else roof["copy_bytes_per_s"]
        sec, graph = t[key], timer.graph.get(key)
        rows.append({"section": section, "name": name, "batch": N, "seconds": sec, "tokens_per_s": N / sec,
                     "roofline": kind, "work": work, "fraction": work / sec / rate,
                     "vs_reference": (t[ref_key] / sec) if ref_key else None,
                     "graph_seconds": graph, "graph_fraction": (work / graph / rate) if graph else None})  # fmt: skip

    with torch.no_grad():
        for N in batches:
            pool = input_pool(N, d, device, compute, gen)
            it = itertools.cycle(pool)
            nx = lambda: next(it)  # noqa: E731
            x_bytes = N * d * esize
            if device.type == "cpu" and compute == torch.float32 and N:
                x0 = pool[0]
                assert float((sae.encode(x0) - ref_encode(x0)).abs().max()) <= 1e-4
            flops = 2 * N * d * n
            t = timer.measure({"mm": (lambda: torch.mm(nx(), W_enc_dev), None),
                               "ref": (lambda: ref_encode(nx()), None), "fw": (lambda: sae.encode(nx()), None)},
                              graph_calls=len(pool))  # fmt: skip
            add("full encode", "bare matmul x @ W_enc", N, t, "mm", "flops", flops)
            add("full encode", f"reference {ref_label}", N, t, "ref", "flops", flops)
            add("full encode", "featurewatch encode", N, t, "fw", "flops", flops, "ref")
            for m in ms:
                f, wt = feats[m].to(device), watches[m]
                c = {"ref": (lambda f=f: ref_encode(nx())[:, f], None), "torch": (lambda wt=wt: wt(nx()), "0")}
                if triton_rows:
                    c["triton"] = (lambda wt=wt: wt(nx()), "1")
                t = timer.measure(c, graph_calls=len(pool))
                sub_bytes = x_bytes + d * m * esize + N * m * 4
                add(f"watch(M={m})", "reference full encode + index", N, t, "ref", "flops", flops)
                add(f"watch(M={m})", "watch, torch", N, t, "torch", "bytes", sub_bytes, "ref")
                if triton_rows:
                    add(f"watch(M={m})", "watch, Triton kernel", N, t, "triton", "bytes", sub_bytes, "ref")
            K = sum(stacked.widths)
            def separate():
                x = nx()
                return torch.cat([wt(x) for wt in stack_watches] + [bank.score(x)], 1)

            c = {"sep": (separate, None), "torch": (lambda: stacked.torch_product(nx()), None)}
            if triton_rows:
                c["triton"] = (lambda: stacked.triton_product(nx()), None)
            t = timer.measure(c, graph_calls=len(pool))
            st_bytes = x_bytes + d * K * esize + N * K * 4
            add("stacked layer", f"separate: {args.stack_saes} watches + ProbeBank.score", N, t, "sep", "bytes", st_bytes)
            add("stacked layer", "stacked: one addmm + activations", N, t, "torch", "bytes", st_bytes, "sep")
            if triton_rows:
                add("stacked layer", "stacked: one fused Triton kernel", N, t, "triton", "bytes", st_bytes, "sep")

            def per_probe():
                z = (nx().float() - mean_dev) / scale_dev
                return torch.stack([torch.sigmoid(z @ pw_dev[p] + pb_dev[p]) for p in range(P)], dim=1)

            t = timer.measure({"loop": (per_probe, None), "bank": (lambda: bank.score(nx()), None)}, graph_calls=len(pool))
            pr_bytes = x_bytes + d * P * 4 + N * P * 4
            add(f"probes (P={P})", "one probe at a time (reference)", N, t, "loop", "bytes", pr_bytes)
            add(f"probes (P={P})", "ProbeBank.score", N, t, "bank", "bytes", pr_bytes, "loop")
            del pool, it

        if triton_rows and args.sweep_m in feats:
            sweep(result, args, sae, feats[args.sweep_m], t_kernel, compute, timer, gen)
    result["config"]["graphs"] = timer.graphs and timer.graph_error is None
    result["config"]["graph_error"] = timer.graph_error
    return result


def sweep(result, args, sae, f, t_kernel, compute, timer, gen) -> None:
    """watch(sweep_m) at the largest batch for a few kernel tilings; each checked against the
    default tiling's output before it is timed."""
    device, N, d = sae.device, max(result["config"]["batches"]), sae.d_in
    if N == 0:
        return
    W = sae.W_enc.index_select(1, f.to(device)).contiguous()
    b32 = sae.b_enc.index_select(0, f.to(device)).float()
    t32 = t_kernel[f].to(device)
    pool = input_pool(N, d, device, compute, gen)
    it = itertools.cycle(pool)
    base = kernels.fused_subset_encode(pool[0], sae.b_dec, W, b32, t32)
    bd = 32 if compute == torch.float32 else 64
    configs = [(32, 32, bd, 4, 3), (64, 64, bd, 4, 3)] if args.quick else [
        (bn, bm, bd, wp, st) for bn in (16, 32, 64, 128) for bm in (32, 64) for wp, st in ((4, 3), (8, 4))]
    m = W.shape[1]
    nbytes = N * d * (torch.finfo(compute).bits // 8) + d * m * (torch.finfo(compute).bits // 8) + N * m * 4
    for cfg in configs:
        entry = {"block_n": cfg[0], "block_m": cfg[1], "block_d": cfg[2], "num_warps": cfg[3], "num_stages": cfg[4]}
        try:
            out = kernel_launch(pool[0], sae.b_dec, W, b32, t32, *cfg)
            diff = float((out - base).abs().max()) if out.numel() else 0.0
            entry["max_abs_diff_vs_default"] = diff
            sec = timer.measure({"k": (lambda cfg=cfg: kernel_launch(next(it), sae.b_dec, W, b32, t32, *cfg), None)},
                                graph_calls=len(pool))["k"]  # fmt: skip
            graph = timer.graph.get("k")
            bw = result["roofline"]["copy_bytes_per_s"]
            entry.update(seconds=sec, fraction=nbytes / sec / bw, graph_seconds=graph,
                         graph_fraction=(nbytes / graph / bw) if graph else None)  # fmt: skip
        except Exception as e:  # a tiling the device cannot run (shared memory, registers)
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        result["sweep"].append(entry)


# ---- output ----------------------------------------------------------------------------------------
def _fmt_time(sec: float) -> str:
    return f"{sec * 1e6:,.1f} µs" if sec < 1e-3 else f"{sec * 1e3:,.3f} ms"


def markdown(result: dict) -> str:
    cfg, roof = result["config"], result["roofline"]
    lines = [
        f"Device: {cfg['device']}, {cfg['dtype']}, torch {cfg['torch']}, d_in={cfg['d_in']} d_sae={cfg['d_sae']}, "
        f"JumpReLU, reference: {cfg['reference']}" + (" — Triton rows ran in the interpreter (timings meaningless)"
                                                        if cfg["triton_interpreted"] and cfg["triton_rows"] else ""),
        f"Roofline (measured in this run): matmul {roof['matmul_flops_per_s'] / 1e12:,.2f} TFLOP/s ({roof['matmul']}), "
        f"copy {roof['copy_bytes_per_s'] / 1e9:,.1f} GB/s ({roof['copy']})",
        "",
    ]
    graphs = any(r.get("graph_seconds") for r in result["rows"])
    if graphs:
        lines += ["Time and % of roofline per eager call (Python and launches included, as the sidecar calls it); "
                  "'graph': the same calls replayed from a CUDA graph (the GPU's own time).", ""]
    lines += ["| section | contender | batch | time | tokens/s | % of roofline | vs reference |"
              + (" graph time | graph % of roofline |" if graphs else ""),
              "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if graphs else "")]  # fmt: skip
    for r in result["rows"]:
        kind = "matmul" if r["roofline"] == "flops" else "copy"
        vs = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "—"
        line = (f"| {r['section']} | {r['name']} | {r['batch']} | {_fmt_time(r['seconds'])} | "
                f"{r['tokens_per_s']:,.0f} | {100 * r['fraction']:.1f} % {kind} | {vs} |")  # fmt: skip
        if graphs:
            g = r.get("graph_seconds")
            line += f" {_fmt_time(g)} | {100 * r['graph_fraction']:.1f} % |" if g else " — | — |"
        lines.append(line)
    if cfg.get("graph_error"):
        lines += ["", f"CUDA-graph timing stopped: {cfg['graph_error']}"]
    if result["sweep"]:
        lines += ["", f"Kernel tilings, watch({cfg['sweep_m']}) at batch {max(cfg['batches'])}:", "",
                  "| BLOCK_N | BLOCK_M | BLOCK_D | warps | stages | time | % of copy | graph time | graph % of copy "
                  "| max diff vs default |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for s in result["sweep"]:
            head = f"| {s['block_n']} | {s['block_m']} | {s['block_d']} | {s['num_warps']} | {s['num_stages']} |"
            if "error" in s:
                lines.append(f"{head} failed: {s['error'][:80]} | | | | |")
                continue
            g = s.get("graph_seconds")
            gcols = f"{_fmt_time(g)} | {100 * s['graph_fraction']:.1f} %" if g else "— | —"
            lines.append(f"{head} {_fmt_time(s['seconds'])} | {100 * s['fraction']:.1f} % | {gcols} | "
                         f"{s['max_abs_diff_vs_default']:.2e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="compute dtype on CUDA (the engine always computes fp32 on CPU)")
    ap.add_argument("--batches", "--batch", default=None,
                    help="batch sizes (default: 256 on CPU, 1,64,256,4096,16384 on CUDA)")  # fmt: skip
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--m", default="16,64,256,1024", help="watched feature counts")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--stack-saes", type=int, default=2, help="watches in the stacked layer")
    ap.add_argument("--stack-m", type=int, default=64, help="features per watch in the stacked layer")
    ap.add_argument("--sweep-m", type=int, default=64, help="M of the kernel tiling sweep (at the largest batch)")
    ap.add_argument("--reference", choices=["auto", "saelens", "torch"], default="auto",
                    help="auto: sae_lens on CPU float32 when installed, the torch re-statement otherwise")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 1 on CPU: on a CPU shared with other busy processes several "
                         "threads stall at OpenMP barriers; 0: torch's default)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=None, help="minimum timing per group (default 1 CPU, 0.3 CUDA)")
    ap.add_argument("--rounds", type=int, default=5, help="minimum timed blocks per contender")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="CUDA: skip the CUDA-graph replay timings (the GPU's own time per call)")
    ap.add_argument("--quick", action="store_true", help="small roofline probes and sweep (CI)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", type=Path, help="write the table here")
    return ap


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Device-dependent defaults."""
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench/encode.py: --device cuda but torch.cuda.is_available() is False")
    if args.batches is None:
        args.batches = "1,64,256,4096,16384" if cuda else "256"
    if args.seconds is None:
        args.seconds = 0.3 if cuda else 1.0
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = resolve(parser().parse_args(argv))
    torch.manual_seed(0)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return result


if __name__ == "__main__":
    main()
