"""Scores of separation and thresholds at a target false-positive rate.

Every threshold here is for a detector that fires when a value is strictly **above** it (the
rules' ``above``) or at/above it (``ProbeBank.decide``): :func:`above_at_fpr` returns the rule
form, :func:`probe_threshold_at_fpr` the probe form, both exact on the values given.
"""

from __future__ import annotations

import math

import numpy as np


def auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of each column (``pos [n_pos, F]``, ``neg [n_neg, F]`` or 1-d): the probability that a
    positive scores above a negative, ties counting one half (Mann–Whitney U with average ranks).
    NaN where either side is empty."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    one = pos.ndim == 1
    if one:
        pos, neg = pos[:, None], neg[:, None]
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos == 0 or n_neg == 0:
        out = np.full(pos.shape[1], np.nan)
    else:
        ranks = rankdata(np.concatenate([pos, neg]), axis=0)
        u = ranks[:n_pos].sum(axis=0) - n_pos * (n_pos + 1) / 2.0
        out = u / (n_pos * n_neg)
    return out[0] if one else out


def allowed_fires(n: int, fpr: float) -> int:
    """How many of ``n`` benign units may fire at a target rate ``fpr``."""
    return int(math.floor(n * fpr + 1e-9))


def needed(fpr: float) -> int:
    """The fewest benign units at which a rate of ``fpr`` is one unit: below it, the target
    cannot be told apart from zero (every threshold that fires at all overshoots it)."""
    return int(math.ceil(1.0 / fpr - 1e-9))


def above_at_fpr(benign: np.ndarray, fpr: float) -> float:
    """The lowest ``above`` (one of the benign values) with ``#(benign > above) ≤ fpr·n``.

    NaN values (a request with nothing to fire on) never fire and are counted as benign units
    that stay quiet. All-NaN: ``-inf`` is not useful, so NaN is returned (the caller refuses)."""
    v = np.asarray(benign, dtype=np.float64)
    finite = np.sort(v[~np.isnan(v)])[::-1]
    if finite.size == 0:
        return float("nan")
    m = allowed_fires(v.size, fpr)
    if m >= finite.size:  # every unit may fire: the lowest value (nothing is strictly below it)
        return float(finite[-1])
    return float(finite[m])


def probe_threshold_at_fpr(benign: np.ndarray, fpr: float) -> float:
    """A float32 threshold ``t`` with ``#(benign ≥ t) ≤ fpr·n`` and ``#(benign > t) ≤ fpr·n``:
    the next float32 above :func:`above_at_fpr` (probabilities are float32 in the sidecar)."""
    a = above_at_fpr(np.asarray(benign, dtype=np.float32), fpr)
    if math.isnan(a):
        return a
    return float(np.nextafter(np.float32(a), np.float32(np.inf)))


def rate(mask: np.ndarray) -> float:
    mask = np.asarray(mask, dtype=bool)
    return float(mask.mean()) if mask.size else float("nan")


def precision_recall(fired: set, positive: set, universe: set) -> tuple[int, int, int, float, float]:
    """(tp, fp, fn, precision, recall) of ``fired`` against ``positive`` within ``universe``."""
    fired, positive = fired & universe, positive & universe
    tp, fp, fn = len(fired & positive), len(fired - positive), len(positive - fired)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return tp, fp, fn, precision, recall
