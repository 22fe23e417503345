"""Rank SAE features by how well each separates two sets of recorded requests.

Each request is summarised per feature by its largest activation over the chosen tokens (a
``window: token`` rule fires on a request exactly when that maximum is above its threshold);
features are ranked by the AUROC of that maximum, positive set against negative set, then by the
gap between their firing rates (share of requests where the feature is active on any chosen
token). ``above@fpr`` is the threshold a rule would need to fire on at most ``fpr`` of the
negative requests, and ``tpr@fpr`` the share of positive requests it still catches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from monitor.author.errors import AuthorError
from monitor.author.stats import above_at_fpr, auroc

SCOPES = ("generated", "prompt", "all")


def scope_mask(generated: np.ndarray, scope: str) -> np.ndarray:
    generated = np.asarray(generated, dtype=bool)
    if scope == "all":
        return np.ones_like(generated)
    return generated if scope == "generated" else ~generated


@torch.no_grad()
def request_maxima(sae, requests, layer: int, scope: str, wanted: set[str], progress=None) -> tuple[list[str], np.ndarray]:
    """``(request ids, [R, d_sae])``: each wanted request's per-feature maximum over its in-scope
    finite tokens (requests with none are left out)."""
    ids, rows = [], []
    for r in requests:
        if r.request_id not in wanted:
            continue
        if progress is not None:
            progress(1)
        x = r.activations[layer].float()[torch.from_numpy(scope_mask(r.generated, scope))]
        x = x[torch.isfinite(x).all(dim=1)]
        if x.shape[0] == 0:
            continue
        rows.append(sae.encode(x).amax(dim=0).numpy())
        ids.append(r.request_id)
    return ids, (np.stack(rows) if rows else np.zeros((0, sae.d_sae), np.float32))


@dataclass
class FeatureScore:
    feature: int
    auroc: float
    rate_positive: float
    rate_negative: float
    mean_positive: float
    mean_negative: float
    above_at_fpr: float
    tpr_at_fpr: float


def rank(pos: np.ndarray, neg: np.ndarray, top: int = 20, fpr: float = 0.01) -> list[FeatureScore]:
    """The ``top`` features by AUROC (then firing-rate gap) from per-request maxima."""
    if len(pos) == 0 or len(neg) == 0:
        raise AuthorError(f"both sets need requests with tokens in scope: positive {len(pos)}, negative {len(neg)}")
    scores = auroc(pos, neg)
    rate_pos, rate_neg = (pos > 0).mean(axis=0), (neg > 0).mean(axis=0)
    order = np.lexsort((-(rate_pos - rate_neg), -scores))[:top]
    out = []
    for f in order.tolist():
        above = above_at_fpr(neg[:, f], fpr)
        out.append(FeatureScore(int(f), float(scores[f]), float(rate_pos[f]), float(rate_neg[f]), float(pos[:, f].mean()),
                                float(neg[:, f].mean()), above, float((pos[:, f] > above).mean())))
    return out


def as_json(scores: list[FeatureScore]) -> list[dict]:
    return [asdict(s) for s in scores]
