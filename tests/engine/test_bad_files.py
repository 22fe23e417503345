"""Files the engine must refuse, each with a SAEFormatError naming the file and the problem."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monitor.encode import SAEFormatError, load_sae

from .conftest import D_IN, D_SAE


def saelens_dir(path: Path, arch="jumprelu", drop=(), replace=None, **cfg_extra) -> Path:
    t = {
        "W_enc": torch.randn(D_IN, D_SAE), "b_enc": torch.zeros(D_SAE),
        "W_dec": torch.randn(D_SAE, D_IN), "b_dec": torch.zeros(D_IN), "threshold": torch.full((D_SAE,), 0.5),
    }  # fmt: skip
    if arch != "jumprelu":
        t.pop("threshold")
    t.update(replace or {})
    for name in drop:
        t.pop(name)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"sae_lens_version": "6.54.12"}, **cfg_extra}  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def refused(path, match: str, **kw) -> SAEFormatError:
    with pytest.raises(SAEFormatError, match=match) as e:
        load_sae(path, **kw)
    assert isinstance(e.value, ValueError)
    return e.value


def test_missing_tensor(tmp_path):
    e = refused(saelens_dir(tmp_path, drop=["threshold"]), "missing tensor.*threshold.*jumprelu")
    assert e.path.endswith("sae_weights.safetensors")


def test_shape_mismatch(tmp_path):
    e = refused(saelens_dir(tmp_path, replace={"W_dec": torch.randn(D_SAE, D_IN + 1)}), r"W_dec has shape \[96, 33\]")
    assert str(tmp_path) in str(e)
    refused(saelens_dir(tmp_path / "b", replace={"b_dec": torch.zeros(D_IN + 2)}), "b_dec has shape")
    refused(saelens_dir(tmp_path / "c", d_sae=D_SAE * 2), "config says d_sae=192")


def test_unknown_architecture(tmp_path):
    e = refused(saelens_dir(tmp_path, arch="standard", architecture="matching_pursuit"), "unknown SAE architecture 'matching_pursuit'")
    assert e.path.endswith("cfg.json")


def test_unexpected_tensor(tmp_path):
    refused(saelens_dir(tmp_path, arch="standard", replace={"W_skip": torch.zeros(D_IN, D_IN)}), "unexpected tensor.*W_skip")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_threshold(tmp_path, bad):
    thr = torch.full((D_SAE,), 0.5)
    thr[17] = bad
    refused(saelens_dir(tmp_path, replace={"threshold": thr}), "threshold contains (NaN|inf)")


def test_nan_in_gemmascope_threshold(tmp_path):
    p = {"W_enc": np.zeros((D_IN, D_SAE), np.float32), "W_dec": np.zeros((D_SAE, D_IN), np.float32),
         "b_enc": np.zeros(D_SAE, np.float32), "b_dec": np.zeros(D_IN, np.float32),
         "threshold": np.full(D_SAE, np.nan, np.float32)}  # fmt: skip
    np.savez(tmp_path / "params.npz", **p)
    refused(tmp_path, r"params.npz: threshold contains NaN")


def test_corrupt_files(tmp_path):
    saelens_dir(tmp_path / "a")
    (tmp_path / "a" / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    refused(tmp_path / "a", "sae_weights.safetensors: not a readable safetensors file")
    saelens_dir(tmp_path / "b")
    (tmp_path / "b" / "cfg.json").write_text("{not json")
    refused(tmp_path / "b", "cfg.json: unreadable JSON config")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "params.npz").write_bytes(b"PK\x03\x04 broken zip")
    refused(tmp_path / "c", "params.npz: not a readable .npz")
    (tmp_path / "d").mkdir()
    refused(tmp_path / "d", "no SAE weights found")
    refused(tmp_path / "nowhere", "no such file or directory")
    (tmp_path / "weights.bin").write_bytes(b"1234")
    refused(tmp_path / "weights.bin", "not a recognised SAE file")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    refused(tmp_path, "params.npz: not a readable .npz archive")


class _Payload:
    """Unpickling this would run code: a file appears at the path given."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "sae.pt", "wb") as f:
        pickle.dump({"encoder_linear.weight": _Payload(marker)}, f)
    e = refused(tmp_path / "sae.pt", "refused: not a weights-only torch file")
    assert e.path.endswith("sae.pt")
    assert not marker.exists()


