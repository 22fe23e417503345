"""Non-finite and absurd numbers in SAE and probe files are refused at load (issue 10, item 1).

A NaN or inf weight (or one so large that x·w overflows) makes activations, probe scores and
the plugin's steering arithmetic NaN/inf. Each refusal names the file, the tensor as the file
names it, and how many entries are wrong; config numbers (k, d_in, factors) are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monitor.encode import ProbeBank, ProbeFormatError, SAEFormatError, load_probes, load_sae, save_probes
from monitor.encode import sae as sae_module

from .conftest import D_IN, D_SAE
from .test_bad_files import saelens_dir

N_ENC = D_IN * D_SAE


def poisoned(shape, nan=0, inf=0, big=0) -> torch.Tensor:
    t = torch.randn(shape) * 0.1
    flat = t.view(-1)
    flat[:nan] = float("nan")
    flat[nan : nan + inf] = float("-inf")
    flat[nan + inf : nan + inf + big] = 1e30
    return t


def refused(path, match: str, error=SAEFormatError, **kw) -> SAEFormatError:
    with pytest.raises(error, match=match) as e:
        load_sae(path, **kw) if error is SAEFormatError else load_probes(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600
    return e.value


# ---- SAE files, each format, the tensor named as the file names it --------------------------
def _gemmascope(tmp_path: Path, bad: dict) -> Path:
    p = {"W_enc": np.zeros((D_IN, D_SAE), np.float32), "W_dec": np.zeros((D_SAE, D_IN), np.float32),
         "b_enc": np.zeros(D_SAE, np.float32), "b_dec": np.zeros(D_IN, np.float32),
         "threshold": np.full(D_SAE, 0.1, np.float32)}  # fmt: skip
    p.update({k: v.numpy() for k, v in bad.items()})
    np.savez(tmp_path / "params.npz", **p)
    return tmp_path


def _gemmascope2(tmp_path: Path, bad: dict) -> Path:
    t = {"w_enc": torch.zeros(D_IN, D_SAE), "w_dec": torch.zeros(D_SAE, D_IN), "b_enc": torch.zeros(D_SAE),
         "b_dec": torch.zeros(D_IN), "threshold": torch.full((D_SAE,), 0.1), **bad}  # fmt: skip
    save_file(t, str(tmp_path / "params.safetensors"))
    return tmp_path


def _sparsify(tmp_path: Path, bad: dict) -> Path:
    t = {"encoder.weight": torch.zeros(D_SAE, D_IN), "encoder.bias": torch.zeros(D_SAE),
         "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN), **bad}  # fmt: skip
    save_file(t, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "num_latents": D_SAE, "k": 4}))
    return tmp_path


def _goodfire(tmp_path: Path, bad: dict) -> Path:
    t = {"encoder_linear.weight": torch.zeros(D_SAE, D_IN), "encoder_linear.bias": torch.zeros(D_SAE),
         "decoder_linear.weight": torch.zeros(D_IN, D_SAE), "decoder_linear.bias": torch.zeros(D_IN), **bad}  # fmt: skip
    torch.save(t, tmp_path / "sae.pt")
    return tmp_path / "sae.pt"


def _saelens(tmp_path: Path, bad: dict) -> Path:
    return saelens_dir(tmp_path, replace=bad)


@pytest.mark.parametrize(
    "writer,name,shape,file",
    [
        (_saelens, "W_enc", (D_IN, D_SAE), "sae_weights.safetensors"),
        (_saelens, "threshold", (D_SAE,), "sae_weights.safetensors"),
        (_gemmascope, "b_dec", (D_IN,), "params.npz"),
        (_gemmascope2, "w_dec", (D_SAE, D_IN), "params.safetensors"),
        (_sparsify, "encoder.weight", (D_SAE, D_IN), "sae.safetensors"),
        (_goodfire, "decoder_linear.bias", (D_IN,), "sae.pt"),
    ],
)
def test_nonfinite_weight_refused_with_count(tmp_path, writer, name, shape, file):
    path = writer(tmp_path, {name: poisoned(shape, nan=2, inf=1)})
    n = int(np.prod(shape))
    e = refused(path, rf"{file}: {name} contains NaN or inf: 3 non-finite of {n} values \(2 NaN, 1 inf\)")
    assert e.path.endswith(file)


@pytest.mark.parametrize("writer,name,shape", [(_saelens, "W_dec", (D_SAE, D_IN)), (_goodfire, "encoder_linear.weight", (D_SAE, D_IN))])
def test_absurd_magnitude_refused(tmp_path, writer, name, shape):
    path = writer(tmp_path, {name: poisoned(shape, big=4)})
    refused(path, rf"{name} has 4 of {D_IN * D_SAE} values beyond ±1e\+20 \(largest 1e\+30\)")


def test_training_checkpoint_tensors_are_checked(tmp_path):
    """Tensors a loader consumes (topk_threshold, log_threshold, pre-6 scaling_factor) count too."""
    d = saelens_dir(tmp_path / "btk", arch="batchtopk", drop=(), replace={"topk_threshold": torch.tensor(float("inf"))})
    refused(d, r"topk_threshold contains NaN or inf: 1 non-finite of 1 values \(0 NaN, 1 inf\)")
    d = saelens_dir(tmp_path / "log", drop=("threshold",), replace={"log_threshold": poisoned((D_SAE,), nan=1)})
    refused(d, r"log_threshold contains NaN or inf: 1 non-finite")
    d = saelens_dir(tmp_path / "ft", arch="standard", replace={"scaling_factor": poisoned((D_SAE,), nan=5)})
    refused(d, r"scaling_factor contains NaN or inf: 5 non-finite")


def test_fold_that_overflows_is_refused(tmp_path):
    """A finite file and a tiny (but positive) factor: W_dec/s leaves the bound."""
    d = saelens_dir(tmp_path, normalize_activations="expected_average_only_in",
                    replace={"W_dec": torch.full((D_SAE, D_IN), 1e3)})  # fmt: skip
    refused(d, r"W_dec has .* beyond ±1e\+20 .* after folding the norm scaling factor 1e-19", norm_scaling_factor=1e-19)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("k", "NaN", r"cfg.json: k nan is not an integer"),
        ("k", "Infinity", r"cfg.json: k inf is not an integer"),
        ("k", "1e400", r"cfg.json: k inf is not an integer"),
        ("k", '"8"', r"cfg.json: k '8' is not an integer"),
        ("k", "true", r"cfg.json: k True is not an integer"),
        ("k", "[8]", r"cfg.json: k \[8\] is not an integer"),
        ("k", "8.5", r"cfg.json: k 8.5 is not an integer"),
        ("d_in", "-3", r"cfg.json: d_in -3 is out of range"),
        ("d_sae", str(2**70), r"cfg.json: d_sae 1180591620717411303424 is out of range"),
        ("rescale_acts_by_decoder_norm", '"false"', r"cfg.json: rescale_acts_by_decoder_norm 'false' is not true or false"),
        ("apply_b_dec_to_input", "0", r"cfg.json: apply_b_dec_to_input 0 is not true or false"),
    ],
)
def test_config_numbers_refused(tmp_path, field, value, match):
    d = saelens_dir(tmp_path, arch="topk", k=8)
    cfg = (d / "cfg.json").read_text()
    cfg = json.loads(cfg)
    cfg[field] = "@@"
    (d / "cfg.json").write_text(json.dumps(cfg).replace('"@@"', value))
    e = refused(d, match)
    assert e.path.endswith("cfg.json")


def test_sparsify_config_numbers(tmp_path):
    d = _sparsify(tmp_path, {})
    (d / "cfg.json").write_text('{"d_in": 32, "num_latents": 96, "k": Infinity}')
    refused(d, r"cfg.json: k inf is not an integer")
    (d / "cfg.json").write_text('{"d_in": 32, "expansion_factor": NaN, "k": 4}')
    refused(d, r"cfg.json: expansion_factor nan is not an integer")


def test_half_compute_dtype_overflow_refused(tmp_path, monkeypatch):
    """On CUDA an fp16 compute dtype turns weights beyond 65504 into inf: refused at load.
    (CPU always computes in fp32; the dtype choice is forced here to run the check on CPU.)"""
    d = saelens_dir(tmp_path, replace={"W_enc": poisoned((D_IN, D_SAE), big=0) + 1e5 * (torch.arange(D_IN * D_SAE) == 7).reshape(D_IN, D_SAE)})
    monkeypatch.setattr(sae_module, "compute_dtype", lambda device, dtype: torch.float16)
    refused(d, r"W_enc: 1 of 3072 values overflow torch.float16")


# ---- probe banks -----------------------------------------------------------------------------
D, P = 48, 5
NAMES = ["a", "b", "c", "d", "e"]


def bank(**bad) -> dict:
    g = torch.Generator().manual_seed(1)
    t = {"weight": torch.randn(P, D, generator=g) * 0.3, "bias": torch.randn(P, generator=g),
         "mean": torch.randn(D, generator=g), "scale": torch.rand(D, generator=g) + 0.5,
         "platt_a": torch.rand(P, generator=g) + 0.5, "platt_b": torch.randn(P, generator=g),
         "threshold": torch.rand(P, generator=g)}  # fmt: skip
    t.update(bad)
    return t


def write_bank(path: Path, tensors: dict, **meta) -> Path:
    save_file(tensors, str(path), metadata={"names": json.dumps(NAMES), "layer": "3", **meta})
    return path


@pytest.mark.parametrize(
    "name,shape", [("weight", (P, D)), ("bias", (P,)), ("mean", (D,)), ("scale", (D,)), ("platt_a", (P,)),
                   ("platt_b", (P,)), ("threshold", (P,))]  # fmt: skip
)
def test_probe_nonfinite_refused_with_count(tmp_path, name, shape):
    path = write_bank(tmp_path / "p.safetensors", bank(**{name: poisoned(shape, nan=1, inf=1)}))
    n = int(np.prod(shape))
    e = refused(path, rf"p.safetensors: {name} contains NaN or inf: 2 non-finite of {n} values", error=ProbeFormatError)
    assert e.path == str(path)


def test_probe_zero_scale_and_absurd_values(tmp_path):
    scale = torch.rand(D) + 0.5
    scale[[3, 9]] = 0.0
    refused(write_bank(tmp_path / "z.safetensors", bank(scale=scale)), r"scale contains zeros \(2 of 48\)", error=ProbeFormatError)
    refused(write_bank(tmp_path / "b.safetensors", bank(bias=poisoned((P,), big=1))), r"bias has 1 of 5 values beyond ±1e\+20",
            error=ProbeFormatError)  # fmt: skip
    tiny = torch.rand(D) + 0.5
    tiny[0] = 1e-25  # finite, non-zero, but weight/scale overflows the bound
    refused(write_bank(tmp_path / "t.safetensors", bank(scale=tiny)), r"standardised weight/scale has 5 of 240 values beyond",
            error=ProbeFormatError)  # fmt: skip


def test_probe_writer_and_constructor_refuse_too(tmp_path):
    with pytest.raises(ProbeFormatError, match="platt_a contains NaN or inf"):
        save_probes(tmp_path / "w.safetensors", names=NAMES, layer=1, **bank(platt_a=poisoned((P,), nan=1)))
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(ProbeFormatError, match="weight contains NaN or inf"):
        ProbeBank(names=NAMES, layer=1, **bank(weight=poisoned((P, D), inf=1)))


def test_probe_metadata_refusals_are_short(tmp_path):
    t = bank()
    refused(write_bank(tmp_path / "l.safetensors", t, layer="9" * 100_000), r"'layer' is not an integer", error=ProbeFormatError)
    refused(write_bank(tmp_path / "n.safetensors", t, names="[" * 100_000 + "]" * 100_000), r"'names'", error=ProbeFormatError)
