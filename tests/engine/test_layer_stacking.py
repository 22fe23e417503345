"""One product per layer: stacked SAE watches and probe banks give what each gives alone."""

from __future__ import annotations

import pytest
import torch

from monitor.encode import ProbeBank
from monitor.encode.stage import LayerSignals, SignalKey

from .conftest import D_IN, max_abs
from .test_sae_api import build


def bank(gen, calibrated: bool) -> ProbeBank:
    extra = {"platt_a": torch.tensor([1.5, 0.7]), "platt_b": torch.tensor([-0.2, 0.3])} if calibrated else {}
    return ProbeBank(torch.randn(2, D_IN, generator=gen), torch.randn(2, generator=gen), names=["p", "q"], layer=0,
                     mean=torch.randn(D_IN, generator=gen), scale=torch.rand(D_IN, generator=gen) + 0.5, **extra)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("calibrated", [True, False])
def test_stacked_layer_equals_each_encoder_alone(gen, arch, apply_b_dec, calibrated):
    sae, other, probes = build(arch, gen, apply_b_dec=apply_b_dec), build("jumprelu", gen), bank(gen, calibrated)
    plan = LayerSignals(0)
    plan.add(sae.watch([5, 0, 95]), [SignalKey("a", feature=f) for f in (5, 0, 95)])
    plan.add(probes, [SignalKey("p", probe=n) for n in probes.names])
    plan.add(other.watch([7]), [SignalKey("b", feature=7)])
    assert plan.stacked
    x = torch.randn(40, D_IN, generator=gen)
    expected = torch.cat([sae.encode(x)[:, [5, 0, 95]], probes.score(x), other.encode(x)[:, [7]]], dim=1)
    got = torch.from_numpy(plan.compute(x))
    assert got.shape == (40, 6)
    assert max_abs(got, expected) < 1e-4
    assert (got[:, :3] > 0).any() and (got[:, :3] == 0).any()  # both sides of the activation were exercised


@pytest.mark.parametrize("arch,normalize", [("topk", "none"), ("jumprelu", "layer_norm"), ("standard", "constant_norm_rescale")])
def test_layers_that_cannot_stack_are_computed_per_encoder(gen, arch, normalize):
    sae, probes = build(arch, gen, normalize=normalize), bank(gen, True)
    plan = LayerSignals(0)
    plan.add(sae.watch([1, 2]), [SignalKey("a", feature=f) for f in (1, 2)])
    plan.add(probes, [SignalKey("p", probe=n) for n in probes.names])
    assert not plan.stacked
    x = torch.randn(20, D_IN, generator=gen)
    expected = torch.cat([sae.encode(x)[:, [1, 2]], probes.score(x)], dim=1)
    assert max_abs(torch.from_numpy(plan.compute(x)), expected) < 1e-5