def test_torch_file_with_objects_is_refused(tmp_path):
    torch.save({"encoder_linear.weight": torch.zeros(2, 2), "opt": _Payload(tmp_path / "x")}, tmp_path / "sae.pth")
    refused(tmp_path / "sae.pth", "not a weights-only torch file")
    assert not (tmp_path / "x").exists()


def test_goodfire_missing_and_unexpected(tmp_path):
    torch.save({"encoder_linear.weight": torch.zeros(D_SAE, D_IN)}, tmp_path / "a.pt")
    refused(tmp_path / "a.pt", "missing tensor")
    torch.save({"encoder_linear.weight": torch.zeros(D_SAE, D_IN), "step": torch.tensor(3.0)}, tmp_path / "b.pt")
    refused(tmp_path / "b.pt", "unexpected entry 'step'")
    torch.save([torch.zeros(2)], tmp_path / "c.pt")
    refused(tmp_path / "c.pt", "expected a state dict")


def test_sparsify_refusals(tmp_path):
    def write(name, **cfg):
        d = tmp_path / name
        d.mkdir()
        save_file({"encoder.weight": torch.zeros(D_SAE, D_IN), "encoder.bias": torch.zeros(D_SAE),
                   "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}, str(d / "sae.safetensors"))  # fmt: skip
        (d / "cfg.json").write_text(json.dumps({"d_in": D_IN, "num_latents": D_SAE, "k": 4, **cfg}))
        return d

    refused(write("groupmax", activation="groupmax"), "activation 'groupmax' is not supported")
    refused(write("transcoder", transcode=True), "transcoder")
    refused(write("wrongk", k=D_SAE + 1), "k=97 out of range")


def test_saelens_covariance_whitening_unfolded(tmp_path):
    refused(saelens_dir(tmp_path, normalize_activations="covariance_whitening"), "covariance_whitening not folded")


def test_topk_without_k(tmp_path):
    refused(saelens_dir(tmp_path, arch="topk"), "topk SAE without k")


# ---- issue 10, item 12: the engine's refusals name the right file and say what is wrong -----
def gemmascope2_dir(path: Path, config: dict | None, **extra_tensors) -> Path:
    """A Gemma Scope 2 folder as HuggingFace publishes it: params.safetensors + config.json."""
    path.mkdir(parents=True, exist_ok=True)
    t = {"w_enc": torch.randn(D_IN, D_SAE), "w_dec": torch.randn(D_SAE, D_IN), "b_enc": torch.zeros(D_SAE),
         "b_dec": torch.zeros(D_IN), "threshold": torch.full((D_SAE,), 0.1), **extra_tensors}  # fmt: skip
    save_file(t, str(path / "params.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


GS2_SAE_CONFIG = {
    "hf_hook_point_in": "model.layers.5.output", "hf_hook_point_out": "model.layers.5.output",
    "width": D_SAE, "model_name": "gemma-v3-270m-pt", "architecture": "jump_relu", "l0": 10,
    "affine_connection": False, "type": "sae",
}  # fmt: skip
GS2_TRANSCODER_CONFIG = {
    **GS2_SAE_CONFIG, "type": "transcoder",
    "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
    "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output",
}  # fmt: skip


def test_gemmascope2_sae_config_loads(tmp_path):
    """The published SAE config (type sae, hook out == hook in, no affine connection) is served."""
    assert load_sae(gemmascope2_dir(tmp_path, GS2_SAE_CONFIG)).d_sae == D_SAE


@pytest.mark.parametrize(
    "config,match",
    [
        (GS2_TRANSCODER_CONFIG, r"config.json: .*type.*'transcoder'"),
        ({**GS2_TRANSCODER_CONFIG, "type": "sae"}, r"config.json: .*hf_hook_point_out.*post_feedforward_layernorm"),
        ({k: v for k, v in GS2_TRANSCODER_CONFIG.items() if k != "type"}, r"config.json: .*hf_hook_point_out"),
        ({**GS2_SAE_CONFIG, "type": None, "affine_connection": True}, r"config.json: .*affine_connection"),
    ],
)
def test_gemmascope2_transcoder_without_skip_is_refused(tmp_path, config, match):
    """A transcoder has the shapes of an SAE (d_out == d_in); only its config.json tells."""
    e = refused(gemmascope2_dir(tmp_path, config), match)
    assert e.path.endswith("config.json") and "transcoder" in str(e)


def test_gemmascope2_skip_transcoder_names_the_tensor(tmp_path):
    e = refused(gemmascope2_dir(tmp_path, None, affine_skip_connection=torch.zeros(D_IN, D_IN)), "affine_skip_connection")
    assert e.path.endswith("params.safetensors")


def _expected_average(path: Path) -> Path:
    return saelens_dir(path, normalize_activations="expected_average_only_in")


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "activation_scaler.json: unreadable JSON"),
        ("[0.5]", "activation_scaler.json: .*not a JSON object"),
        ('{"scaling_factor": -2}', r"activation_scaler.json: scaling_factor -2 is not a positive"),
        ('{"scaling_factor": "0.5"}', r"activation_scaler.json: scaling_factor '0.5' is not a positive"),
        ('{"scaling_factor": NaN}', r"activation_scaler.json: scaling_factor nan is not a positive"),
        ('{"scaling_factor": true}', r"activation_scaler.json: scaling_factor True is not a positive"),
    ],
)
def test_bad_activation_scaler_names_its_own_file(tmp_path, content, match):
    d = _expected_average(tmp_path)
    (d / "activation_scaler.json").write_text(content)
    e = refused(d, match)
    assert e.path.endswith("activation_scaler.json")


def test_bad_norm_scaling_factor_in_cfg_and_argument(tmp_path):
    d = saelens_dir(tmp_path, normalize_activations="expected_average_only_in", norm_scaling_factor=-1)
    e = refused(d, r"cfg.json: norm_scaling_factor -1 is not a positive")
    assert e.path.endswith("cfg.json")
    d2 = _expected_average(tmp_path / "b")
    refused(d2, r"norm_scaling_factor= argument: nan is not a positive", norm_scaling_factor=float("nan"))
    refused(d2, r"norm_scaling_factor= argument: 0.0 is not a positive", norm_scaling_factor=0.0)


def _goodfire_bytes(zip_format: bool) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"encoder_linear.weight": torch.randn(D_SAE, D_IN), "encoder_linear.bias": torch.zeros(D_SAE),
                "decoder_linear.weight": torch.randn(D_IN, D_SAE), "decoder_linear.bias": torch.zeros(D_IN)},
               buf, _use_new_zipfile_serialization=zip_format)  # fmt: skip
    return buf.getvalue()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 1000, 200, 100, 10, 3, 0])
