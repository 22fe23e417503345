"""Gemma Scope, Gemma Scope 2, EleutherAI sparsify and Goodfire files written in their exact
layouts, checked against each format's own reference math; format detection and override."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monitor.encode import JumpReLUSAE, SAEFormatError, StandardSAE, TopKSAE, detect_format, load_sae

from .conftest import D_IN, D_SAE, max_abs

TOL = 1e-5


def jumprelu_arrays(gen) -> dict[str, np.ndarray]:
    return {
        "W_enc": (torch.randn(D_IN, D_SAE, generator=gen) / math.sqrt(D_IN)).numpy(),
        "W_dec": (torch.randn(D_SAE, D_IN, generator=gen) / math.sqrt(D_IN)).numpy(),
        "b_enc": (torch.randn(D_SAE, generator=gen) * 0.2).numpy(),
        "b_dec": (torch.randn(D_IN, generator=gen) * 0.5).numpy(),
        "threshold": (torch.rand(D_SAE, generator=gen) * 0.5).numpy(),
    }


def gemmascope_reference(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Gemma Scope tutorial's JumpReLU: no b_dec subtraction on the way in."""
    pre = x @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def test_gemmascope_npz(tmp_path, gen):
    p = jumprelu_arrays(gen)
    np.savez(tmp_path / "params.npz", **p)
    for where in (tmp_path, tmp_path / "params.npz"):
        assert detect_format(where)[0] == "gemmascope"
        sae = load_sae(where)
        assert isinstance(sae, JumpReLUSAE) and not sae.apply_b_dec_to_input
        x = torch.randn(40, D_IN, generator=gen)
        acts, recon = gemmascope_reference(p, x.numpy())
        assert max_abs(sae.encode(x), torch.from_numpy(acts)) <= TOL
        assert max_abs(sae.decode(sae.encode(x)), torch.from_numpy(recon)) <= TOL
        assert max_abs(sae.watch([3, 4])(x), torch.from_numpy(acts[:, [3, 4]])) <= TOL
        assert sae.threshold.dtype == torch.float32


def test_gemmascope2_safetensors(tmp_path, gen):
    p = jumprelu_arrays(gen)
    save_file({k.lower(): torch.from_numpy(v) for k, v in p.items()}, str(tmp_path / "params.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt"}))
    assert detect_format(tmp_path) == ("gemmascope2", tmp_path / "params.safetensors")
    sae = load_sae(tmp_path)
    x = torch.randn(40, D_IN, generator=gen)
    acts, recon = gemmascope_reference(p, x.numpy())
    assert max_abs(sae.encode(x), torch.from_numpy(acts)) <= TOL
    assert max_abs(sae.decode(sae.encode(x)), torch.from_numpy(recon)) <= TOL


def test_bf16_weights_keep_fp32_thresholds(tmp_path, gen):
    """Weights stored in bf16 load as fp32 on CPU; a threshold stored in fp32 stays exact."""
    p = jumprelu_arrays(gen)
    t = {k.lower(): torch.from_numpy(v).to(torch.bfloat16) for k, v in p.items() if k != "threshold"}
    t["threshold"] = torch.full((D_SAE,), 1.1)
    save_file(t, str(tmp_path / "params.safetensors"))
    sae = load_sae(tmp_path)
    assert sae.W_enc.dtype == torch.float32 and sae.threshold.dtype == torch.float32
    assert float(sae.threshold[0]) == pytest.approx(1.1, abs=1e-7)  # bf16 would hold 1.1016


def write_sparsify(path, gen, dtype=torch.float32, k=8) -> dict[str, torch.Tensor]:
    t = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=gen) / math.sqrt(D_IN),
        "encoder.bias": torch.randn(D_SAE, generator=gen) * 0.2,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen) / math.sqrt(D_IN),
        "b_dec": torch.randn(D_IN, generator=gen) * 0.5,
    }
    t = {k_: v.to(dtype) for k_, v in t.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": D_SAE, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))
    return {k_: v.float() for k_, v in t.items()}


def sparsify_reference(t, x, k=8):
    """sparsify's SparseCoder: top-k of ReLU((x − b_dec)·encoderᵀ + bias); decode by gathering W_dec rows."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    top_acts, top_idx = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter_(-1, top_idx, top_acts)
    recon = (top_acts[..., None] * t["W_dec"][top_idx]).sum(-2) + t["b_dec"]
    return dense, recon, top_acts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify(tmp_path, gen, dtype):
    t = write_sparsify(tmp_path / "layers.6", gen, dtype)
    assert detect_format(tmp_path / "layers.6") == ("sparsify", tmp_path / "layers.6")
    sae = load_sae(tmp_path / "layers.6")
    assert isinstance(sae, TopKSAE) and sae.k == 8 and sae.metadata["hookpoint"] == "layers.6"
    x = torch.randn(40, D_IN, generator=gen)
    dense, recon, top_acts = sparsify_reference(t, x)
    assert max_abs(sae.encode(x), dense) <= TOL
    assert max_abs(sae.decode(sae.encode(x)), recon) <= TOL
    values, _ = sae.encode_top(x, 8)
    assert max_abs(values, top_acts) <= TOL
    assert max_abs(sae.watch([1, 2])(x), dense[:, [1, 2]]) <= TOL
    with pytest.raises(ValueError, match="every other feature"):
        sae.encode_subset(x, [1, 2])


def test_goodfire(tmp_path, gen):
    t = {
        "encoder_linear.weight": torch.randn(D_SAE, D_IN, generator=gen) / math.sqrt(D_IN),
        "encoder_linear.bias": torch.randn(D_SAE, generator=gen) * 0.2,
        "decoder_linear.weight": torch.randn(D_IN, D_SAE, generator=gen) / math.sqrt(D_IN),
        "decoder_linear.bias": torch.randn(D_IN, generator=gen) * 0.5,
    }
    torch.save(t, tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    assert detect_format(tmp_path)[0] == "goodfire"
    sae = load_sae(tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    assert isinstance(sae, StandardSAE) and not sae.apply_b_dec_to_input
    x = torch.randn(40, D_IN, generator=gen)
    f = torch.relu(x @ t["encoder_linear.weight"].T + t["encoder_linear.bias"])  # Goodfire's encode
    assert max_abs(sae.encode(x), f) <= TOL
    assert max_abs(sae.decode(f), f @ t["decoder_linear.weight"].T + t["decoder_linear.bias"]) <= TOL


def test_explicit_format_override(tmp_path, gen):
    np.savez(tmp_path / "params.npz", **jumprelu_arrays(gen))
    assert isinstance(load_sae(tmp_path, format="gemmascope"), JumpReLUSAE)
    with pytest.raises(SAEFormatError, match="cfg.json: missing config file"):
        load_sae(tmp_path, format="sparsify")
    with pytest.raises(ValueError, match="unknown SAE format"):
        load_sae(tmp_path, format="pickle")


def test_cfg_json_path_and_weights_path(tmp_path, gen):
    write_sparsify(tmp_path, gen)
    assert detect_format(tmp_path / "cfg.json") == ("sparsify", tmp_path)
    assert detect_format(tmp_path / "sae.safetensors") == ("sparsify", tmp_path)
