"""Detection metrics and probes of the demo build: AUROC, thresholds at a target FPR, logistic probes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch



def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_columns(scores: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``scores [N, M]``."""
    s = scores.numpy()
    return np.array([auroc(s[:, j], labels) for j in range(s.shape[1])])


def threshold_at_fpr(benign_scores: np.ndarray, fpr: float) -> float:
    """A threshold t with P(score >= t | benign) <= fpr (just above the benign quantile)."""
    q = np.quantile(np.asarray(benign_scores, dtype=np.float32), 1.0 - fpr, method="higher")
    return float(np.nextafter(np.float32(q), np.float32(np.inf)))


def train_probe(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                l2: float = 1e-3, iters: int = 200) -> tuple[torch.Tensor, float]:
    """Class-balanced L2 logistic regression on standardised inputs (full-batch L-BFGS)."""
    xs = (x - mean) / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos = y.float().mean().clamp(1e-6, 1 - 1e-6)
    wt = torch.where(y, 0.5 / pos, 0.5 / (1 - pos))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        logits = xs @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y.float(), reduction="none") * wt).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


def load_demo_probes(path: str | Path):
    """The engine's probe bank (``monitor.encode.load_probes``): what the sidecar serves."""
    from monitor.encode import load_probes

    return load_probes(str(path))