def test_truncated_torch_file(tmp_path, keep, zip_format):
    """A cut-off download: the message says so (not "Errno 22" or miniz internals)."""
    data = _goodfire_bytes(zip_format)
    (tmp_path / "whole.pt").write_bytes(data)
    assert load_sae(tmp_path / "whole.pt").d_sae == D_SAE
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    (tmp_path / "sae.pt").write_bytes(data[:n])
    e = refused(tmp_path / "sae.pt", r"sae.pt: (truncated|empty)")
    assert "Errno" not in str(e) and "miniz" not in str(e) and len(str(e)) < 400
    assert e.path.endswith("sae.pt")


def test_pickle_refusal_is_our_own_plain_message(tmp_path):
    """torch's weights-only message has ANSI bold codes and advises weights_only=False; ours
    names the offending global and never suggests running the pickle."""
    with open(tmp_path / "sae.pt", "wb") as f:
        pickle.dump({"encoder_linear.weight": _Payload(tmp_path / "pwned")}, f)
    torch.save({"encoder_linear.weight": _Payload(tmp_path / "pwned")}, tmp_path / "sae2.pt")
    for name in ("sae.pt", "sae2.pt"):
        e = refused(tmp_path / name, r"sae2?.pt: refused: not a weights-only torch file: it pickles .*pathlib\.Path")
        text = str(e)
        assert "\x1b" not in text and "weights_only" not in text and "\n" not in text
        assert not (tmp_path / "pwned").exists()


def test_error_messages_are_clean_and_short(tmp_path):
    """Control characters in a value from a file never reach the message; long values are cut."""
    d = saelens_dir(tmp_path, arch="standard", architecture="\x1b[31mred\x1b[0m" + "x" * 5000)
    e = refused(d, "unknown SAE architecture")
    assert "\x1b" not in str(e) and len(str(e)) < 600
