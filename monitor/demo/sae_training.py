"""The demo SAE: BatchTopK training (Matryoshka groups), saved as a SAELens JumpReLU SAE."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from monitor.demo.build_config import BuildConfig, MODEL_NAME, log


def train_batchtopk_sae(acts: torch.Tensor, cfg: BuildConfig, seed: int
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """BatchTopK SAE (k active per token on average across the batch, unit-norm decoder rows,
    AuxK loss for dead latents); returns it as a JumpReLU SAE whose scalar threshold is the
    running mean of the smallest activation BatchTopK kept."""
    g = torch.Generator().manual_seed(seed)
    n, d = acts.shape
    m, k = cfg.d_sae, cfg.sae_k
    W_dec = torch.randn(m, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec = torch.nn.Parameter(W_dec)
    b_dec0 = acts[torch.randperm(n, generator=g)[:8192]].median(dim=0).values
    b_enc0 = torch.zeros(m)
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(b_enc0)
    b_dec = torch.nn.Parameter(b_dec0)
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=cfg.sae_lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(m)
    threshold = None
    var = acts.var(dim=0).sum()
    aux_k = 2 * k * 8
    bounds = [int(b) for b in cfg.sae_groups.split(",") if b.strip()] if cfg.sae_groups else []
    assert all(0 < b < m for b in bounds) and bounds == sorted(bounds)
    t0 = time.time()
    hist = []
    for step in range(cfg.sae_steps):
        lr = cfg.sae_lr * min(1.0, (cfg.sae_steps - step) / (0.2 * cfg.sae_steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x = acts[torch.randint(0, n, (cfg.sae_batch,), generator=g)]
        z = torch.relu((x - b_dec) @ W_enc + b_enc)
        flat = z.flatten()
        vals, idx = flat.topk(k * x.shape[0], sorted=False)
        f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(z)
        if bounds:
            # Matryoshka: every prefix of the dictionary reconstructs x on its own
            parts = [f[:, a:b] @ W_dec[a:b] for a, b in zip([0, *bounds], [*bounds, m])]
            partial = b_dec + torch.stack(parts).cumsum(0)
            errs = (x - partial).pow(2).sum(dim=2).mean(dim=1)
            err = x - partial[-1]
            mse = errs[-1]
            loss = errs.mean()
        else:
            err = x - (f @ W_dec + b_dec)
            mse = err.pow(2).sum(dim=1).mean()
            loss = mse
        fired = (f > 0).any(dim=0)
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + x.shape[0])
        dead = since_fired > 200_000
        if dead.any():
            zd = z * dead
            kk = min(aux_k, int(dead.sum()))
            v, i = zd.topk(kk, dim=1)
            fa = torch.zeros_like(zd).scatter(1, i, v)
            aux = (fa @ W_dec - err.detach()).pow(2).sum(dim=1).mean()
            loss = loss + aux / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # keep decoder rows unit norm: remove the radial gradient, renormalise after the step
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            kept_min = vals[vals > 0].min() if (vals > 0).any() else torch.tensor(0.0)
            threshold = kept_min if threshold is None else 0.99 * threshold + 0.01 * kept_min
        hist.append(float(mse.detach()))
        if step % 250 == 0 or step == cfg.sae_steps - 1:
            log(f"sae step {step:4d}/{cfg.sae_steps} fvu {np.mean(hist[-50:]) / float(var):.4f} "
                f"dead {int(dead.sum())} thr {float(threshold):.3f} ({time.time() - t0:.0f}s)")
    thr = torch.full((m,), float(threshold))
    weights = {"W_enc": W_enc.detach(), "b_enc": b_enc.detach(), "W_dec": W_dec.detach(),
               "b_dec": b_dec.detach(), "threshold": thr}
    return weights, {"batchtopk_k": k, "threshold": float(threshold)}


def save_sae(weights: dict[str, torch.Tensor], out: Path, layer: int, extra_meta: dict) -> None:
    """SAELens v6 JumpReLU files (``cfg.json`` + ``sae_weights.safetensors``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in weights.items()},
              str(out / "sae_weights.safetensors"))
    d_in, d_sae = weights["W_enc"].shape
    cfg = {
        "d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12", "sae_lens_training_version": "featurewatch-demo",
            "model_name": MODEL_NAME, "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_layer": layer, "hf_hidden_states_index": layer + 1, "prepend_bos": True,
            "context_size": 256, "dataset_path": "monitor.demo.corpus", **extra_meta,
        },
        "architecture": "jumprelu",
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_demo_sae(path: str | Path):
    """The engine's SAE (``monitor.encode.load_sae``): what the sidecar serves."""
    from monitor.encode import load_sae

    return load_sae(str(path))


