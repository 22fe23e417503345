"""Aggregation over a request's tokens: batch and streaming agree with a plain loop, by scope."""

from __future__ import annotations

import math

import pytest
import torch

from monitor.encode import RunningAggregate, aggregate


def loop_reference(values: list[list[float]], how: str, alpha: float, k: float) -> list[float]:
    """Token by token, channel by channel, as the definitions read."""
    out = []
    for c in range(len(values[0])):
        col = [row[c] for row in values]
        if how == "last":
            out.append(col[-1])
        elif how == "mean":
            out.append(sum(col) / len(col))
        elif how == "max":
            out.append(max(col))
        elif how == "count":
            out.append(float(sum(v > k for v in col)))
        else:
            e, best = col[0], col[0]
            for v in col[1:]:
                e = alpha * v + (1 - alpha) * e
                best = max(best, e)
            out.append(best)
    return out


HOWS = ["last", "mean", "max", "ema_max", "count"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("T", [1, 2, 65, 300])
def test_batch_matches_loop(gen, how, T):
    v = torch.randn(T, 4, generator=gen)
    got = aggregate(v, how, alpha=0.3, k_threshold=0.5)
    ref = torch.tensor(loop_reference(v.tolist(), how, 0.3, 0.5))
    assert got.shape == (4,) and got.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("how", HOWS)
def test_streaming_equals_batch_for_any_chunking(gen, how):
    v = torch.randn(257, 3, generator=gen)
    whole = aggregate(v, how, alpha=0.2, k_threshold=0.1)
    cuts = sorted(torch.randint(1, 257, (12,), generator=gen).tolist())
    run = RunningAggregate(how, alpha=0.2, k_threshold=0.1)
    for a, b in zip([0, *cuts], [*cuts, 257]):
        run.update(v[a:b])  # prefill chunks, then decode steps of one token
    assert run.n_tokens == 257
    assert float((run.value - whole).abs().max()) <= 1e-5


def test_one_dimensional_values():
    assert float(aggregate(torch.tensor([1.0, 3.0, 2.0]), "max")) == 3.0
    r = RunningAggregate("count", k_threshold=1.5)
    for v in (1.0, 2.0, 3.0):
        r.update(torch.tensor(v))
    assert r.value.shape == () and float(r.value) == 2.0


def test_ema_starts_at_first_value():
    v = torch.tensor([4.0, 0.0, 0.0])
    # e = 4, 2, 1 -> max 4; a later burst must build up through the EMA
    assert float(aggregate(v, "ema_max", alpha=0.5)) == 4.0
    burst = torch.tensor([0.0, 10.0, 0.0])
    assert float(aggregate(burst, "ema_max", alpha=0.5)) == 5.0


def test_scope_selects_tokens(gen):
    v = torch.tensor([[9.0], [1.0], [2.0], [3.0]])
    generated = torch.tensor([False, True, True, True])
    assert float(aggregate(v, "max", scope="prompt", generated=generated)) == 9.0
    assert float(aggregate(v, "max", scope="generated", generated=generated)) == 3.0
    assert float(aggregate(v, "mean", scope="generated", generated=generated)) == 2.0
    assert float(aggregate(v, "max", scope="all")) == 9.0
    run = RunningAggregate("count", k_threshold=1.5, scope="generated")
    run.update(v[:1], generated=False).update(v[1:3], generated=True).update(v[3:], generated=torch.tensor([True]))
    assert float(run.value) == 2.0 and run.n_tokens == 3


def test_empty_scope_is_nan_or_zero():
    v = torch.ones(3, 2)
    assert torch.isnan(aggregate(v, "max", scope="generated", generated=False)).all()
    assert aggregate(v, "count", scope="generated", generated=False).tolist() == [0.0, 0.0]
    assert math.isnan(float(RunningAggregate("mean").value))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown aggregation"):
        RunningAggregate("median")
    with pytest.raises(ValueError, match="unknown scope"):
        RunningAggregate("max", scope="assistant")
    with pytest.raises(ValueError, match="alpha"):
        RunningAggregate("ema_max", alpha=0.0)
    with pytest.raises(ValueError, match="needs the tokens' generated flags"):
        aggregate(torch.ones(3), "max", scope="prompt")
    with pytest.raises(ValueError, match="3 generated flags for 2 tokens"):
        aggregate(torch.ones(2), "max", scope="prompt", generated=torch.tensor([True, False, True]))
    r = RunningAggregate("max").update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="changed"):
        r.update(torch.ones(2, 4))
