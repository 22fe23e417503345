"""Property: whatever JSON a config file holds, loading gives an SAE or a SAEFormatError with one
short line naming the file — never another exception (a traceback in the sidecar's log).

Derandomized (the same examples every run) so CI is deterministic.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from monitor.encode import SAE, SAEFormatError, load_sae

from .conftest import D_IN, D_SAE
from .test_bad_files import saelens_dir

SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80), st.sampled_from([0, 1, 4, 8, D_IN, D_SAE, D_SAE + 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -0.0, 1e-300, 0.37]),
    st.text(max_size=20),
    st.sampled_from(["standard", "jumprelu", "topk", "gated", "batchtopk", "none", "layer_norm",
                     "expected_average_only_in", "constant_norm_rescale", "hook_z", "topk", "relu", "sae",
                     "transcoder", "jump_relu"]),
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)

SAELENS_KEYS = ["architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations", "rescale_acts_by_decoder_norm", "norm_scaling_factor", "metadata",
                "sae_lens_version", "activation_fn_str", "activation_fn_kwargs", "hook_point"]  # fmt: skip


def dump(obj) -> str:
    """JSON as Python writes it (NaN/Infinity literals included, as a careless writer would)."""
    return json.dumps(obj, allow_nan=True)


def check(path, **kw) -> None:
    try:
        sae = load_sae(path, **kw)
    except SAEFormatError as e:
        text = str(e)
        assert text.startswith(str(path if path.is_file() else path)) or str(path) in text
        assert "\n" not in text and "\x1b" not in text and len(text) < 800, text
        return
    assert isinstance(sae, SAE)
    x = torch.randn(4, D_IN)
    f = sae.encode(x)
    assert bool(torch.isfinite(f).all())  # an accepted SAE never produces NaN/inf on finite input


@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(SAELENS_KEYS), values, max_size=5), scaler=st.none() | values)
def test_saelens_cfg_fuzz(tmp_path_factory, fields, scaler):
    d = saelens_dir(tmp_path_factory.mktemp("sl"), arch="standard")
    cfg = json.loads((d / "cfg.json").read_text())
    cfg.update(fields)
    (d / "cfg.json").write_text(dump(cfg))
    if scaler is not None:
        (d / "activation_scaler.json").write_text(dump({"scaling_factor": scaler} if not isinstance(scaler, dict) else scaler))
    check(d)


@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(["activation", "k", "d_in", "num_latents", "expansion_factor",
                                               "transcode", "skip_connection", "signed"]), values, max_size=4))  # fmt: skip
def test_sparsify_cfg_fuzz(tmp_path_factory, fields):
    d = tmp_path_factory.mktemp("sp")
    save_file({"encoder.weight": torch.randn(D_SAE, D_IN), "encoder.bias": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}, str(d / "sae.safetensors"))  # fmt: skip
    (d / "cfg.json").write_text(dump({"d_in": D_IN, "num_latents": D_SAE, "k": 4, **fields}))
    check(d)


@SETTINGS
@given(cfg=values)
def test_gemmascope2_config_fuzz(tmp_path_factory, cfg):
    d = tmp_path_factory.mktemp("gs2")
    save_file({"w_enc": torch.randn(D_IN, D_SAE), "w_dec": torch.randn(D_SAE, D_IN), "b_enc": torch.zeros(D_SAE),
               "b_dec": torch.zeros(D_IN), "threshold": torch.full((D_SAE,), 0.1)}, str(d / "params.safetensors"))  # fmt: skip
    (d / "config.json").write_text(dump(cfg))
    check(d)


@pytest.mark.parametrize("factor", [0.0, -1.0, math.nan, math.inf, 1e-30, 1e30])
def test_norm_scaling_factor_argument_out_of_range(tmp_path, factor):
    d = saelens_dir(tmp_path, normalize_activations="expected_average_only_in")
    with pytest.raises(SAEFormatError, match="norm_scaling_factor= argument"):
        load_sae(d, norm_scaling_factor=factor)
