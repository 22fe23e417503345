"""Aggregation of per-token values over a request: last, mean, max, ema_max, count.

``RunningAggregate`` is the streaming form the sidecar keeps per request (tokens arrive in
order, a few at a time); ``aggregate`` is the same computation over a whole sequence, so the
two can never disagree. Values are [T] (one signal) or [T, C] (C signals: features, probes).

- last: the value of the latest in-scope token
- mean: the mean over in-scope tokens
- max: the maximum
- ema_max: the maximum over tokens of e_t = α·v_t + (1 − α)·e_{t−1}, e_0 = v_0
- count: the number of in-scope tokens with value > k_threshold ("above", as rules say)

Scope picks tokens by their prompt/generated flag. With no in-scope tokens yet the value is
NaN (count: 0).
"""

from __future__ import annotations

import functools

import torch

AGGREGATIONS = ("last", "mean", "max", "ema_max", "count")
SCOPES = ("prompt", "generated", "all")
_EMA_BLOCK = 64


@functools.lru_cache(maxsize=16)
def _ema_operator(alpha: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block form of the EMA recurrence: E = A·V + q·e_prev with A[t, s] = α(1−α)^(t−s), s ≤ t."""
    t = torch.arange(n, dtype=torch.float64)
    lag = t[:, None] - t[None, :]
    A = torch.where(lag >= 0, alpha * (1 - alpha) ** lag.clamp(min=0), torch.zeros(()))
    q = (1 - alpha) ** (t + 1)
    return A, q


class RunningAggregate:
    """Streaming aggregate of one request's values; ``update`` takes its next tokens in order."""

    def __init__(self, how: str, alpha: float = 0.5, k_threshold: float = 0.0, scope: str = "all"):
        if how not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
        if how == "ema_max" and not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.how = how
        self.alpha = float(alpha)
        self.k_threshold = float(k_threshold)
        self.scope = scope
        self.reset()

    def reset(self) -> None:
        self.n_tokens = 0
        self._shape: torch.Size | None = None
        self._state: torch.Tensor | None = None  # last / sum / max / count
        self._ema: torch.Tensor | None = None

    def _select(self, values: torch.Tensor, generated) -> torch.Tensor:
        if self.scope == "all":
            return values
        if generated is None:
            raise ValueError(f"scope {self.scope!r} needs the tokens' generated flags")
        g = torch.as_tensor(generated, dtype=torch.bool)
        if g.dim() == 0:
            keep = bool(g) == (self.scope == "generated")
            return values if keep else values[:0]
        if g.shape[0] != values.shape[0]:
            raise ValueError(f"{g.shape[0]} generated flags for {values.shape[0]} tokens")
        mask = g if self.scope == "generated" else ~g
        return values[mask.to(values.device)]

    def update(self, values: torch.Tensor, generated: torch.Tensor | bool | None = None) -> RunningAggregate:
        """Feed the request's next tokens: values [T] or [T, C]; generated bool [T] or one bool."""
        v = torch.as_tensor(values)
        if v.dim() == 0:
            v = v.reshape(1)
        if self._shape is None:
            self._shape = v.shape[1:]
        elif v.shape[1:] != self._shape:
            raise ValueError(f"values shape {tuple(v.shape[1:])} changed from {tuple(self._shape)}")
        v = self._select(v, generated).detach().to("cpu", torch.float64)
        if v.shape[0] == 0:
            return self
        self.n_tokens += v.shape[0]
        how, s = self.how, self._state
        if how == "last":
            self._state = v[-1].clone()
        elif how == "mean":
            self._state = v.sum(0) if s is None else s + v.sum(0)
        elif how == "max":
            self._state = v.amax(0) if s is None else torch.maximum(s, v.amax(0))
        elif how == "count":
            c = (v > self.k_threshold).sum(0)
            self._state = c if s is None else s + c
        else:
            self._update_ema(v)
        return self

    def _update_ema(self, v: torch.Tensor) -> None:
        a = self.alpha
        if self._ema is None:  # e_0 = v_0
            self._ema = v[0].clone()
            self._state = v[0].clone()
            v = v[1:]
        for start in range(0, v.shape[0], _EMA_BLOCK):
            block = v[start : start + _EMA_BLOCK]
            n = block.shape[0]
            if n == 1:  # decode steps: one token at a time
                e = a * block[0] + (1 - a) * self._ema
                self._ema, self._state = e, torch.maximum(self._state, e)
                continue
            A, q = _ema_operator(a, n)
            E = torch.tensordot(A, block, dims=1) + q.reshape((n,) + (1,) * (block.dim() - 1)) * self._ema
            self._ema = E[-1].clone()
            self._state = torch.maximum(self._state, E.amax(0))

    @property
    def value(self) -> torch.Tensor:
        """The aggregate: float32 of shape [] or [C]; NaN before any in-scope token (count: 0)."""
        shape = self._shape if self._shape is not None else torch.Size([])
        if self._state is None:
            fill = 0.0 if self.how == "count" else float("nan")
            return torch.full(shape, fill, dtype=torch.float32)
        if self.how == "mean":
            return (self._state / self.n_tokens).float()
        return self._state.float()


def aggregate(
    values: torch.Tensor,
    how: str,
    *,
    alpha: float = 0.5,
    k_threshold: float = 0.0,
    scope: str = "all",
    generated: torch.Tensor | bool | None = None,
) -> torch.Tensor:
    """Aggregate a whole request's values [T] or [T, C] over its tokens (see module doc)."""
    return RunningAggregate(how, alpha=alpha, k_threshold=k_threshold, scope=scope).update(values, generated).value
