"""BatchTopK training checkpoints with a scalar input scaling, against the real sae-lens package.

SAELens's trainer ends a run by folding the activation scaler into the SAE
(``fold_activation_norm_scaling_factor``, which for BatchTopK with decoder-norm rescaling also
divides ``topk_threshold`` by the factor) and then saves the inference model (a JumpReLU SAE).
A mid-training checkpoint instead carries ``cfg.json`` with ``expected_average_only_in`` and the
factor in ``activation_scaler.json``; loading it here must give what SAELens would serve.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from monitor.encode import JumpReLUSAE, load_sae  # noqa: E402

from .conftest import D_IN, D_SAE, max_abs  # noqa: E402
from .test_saelens_parity import N, check_parity, randomise  # noqa: E402

FACTOR = 0.37  # far from 1, so a missing or doubled fold shows


def _checkpoint_and_reference(tmp_path, gen, rescale: bool):
    """A mid-training BatchTopK checkpoint (trainer layout) and SAELens's own final SAE."""
    cfg = sae_lens.BatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=6.0, rescale_acts_by_decoder_norm=rescale,
        normalize_activations="expected_average_only_in",
    )  # fmt: skip
    tr = sae_lens.BatchTopKTrainingSAE(cfg)
    randomise(tr, gen)
    with torch.no_grad():
        tr.W_dec.mul_(torch.rand(D_SAE, 1, generator=gen) + 0.5)  # decoder norms far from 1
        tr.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    ckpt = tmp_path / "checkpoint"
    tr.save_model(ckpt)
    (ckpt / "activation_scaler.json").write_text(json.dumps({"scaling_factor": FACTOR, "has_whitening": False}))
    final = copy.deepcopy(tr)
    final.fold_activation_norm_scaling_factor(FACTOR)  # what SAETrainer.fit does at the end
    final.save_inference_model(tmp_path / "final")
    sl = sae_lens.SAE.load_from_disk(tmp_path / "final")
    assert sl.cfg.architecture() == "jumprelu"
    return ckpt, sl


@pytest.mark.parametrize("rescale", [True, False])
def test_batchtopk_checkpoint_with_activation_scaler(tmp_path, gen, rescale):
    ckpt, sl = _checkpoint_and_reference(tmp_path, gen, rescale)
    ours = load_sae(ckpt)
    assert isinstance(ours, JumpReLUSAE)
    assert ours.metadata["folded_norm_scaling_factor"] == FACTOR
    x = torch.randn(N, D_IN, generator=gen) * 2
    with torch.no_grad():
        ref = sl.encode(x)
    # Not merely proportional: equal (a fold in the wrong order gives exactly FACTOR× less).
    assert max_abs(ours.encode(x), ref) <= 1e-5
    assert float(ours.threshold[0]) == pytest.approx(float(sl.threshold.detach()[0]), rel=1e-7)
    check_parity(sl, ours, x, [0, 1, 2])


@pytest.mark.parametrize("how", ["argument", "cfg"])
def test_batchtopk_checkpoint_with_factor_given_otherwise(tmp_path, gen, how):
    """The same checkpoint with the factor from ``norm_scaling_factor=`` or ``cfg.json``."""
    ckpt, sl = _checkpoint_and_reference(tmp_path, gen, rescale=True)
    (ckpt / "activation_scaler.json").unlink()
    if how == "argument":
        ours = load_sae(ckpt, norm_scaling_factor=FACTOR)
    else:
        cfg = json.loads((ckpt / "cfg.json").read_text())
        (ckpt / "cfg.json").write_text(json.dumps({**cfg, "norm_scaling_factor": FACTOR}))
        ours = load_sae(ckpt)
    x = torch.randn(N, D_IN, generator=gen) * 2
    check_parity(sl, ours, x, [3, 4, 5])
