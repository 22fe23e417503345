"""Parity with the real sae-lens package: SAEs built and saved by SAELens itself, loaded by us,
encode/decode/subset/top/clamp equal to SAELens's own results within 1e-5 (fp32)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

sae_lens = pytest.importorskip("sae_lens")

from monitor.encode import GatedSAE, JumpReLUSAE, StandardSAE, TopKSAE, load_sae  # noqa: E402

from .conftest import D_IN, D_SAE, max_abs  # noqa: E402

TOL = 1e-5
N = 48

SL_CLASSES = {
    "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, StandardSAE),
    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, JumpReLUSAE),
    "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, TopKSAE),
    "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, GatedSAE),
}


def randomise(sae, gen: torch.Generator) -> None:
    """SAELens initialises biases and thresholds to zero; give every parameter a real value."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name in ("W_enc", "W_dec"):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(D_IN))
            elif name == "threshold":  # some negative: relu(z)·1[z > θ] must still hold
                p.copy_(torch.rand(p.shape, generator=gen) * 0.8 - 0.2)
            elif name == "b_dec":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def make_saelens(arch: str, gen: torch.Generator, **cfg_kw):
    sl_cls, cfg_cls, _ = SL_CLASSES[arch]
    if arch == "topk":
        cfg_kw.setdefault("k", 8)
    sae = sl_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg_kw))
    randomise(sae, gen)
    return sae


def sl_clamp(sl, x: torch.Tensor, feature: int, value: float) -> torch.Tensor:
    """SAELens's clamping with the error term kept: decode(f') + (x − decode(f))."""
    with torch.no_grad():
        f = sl.encode(x)
        recon = sl.decode(f)
        f2 = sl.encode(x).clone()
        f2[..., feature] = value
        return sl.decode(f2) + (x - recon)


def check_parity(sl, ours, x: torch.Tensor, features: list[int]) -> None:
    with torch.no_grad():
        ref = sl.encode(x)
        ref_dec = sl.decode(ref)
    ref = ref.reshape(-1, D_SAE)
    f = ours.encode(x)
    assert f.dtype == torch.float32 and f.shape == (ref.shape[0], D_SAE)
    assert max_abs(f, ref) <= TOL
    assert 0 < int((ref > 0).sum()) < ref.numel()  # the test exercises both sides of the activation
    assert max_abs(ours.decode(f, x=x), ref_dec.reshape(-1, D_IN)) <= TOL
    if ours.subset_encodable:
        assert max_abs(ours.encode_subset(x, features), ref[:, features]) <= TOL
    assert max_abs(ours.watch(features)(x), ref[:, features]) <= TOL
    values, indices = ours.encode_top(x, 5)
    assert indices.dtype == torch.int32 and values.dtype == torch.float32
    assert max_abs(values, ref.topk(5, dim=1).values) <= TOL
    assert max_abs(ref.gather(1, indices.long()), values) <= TOL
    for feature, value in ((features[0], 0.0), (features[1], 3.0)):
        assert max_abs(ours.clamp(x, feature, value), sl_clamp(sl, x, feature, value)) <= TOL


@pytest.mark.parametrize("arch", list(SL_CLASSES))
@pytest.mark.parametrize("normalize", ["none", "layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saved_by_saelens(tmp_path, gen, arch, normalize, apply_b_dec):
    sl = make_saelens(arch, gen, apply_b_dec_to_input=apply_b_dec, normalize_activations=normalize)
    sl.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert type(ours) is SL_CLASSES[arch][2] and ours.architecture == arch
    assert (ours.d_in, ours.d_sae, ours.normalize) == (D_IN, D_SAE, normalize)
    x = torch.randn(N, D_IN, generator=gen) * 2 + 0.3
    check_parity(sl, ours, x, [0, 7, 31, 95, 7])


def test_topk_rescaled_by_decoder_norm(tmp_path, gen):
    sl = make_saelens("topk", gen, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sl.W_dec.mul_(torch.rand(D_SAE, 1, generator=gen) * 2 + 0.5)  # norms far from 1
    sl.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert ours.rescale_acts_by_decoder_norm and ours.k == 8
    check_parity(sl, ours, torch.randn(N, D_IN, generator=gen), [1, 2, 3])


@pytest.mark.parametrize("arch", list(SL_CLASSES))
def test_expected_average_only_in_folded(tmp_path, gen, arch):
    """The scalar input scaling is folded into the weights exactly as SAELens folds it."""
    factor = 0.37
    sl = make_saelens(arch, gen, normalize_activations="expected_average_only_in")
    sl.save_model(tmp_path)
    as_saved = load_sae(tmp_path)  # no factor anywhere: taken as already folded, as SAELens does
    x = torch.randn(N, D_IN, generator=gen) * 3
    with torch.no_grad():
        assert max_abs(as_saved.encode(x), sl.encode(x)) <= TOL
    ours = load_sae(tmp_path, norm_scaling_factor=factor)
    assert ours.normalize == "none" and ours.metadata["folded_norm_scaling_factor"] == factor
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": factor}))
    from_scaler = load_sae(tmp_path)  # a SAELens training checkpoint keeps it here
    sl.fold_activation_norm_scaling_factor(factor)
    check_parity(sl, ours, x, [4, 5, 6])
    check_parity(sl, from_scaler, x, [4, 5, 6])


def test_hook_z_inputs(tmp_path, gen):
    """hook_z SAEs take [..., n_heads, d_head] inputs, flattened like SAELens does."""
    sl = make_saelens("jumprelu", gen, reshape_activations="hook_z")
    sl.cfg.metadata.hook_name = "blocks.0.attn.hook_z"
    sl.save_model(tmp_path)
    ours = load_sae(tmp_path)
    x = torch.randn(6, 5, 4, D_IN // 4, generator=gen)  # [batch, pos, heads, d_head]
    with torch.no_grad():
        ref = sl.encode(x).reshape(-1, D_SAE)
    assert max_abs(ours.encode(x), ref) <= TOL
    assert ours.clamp(x, 3, 0.0).shape == x.shape


def test_batchtopk_serves_as_jumprelu(tmp_path, gen):
    """BatchTopK: SAELens's inference save is a JumpReLU SAE; its training checkpoint (architecture
    batchtopk, a scalar topk_threshold, decoder-norm rescaling) loads to the same SAE."""
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6.0)
    tr = sae_lens.BatchTopKTrainingSAE(cfg)
    randomise(tr, gen)
    with torch.no_grad():
        tr.W_dec.mul_(torch.rand(D_SAE, 1, generator=gen) + 0.5)
        tr.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    tr.save_inference_model(tmp_path / "inference")
    tr.save_model(tmp_path / "checkpoint")
    sl = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    assert sl.cfg.architecture() == "jumprelu"
    x = torch.randn(N, D_IN, generator=gen) * 2
    for where in ("inference", "checkpoint"):
        ours = load_sae(tmp_path / where)
        assert isinstance(ours, JumpReLUSAE)
        check_parity(sl, ours, x, [0, 1, 2])


def _write_pre6(path, tensors: dict, cfg: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))


def _raw(gen, *, threshold=False) -> dict:
    t = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) / math.sqrt(D_IN),
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.2,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen) / math.sqrt(D_IN),
        "b_dec": torch.randn(D_IN, generator=gen) * 0.5,
    }
    if threshold:
        t["threshold"] = torch.rand(D_SAE, generator=gen) * 0.5
    return t


