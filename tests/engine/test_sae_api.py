"""The SAE contract beyond parity: shapes and dtypes, clamping semantics, ClampParams for the plugin."""

from __future__ import annotations

import math

import pytest
import torch

from monitor.encode import ClampParams, GatedSAE, JumpReLUSAE, StandardSAE, TopKSAE

from .conftest import D_IN, D_SAE, max_abs


def build(arch: str, gen, *, apply_b_dec=True, normalize="none") -> object:
    W_enc = torch.randn(D_IN, D_SAE, generator=gen) / math.sqrt(D_IN)
    W_dec = torch.randn(D_SAE, D_IN, generator=gen) / math.sqrt(D_IN)
    b_dec = torch.randn(D_IN, generator=gen) * 0.5
    b = torch.randn(D_SAE, generator=gen) * 0.2
    kw = {"apply_b_dec_to_input": apply_b_dec, "normalize": normalize}
    if arch == "standard":
        return StandardSAE(W_enc, b, W_dec, b_dec, **kw)
    if arch == "jumprelu":
        return JumpReLUSAE(W_enc, b, W_dec, b_dec, threshold=torch.rand(D_SAE, generator=gen) * 0.8 - 0.2, **kw)
    if arch == "topk":
        return TopKSAE(W_enc, b, W_dec, b_dec, k=6, **kw)
    r = torch.randn(D_SAE, generator=gen) * 0.3
    return GatedSAE(W_enc, W_dec, b_dec, b, torch.randn(D_SAE, generator=gen) * 0.2, r, **kw)


ARCHS = ["standard", "jumprelu", "topk", "gated"]


@pytest.mark.parametrize("arch", ARCHS)
def test_any_leading_shape_and_half_inputs(gen, arch):
    sae = build(arch, gen)
    x = torch.randn(3, 5, D_IN, generator=gen)
    f = sae.encode(x)
    assert f.shape == (15, D_SAE) and f.dtype == torch.float32
    assert torch.equal(f, sae.encode(x.reshape(15, D_IN)))
    for half in (torch.bfloat16, torch.float16):
        xh = x.to(half)
        assert torch.equal(sae.encode(xh), sae.encode(xh.float()))  # upcast, then fp32 math
        assert sae.clamp(xh, 2, 0.0).dtype == half
    with pytest.raises(ValueError, match=rf"expected activations \[\.\.\., {D_IN}\]"):
        sae.encode(torch.zeros(4, D_IN + 1))


def test_cpu_weights_stay_fp32_whatever_is_asked(gen):
    sae = build("jumprelu", gen).to("cpu", torch.bfloat16)
    assert sae.W_enc.dtype == torch.float32 and sae.threshold.dtype == torch.float32


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_watch_equals_encode_columns(gen, arch, apply_b_dec):
    sae = build(arch, gen, apply_b_dec=apply_b_dec)
    x = torch.randn(30, D_IN, generator=gen)
    feats = [5, 0, 95, 5]
    w = sae.watch(feats)
    assert len(w) == 4 and w.exact_subset
    assert max_abs(w(x), sae.encode(x)[:, feats]) <= 1e-5
    assert max_abs(w(x[:3]), sae.encode(x[:3])[:, feats]) <= 1e-5  # reusable across batches
    with pytest.raises(ValueError, match="out of range"):
        sae.watch([D_SAE])


def test_topk_refusals_and_watch_fallback(gen):
    sae = build("topk", gen)
    x = torch.randn(10, D_IN, generator=gen)
    with pytest.raises(ValueError, match="depends on every other feature"):
        sae.encode_subset(x, [1])
    with pytest.raises(ValueError, match="TopK"):
        sae.clamp_params(1)
    w = sae.watch([1, 2, 3])
    assert not w.exact_subset
    assert torch.equal(w(x), sae.encode(x)[:, [1, 2, 3]])
    values, indices = sae.encode_top(x, 10)  # more than k: the rest are zeros
    assert values.shape == (10, 10) and bool((values[:, 6:] == 0).all())
    assert max_abs(values[:, :6], sae.encode_top(x, 6)[0]) == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("normalize", ["none", "layer_norm", "constant_norm_rescale"])
