"""Logistic probes on recorded activations, written as the project's probe-bank file.

Training examples are always tokens, because the sidecar scores every token with the bank. What
a token's label is depends on ``per``:

- ``per="token"`` (regex labels): a token is positive when its characters overlap a match of
  the probe's regex in the generated text; every other in-scope token is negative. Metrics and
  the threshold are per token (benign tokens: those of requests with no match).
- ``per="request"`` (label files; regexes too): every in-scope token of a positive request is
  positive, every in-scope token of a negative request negative (what a request label can say);
  metrics and the threshold are per request, a request scoring the largest probability over its
  in-scope tokens — exactly when a ``window: token`` rule on the probe fires.

Requests are split into training and held-out parts (never a request on both sides). On the
training part: standardisation (``mean``/``scale``; constant dimensions get scale 1), an
L2 logistic regression (scikit-learn, balanced class weights), and Platt scaling fitted on
out-of-fold logits (folds grouped by request) so calibration is not fitted on memorised tokens.
The threshold is set on the held-out benign units at the target FPR with the probabilities as the
sidecar computes them (the written bank's float32 ``score``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from monitor.author.compare import scope_mask
from monitor.author.errors import AuthorError
from monitor.author.stats import auroc, needed, probe_threshold_at_fpr


@dataclass
class Example:
    """One labelled request: its in-scope finite tokens and their labels for every probe."""

    request_id: str
    x: torch.Tensor  # [n, d] float32
    token_labels: np.ndarray  # [n, P] bool (per-token labels, when known)
    request_labels: np.ndarray  # [P] bool


def gather(requests, layer: int, scope: str, labels_of, progress=None) -> list[Example]:
    """Examples for requests ``labels_of(request, in_scope_mask) -> (token_labels [n,P], request_labels [P])``
    says something about (None: unlabelled, left out)."""
    out = []
    for r in requests:
        if progress is not None:
            progress(1)
        mask = scope_mask(r.generated, scope)
        got = labels_of(r, mask)
        if got is None:
            continue
        token_labels, request_labels = got
        x = r.activations[layer].float()[torch.from_numpy(mask)]
        finite = torch.isfinite(x).all(dim=1).numpy()
        if not finite.any():
            continue
        out.append(Example(r.request_id, x[torch.from_numpy(finite)], np.asarray(token_labels, bool)[finite],
                           np.asarray(request_labels, bool)))
    return out


@dataclass
class ProbeReport:
    name: str
    train_requests: int
    heldout_requests: int
    heldout_positive: int
    threshold: float
    auroc: float  # held-out, in the unit of `per`
    tpr: float  # held-out positives at/above the threshold, in the unit of `per`
    fpr: float  # held-out benign units at/above the threshold
    benign_units: int
    request_auroc: float
    request_tpr: float
    request_fpr: float
    warnings: list = field(default_factory=list)


def train(examples: list[Example], names: list[str], layer: int, out: str | Path, *, per: str = "request",
          fpr: float = 0.01, holdout: float = 0.3, seed: int = 0, C: float = 1.0, progress=None) -> list[ProbeReport]:
    """Fit one probe per name, write the bank to ``out`` and report held-out quality."""
    from sklearn.model_selection import train_test_split

    from monitor.encode import load_probes, save_probes

    if per not in ("token", "request"):
        raise AuthorError(f"--per must be token or request, got {per!r}")
    if not 0 < holdout < 1:
        raise AuthorError(f"--holdout must lie strictly between 0 and 1, got {holdout}")
    if not 0 < fpr < 1:
        raise AuthorError(f"--fpr must lie strictly between 0 and 1, got {fpr}")
    P = len(names)
    req_y = np.stack([e.request_labels for e in examples]) if examples else np.zeros((0, P), bool)
    for p, name in enumerate(names):
        n_pos = int(req_y[:, p].sum())
        if n_pos < 4 or len(examples) - n_pos < 4:
            raise AuthorError(f"probe {name!r}: {n_pos} positive and {len(examples) - n_pos} negative labelled requests; "
                              f"at least 4 of each are needed to train and hold out")
    strat = [_key(e.request_labels) for e in examples]
    counts = {k: strat.count(k) for k in set(strat)}
    stratify = strat if min(counts.values()) >= 2 else None
    idx = np.arange(len(examples))
    train_idx, test_idx = train_test_split(idx, test_size=holdout, random_state=seed, stratify=stratify)
    tr = [examples[i] for i in sorted(train_idx)]
    te = [examples[i] for i in sorted(test_idx)]

    x_tr = torch.cat([e.x for e in tr]).double().numpy()
    groups = np.concatenate([np.full(len(e.x), i) for i, e in enumerate(tr)])
    mean = x_tr.mean(axis=0)
    scale = x_tr.std(axis=0)
    scale[~(scale > 1e-6 * max(1.0, float(np.abs(mean).max(initial=0.0))))] = 1.0
    z_tr = (x_tr - mean) / scale
    weights, biases, platt_a, platt_b = [], [], [], []
    for p, name in enumerate(names):
        y = _token_targets(tr, p, per)
        w, b, a, c = _fit_one(z_tr, y, groups, seed, C, name)
        weights.append(w)
        biases.append(b)
        platt_a.append(a)
        platt_b.append(c)
        if progress is not None:
            progress(1)
    as_t = lambda v: torch.tensor(np.asarray(v), dtype=torch.float32)  # noqa: E731
    kwargs = dict(names=list(names), layer=layer, mean=as_t(mean), scale=as_t(scale), platt_a=as_t(platt_a),
                  platt_b=as_t(platt_b))
    path = Path(out)
    save_probes(path, as_t(weights), as_t(biases), **kwargs)
    bank = load_probes(path)  # the sidecar's arithmetic from here on
    scores = [bank.score(e.x).numpy() for e in te]
    reports, thresholds = [], []
    for p, name in enumerate(names):
        rep = _evaluate(name, p, te, scores, per, fpr)
        rep.train_requests, rep.heldout_requests = len(tr), len(te)
        reports.append(rep)
        thresholds.append(rep.threshold)
    save_probes(path, as_t(weights), as_t(biases), threshold=as_t(thresholds), **kwargs)
    return reports


def _key(labels: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in labels)


def _token_targets(examples: list[Example], p: int, per: str) -> np.ndarray:
    if per == "token":
        return np.concatenate([e.token_labels[:, p] for e in examples])
    return np.concatenate([np.full(len(e.x), bool(e.request_labels[p])) for e in examples])


def _fit_one(z: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, C: float, name: str):
    """Logistic weights/bias on standardised inputs and Platt (a, b) from out-of-fold logits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    if y.all() or not y.any():
        raise AuthorError(f"probe {name!r}: the training tokens are all {'positive' if y.all() else 'negative'}")
    pos_groups = len(np.unique(groups[y]))
    folds = max(2, min(5, pos_groups, len(np.unique(groups[~y]))))
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=2000)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        logits = cross_val_predict(model, z, y, groups=groups, cv=cv, method="decision_function")
    except ValueError as exc:
        raise AuthorError(f"probe {name!r}: cannot cross-validate the calibration ({' '.join(str(exc).split())[:200]})") from None
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(logits.reshape(-1, 1), y)
    model.fit(z, y)
    return (model.coef_[0], float(model.intercept_[0]), float(platt.coef_[0, 0]), float(platt.intercept_[0]))


