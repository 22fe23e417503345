"""Value checks for every number a weights or probe file brings in.

A NaN or inf weight, or one so large that a product with a real activation overflows, turns
feature activations, probe scores and the plugin's steering arithmetic into NaN/inf. Such a
file is refused at load, with the file, the tensor and how many entries are wrong.

Bound: ``MAX_MAGNITUDE = 1e20``. Real SAE and probe weights are below ~1e4; an activation
row has |x_i| below ~1e6 and d below ~1e5 in any served model, so x·w stays below 1e31, far
inside float32's 3.4e38 (and bfloat16's, which has the same range). Anything larger is a
corrupt or mis-scaled file, not a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .errors import SAEFormatError, short

MAX_MAGNITUDE = 1e20


def tensor_problem(name: str, t: torch.Tensor, limit: float = MAX_MAGNITUDE) -> str | None:
    """Why a tensor cannot be served (non-finite entries, |v| > limit), or None."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    lo, hi = (float(v) for v in torch.aminmax(t))  # one pass, no copy; NaN propagates
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= limit:
        return None  # the common case: only a bad tensor pays for the counts below
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_bad = int(t.numel() - int(finite.sum()))
        n_nan = int(torch.isnan(t).sum())
        return (
            f"{name} contains NaN or inf: {n_bad} non-finite of {t.numel()} values "
            f"({n_nan} NaN, {n_bad - n_nan} inf)"
        )
    big = t.abs() > limit
    if bool(big.any()):
        peak = float(t.abs().max())
        return (
            f"{name} has {int(big.sum())} of {t.numel()} values beyond ±{limit:.0e} (largest "
            f"{peak:.3g}): a corrupt or mis-scaled file"
        )
    return None


def check_tensors(
    path: str | Path,
    tensors: dict[str, Any],
    *,
    error: type[SAEFormatError] = SAEFormatError,
    context: str = "",
) -> None:
    """Refuse the first tensor (in the given order) with a problem; non-tensors are skipped
    (the format's own checks report them)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            problem = tensor_problem(str(name), t)
            if problem is not None:
                raise error(path, problem + context)


def positive_factor(value: Any, where: str | Path, field: str) -> float:
    """A scaling factor: a finite JSON/Python number > 0 and within the magnitude bound
    (bools and strings are refused, not coerced)."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and 1 / MAX_MAGNITUDE <= float(value) <= MAX_MAGNITUDE
    )
    if not ok:
        raise SAEFormatError(
            where, f"{field}{' ' if field else ''}{short(value)} is not a positive number in "
            f"[{1 / MAX_MAGNITUDE:.0e}, {MAX_MAGNITUDE:.0e}]"
        )
    return float(value)


def config_int(value: Any, where: str | Path, field: str, *, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    """An integer config field (k, d_in, d_sae, …): a JSON integer (or an integral float, as
    some writers store k) within [minimum, maximum]; never NaN, inf, a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SAEFormatError(where, f"{field} {short(value)} is not an integer")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise SAEFormatError(where, f"{field} {short(value)} is not an integer")
    n = int(value)
    if not minimum <= n <= maximum:
        raise SAEFormatError(where, f"{field} {short(value)} is out of range [{minimum}, {maximum}]")
    return n