def test_clamp_semantics(gen, arch, normalize):
    """Suppression (c = 0) leaves tokens where the feature did not fire exactly unchanged;
    clamping to the current value changes nothing; the edit is along the decoder row."""
    sae = build(arch, gen, normalize=normalize)
    x = torch.randn(64, D_IN, generator=gen) * 2
    f = sae.encode(x)
    i = int(((f > 0).sum(0) - 32).abs().argmin())  # a feature that fires on some tokens only
    fired = f[:, i] > 0
    assert 0 < int(fired.sum()) < 64
    out = sae.clamp(x, i, 0.0)
    assert torch.equal(out[~fired], x[~fired])
    assert not torch.equal(out[fired], x[fired])
    j = int(fired.nonzero()[0])
    assert max_abs(sae.clamp(x[j : j + 1], i, float(f[j, i])), x[j : j + 1]) <= 1e-5
    multi = sae.clamp(x, [i, 3], [0.0, 0.0])
    assert multi.shape == x.shape


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_clamp_params_reproduce_clamp(gen, arch, apply_b_dec):
    sae = build(arch, gen, apply_b_dec=apply_b_dec)
    x = torch.randn(50, D_IN, generator=gen) * 2
    for i in (0, 17, 95):
        p = sae.clamp_params(i)
        assert isinstance(p, ClampParams) and p.feature == i
        assert p.encoder.dtype == torch.float32 and p.decoder.dtype == torch.float32
        assert p.encoder.device.type == "cpu" and p.encoder.shape == (D_IN,)
        assert (p.gate_encoder is not None) == (arch == "gated")
        assert max_abs(p.activation(x), sae.encode(x)[:, i]) <= 1e-5
        for value in (0.0, 2.5):
            assert max_abs(p.apply(x, value), sae.clamp(x, i, value)) <= 1e-5


def test_clamp_params_fold_scalar_scaling(tmp_path, gen):
    """A folded expected_average_only_in SAE gives plugin data that needs no scaling step."""
    from safetensors.torch import save_file
    import json

    sae = build("jumprelu", gen)
    save_file({"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, "threshold": sae.threshold},
              str(tmp_path / "sae_weights.safetensors"))  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE,
        "normalize_activations": "expected_average_only_in", "sae_lens_version": "6.0.0"}))  # fmt: skip
    from monitor.encode import load_sae

    scaled = load_sae(tmp_path, norm_scaling_factor=0.25)
    x = torch.randn(40, D_IN, generator=gen) * 8
    assert max_abs(scaled.encode(x), sae.encode(x * 0.25)) <= 1e-5
    p = scaled.clamp_params(4)
    assert max_abs(p.apply(x, 0.0), scaled.clamp(x, 4, 0.0)) <= 1e-5


@pytest.mark.parametrize("normalize", ["layer_norm", "constant_norm_rescale"])
def test_per_token_normalisation_refusals(gen, normalize):
    sae = build("jumprelu", gen, normalize=normalize)
    with pytest.raises(ValueError, match="per token"):
        sae.clamp_params(0)
    f = sae.encode(torch.randn(4, D_IN, generator=gen))
    with pytest.raises(ValueError, match="needs the inputs x"):
        sae.decode(f)


def test_encode_top_matches_dense(gen):
    sae = build("jumprelu", gen)
    x = torch.randn(20, D_IN, generator=gen)
    values, indices = sae.encode_top(x, 7)
    dense = sae.encode(x)
    assert torch.equal(dense.gather(1, indices.long()), values)
    assert bool((values[:, :-1] >= values[:, 1:]).all())
    with pytest.raises(ValueError):
        sae.encode_top(x, 0)


def test_encode_subset_keeps_a_few_gathered_sets(gen):
    sae = build("jumprelu", gen)
    x = torch.randn(12, D_IN, generator=gen)
    dense = sae.encode(x)
    for k in range(10):
        feats = [k, k + 10, 3 * k]
        assert max_abs(sae.encode_subset(x, feats), dense[:, feats]) <= 1e-5
    assert len(sae._subset_cache) == sae._SUBSET_CACHE
    assert max_abs(sae.encode_subset(x, 5), dense[:, [5]]) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_path_as_on_cuda(monkeypatch, gen, arch):
    """The CUDA code path (bf16 weights, fp32 thresholds and outputs) run on CPU: dtype
    promotions hold and results stay within bf16 rounding of the fp32 SAE."""
    x = torch.randn(40, D_IN, generator=gen)
    from monitor.encode import sae as sae_module

    monkeypatch.setattr(sae_module, "compute_dtype", lambda device, dtype: torch.bfloat16)
    half = build(arch, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    ref = build(arch, torch.Generator().manual_seed(0))
    assert half.W_enc.dtype == torch.bfloat16 and ref.W_enc.dtype == torch.float32
    if arch == "jumprelu":
        assert half.threshold.dtype == torch.float32
    f = half.encode(x)
    assert f.dtype == torch.float32
    close = (f - ref.encode(x)).abs() <= 0.05
    assert close.float().mean() > 0.97  # features near a threshold may flip under bf16
    assert half.decode(f).dtype == torch.float32
    assert half.clamp(x, 3, 0.0).dtype == torch.float32
    assert half.watch([1, 2])(x).dtype == torch.float32
    if arch != "topk":
        p = half.clamp_params(3)
        assert p.encoder.dtype == torch.float32 and p.encoder.device.type == "cpu"
        assert float((p.apply(x, 0.0) - half.clamp(x, 3, 0.0)).abs().max()) <= 0.05