PRE6_BASE = {
    "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "gpt2",
    "hook_point": "blocks.4.hook_resid_pre", "hook_point_layer": 4, "hook_point_head_index": None,
    "context_size": 128, "dataset_path": "x", "sae_lens_training_version": "3.11.0",
}  # fmt: skip


@pytest.mark.parametrize(
    "name,extra,threshold",
    [
        ("relu_bool_norm", {"activation_fn_str": "relu", "normalize_activations": False, "apply_b_dec_to_input": True}, False),
        ("topk_kwargs", {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7}, "normalize_activations": "none"}, False),
        ("jumprelu_5x", {"architecture": "jumprelu", "sae_lens_version": "5.3.0", "apply_b_dec_to_input": False,
                         "normalize_activations": None, "activation_fn_str": "relu"}, True),
        ("layer_norm", {"activation_fn_str": "relu", "normalize_activations": "layer_norm"}, False),
    ],
)  # fmt: skip
def test_pre_6_configs(tmp_path, gen, name, extra, threshold):
    """Configs written by SAELens < 6 load the same in SAELens 6 and here."""
    t = _raw(gen, threshold=threshold)
    t["scaling_factor"] = torch.ones(D_SAE)  # old files carried an all-ones fine-tuning scale
    _write_pre6(tmp_path / name, t, {**PRE6_BASE, **extra})
    sl = sae_lens.SAE.load_from_disk(tmp_path / name)
    ours = load_sae(tmp_path / name)
    assert ours.architecture == sl.cfg.architecture()
    assert ours.metadata["hook_name"] == "blocks.4.hook_resid_pre"
    check_parity(sl, ours, torch.randn(N, D_IN, generator=gen) * 2, [8, 9, 10])


def test_pre_6_finetuning_scale_folded_into_decoder(tmp_path, gen):
    """A non-trivial pre-6 fine-tuning scale multiplied activations before decoding: folded
    into W_dec, encode is unchanged and decode is (f·s)·W_dec + b_dec."""
    t = _raw(gen)
    s = torch.rand(D_SAE, generator=gen) + 0.5
    _write_pre6(tmp_path, {**t, "scaling_factor": s}, {**PRE6_BASE, "finetuning_scaling_factor": True})
    ours = load_sae(tmp_path)
    x = torch.randn(N, D_IN, generator=gen)
    f = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    assert max_abs(ours.encode(x), f) <= TOL
    assert max_abs(ours.decode(f), (f * s) @ t["W_dec"] + t["b_dec"]) <= TOL


def test_log_threshold_checkpoint(tmp_path, gen):
    """Older JumpReLU training checkpoints stored log_threshold instead of threshold."""
    sl = make_saelens("jumprelu", gen)
    with torch.no_grad():
        sl.threshold.copy_(torch.rand(D_SAE, generator=gen) * 0.5 + 0.05)
    sl.save_model(tmp_path)
    from safetensors.torch import load_file

    t = load_file(tmp_path / "sae_weights.safetensors")
    t["log_threshold"] = t.pop("threshold").log()
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    ours = load_sae(tmp_path)
    x = torch.randn(N, D_IN, generator=gen)
    with torch.no_grad():
        assert max_abs(ours.encode(x), sl.encode(x)) <= TOL
