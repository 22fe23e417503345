import numpy as np
import pytest
import torch

from monitor.author.errors import AuthorError
from monitor.author.train import gather, train
from monitor.encode import load_probes
from tests.author.fakes import planted_requests
from tests.support.dictionaries import planted_direction

D = 64


def _planted_token_labels(r, mask, u):
    """Per-token truth of the planted requests: the tokens carrying the direction."""
    x = r.activations[1].numpy()[mask]
    tok = (x @ u) > 5.0
    return tok[:, None], np.array([tok.any()])


@pytest.mark.parametrize("per", ["request", "token"])
def test_trained_bank_loads_scores_as_fitted_and_separates_held_out(tmp_path, per):
    u = planted_direction(D)
    reqs = planted_requests(30, 60, D, u, seed=3)
    examples = gather(reqs, 1, "generated", lambda r, m: _planted_token_labels(r, m, u))
    out = tmp_path / "probes.safetensors"
    reports = train(examples, ["planted"], 1, out, per=per, fpr=0.05, holdout=0.3, seed=0)
    bank = load_probes(out)  # the sidecar's loader
    assert bank.names == ["planted"] and bank.layer == 1 and bank.d_in == D and bank.calibrated
    src = bank.source
    assert set(src) == {"weight", "bias", "mean", "scale", "platt_a", "platt_b", "threshold"}
    (rep,) = reports
    assert rep.train_requests + rep.heldout_requests == 90 and rep.heldout_requests == 27
    assert rep.auroc >= 0.99 and rep.request_auroc >= 0.99 and rep.tpr >= 0.9
    assert rep.fpr <= 0.05 and abs(float(bank.threshold[0]) - rep.threshold) == 0.0
    # the file's arithmetic is the documented one: sigmoid(a·(w·(x−mean)/scale + b) + pb)
    x = torch.cat([r.activations[1] for r in reqs[:5]])
    z = ((x - src["mean"]) / src["scale"]) @ src["weight"][0] + src["bias"][0]
    manual = torch.sigmoid(src["platt_a"][0] * z + src["platt_b"][0])
    assert torch.allclose(bank.score(x)[:, 0], manual, atol=1e-5)
    # calibrated: the planted tokens score high, noise tokens low
    planted = reqs[[r.request_id.startswith("pos") for r in reqs].index(True)]
    scores = bank.score(planted.activations[1])[:, 0]
    hot = (planted.activations[1].numpy() @ u) > 5.0
    assert scores[torch.from_numpy(hot)].min() > 0.5 and scores[torch.from_numpy(~hot)].max() < 0.5


def test_held_out_split_is_by_request_and_reproducible(tmp_path):
    u = planted_direction(D)
    examples = gather(planted_requests(20, 20, D, u, seed=4), 1, "generated", lambda r, m: _planted_token_labels(r, m, u))
    a = train(examples, ["planted"], 1, tmp_path / "a.safetensors", seed=7)
    b = train(examples, ["planted"], 1, tmp_path / "b.safetensors", seed=7)
    assert a == b
    sa, sb = load_probes(tmp_path / "a.safetensors").source, load_probes(tmp_path / "b.safetensors").source
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train(examples, ["planted"], 1, tmp_path / "c.safetensors", seed=8)
    assert c != a  # another split


def test_too_few_labelled_requests_is_refused(tmp_path):
    u = planted_direction(D)
    examples = gather(planted_requests(2, 20, D, u), 1, "generated", lambda r, m: _planted_token_labels(r, m, u))
    with pytest.raises(AuthorError, match="2 positive and 20 negative"):
        train(examples, ["planted"], 1, tmp_path / "p.safetensors")