def _evaluate(name: str, p: int, te: list[Example], scores: list[np.ndarray], per: str, fpr: float) -> ProbeReport:
    req_pos = np.array([e.request_labels[p] for e in te], dtype=bool)
    req_score = np.array([s[:, p].max() for s in scores], dtype=np.float32)
    if per == "token":
        benign = np.concatenate([s[:, p] for s, e in zip(scores, te) if not e.request_labels[p]] or [np.zeros(0, np.float32)])
        pos = np.concatenate([s[:, p][e.token_labels[:, p]] for s, e in zip(scores, te)] or [np.zeros(0, np.float32)])
    else:
        benign, pos = req_score[~req_pos], req_score[req_pos]
    warnings = []
    if benign.size == 0 or pos.size == 0:
        raise AuthorError(f"probe {name!r}: the held-out part has {pos.size} positive and {benign.size} benign "
                          f"{per}s; record more labelled traffic or raise --holdout")
    threshold = probe_threshold_at_fpr(benign, fpr)
    if benign.size < needed(fpr):
        warnings.append(f"{benign.size} benign held-out {per}s: a {fpr:.2%} target needs {needed(fpr)}; the threshold "
                        f"is the strictest the data allow (above every benign {per} but ⌊{fpr}·n⌋)")
    return ProbeReport(
        name=name, train_requests=0, heldout_requests=0, heldout_positive=int(req_pos.sum()), threshold=threshold,
        auroc=float(auroc(pos, benign)), tpr=float((pos >= threshold).mean()), fpr=float((benign >= threshold).mean()),
        benign_units=int(benign.size), request_auroc=float(auroc(req_score[req_pos], req_score[~req_pos])),
        request_tpr=float((req_score[req_pos] >= threshold).mean()) if req_pos.any() else math.nan,
        request_fpr=float((req_score[~req_pos] >= threshold).mean()) if (~req_pos).any() else math.nan,
        warnings=warnings)


def as_json(reports: list[ProbeReport]) -> list[dict]:
    return [asdict(r) for r in reports]
