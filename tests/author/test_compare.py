import numpy as np

from monitor.author.compare import rank, request_maxima
from monitor.encode import load_sae
from tests.author.fakes import planted_requests
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction, write_saelens_jumprelu

D = 64


def test_rank_puts_the_separating_feature_first():
    rng = np.random.default_rng(1)
    neg = np.maximum(rng.normal(0, 1, (60, 20)), 0)
    pos = np.maximum(rng.normal(0, 1, (40, 20)), 0)
    pos[:, 7] += 5.0  # separates
    pos[:, 3] += 0.5  # weakly
    scores = rank(pos, neg, top=5, fpr=0.05)
    assert scores[0].feature == 7 and scores[0].auroc > 0.99
    assert scores[1].feature == 3
    s = scores[0]
    assert (neg[:, 7] > s.above_at_fpr).mean() <= 0.05 and s.tpr_at_fpr > 0.9


def test_request_maxima_find_the_planted_feature_in_the_generated_tokens(tmp_path):
    sae = load_sae(write_saelens_jumprelu(tmp_path / "sae", D))
    reqs = planted_requests(12, 20, D, planted_direction(D))
    pos_ids = {r.request_id for r in reqs if r.request_id.startswith("pos")}
    ids, maxima = request_maxima(sae, reqs, 1, "generated", pos_ids)
    assert sorted(ids) == sorted(pos_ids) and maxima.shape == (12, sae.d_sae)
    neg_ids = {r.request_id for r in reqs} - pos_ids
    _, neg = request_maxima(sae, reqs, 1, "generated", neg_ids)
    top = rank(maxima, neg, top=3)
    assert top[0].feature == PLANTED_FEATURE and top[0].auroc == 1.0
    assert top[0].rate_positive == 1.0 and top[0].rate_negative == 0.0
    # in the prompt nothing was planted: the feature does not separate there
    _, p_pos = request_maxima(sae, reqs, 1, "prompt", pos_ids)
    _, p_neg = request_maxima(sae, reqs, 1, "prompt", neg_ids)
    assert p_pos[:, PLANTED_FEATURE].max() == 0 and p_neg[:, PLANTED_FEATURE].max() == 0
