import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from monitor.author.stats import above_at_fpr, allowed_fires, auroc, needed, probe_threshold_at_fpr


def test_auroc_per_column_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1.0, 1.0, (30, 5)), 1)
    neg = np.round(rng.normal(0.0, 1.0, (50, 5)), 1)
    pos[:, 4] = 0.0  # all tied with part of the negatives
    neg[:10, 4] = 0.0
    got = auroc(pos, neg)
    for f in range(5):
        y = np.r_[np.ones(30), np.zeros(50)]
        assert abs(got[f] - roc_auc_score(y, np.r_[pos[:, f], neg[:, f]])) < 1e-12


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32) | st.just(float("nan")), min_size=1, max_size=300),
       st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.5]))
def test_threshold_fires_on_at_most_the_target_and_is_tight(values, fpr):
    v = np.array(values, dtype=np.float32)
    m = allowed_fires(len(v), fpr)
    above = above_at_fpr(v, fpr)
    finite = v[~np.isnan(v)]
    if finite.size == 0:
        assert np.isnan(above)
        return
    assert (finite > above).sum() <= m
    # tight: the next lower benign value would let more than m fire, unless all may fire
    lower = finite[finite < above]
    if lower.size:
        assert (finite > lower.max()).sum() > m
    t = probe_threshold_at_fpr(v, fpr)
    assert (finite >= np.float32(t)).sum() <= m and (finite > np.float32(t)).sum() <= m


def test_needed_is_one_unit_at_the_target():
    assert needed(0.01) == 100 and needed(0.05) == 20 and needed(0.003) == 334
    assert allowed_fires(100, 0.01) == 1 and allowed_fires(99, 0.01) == 0
