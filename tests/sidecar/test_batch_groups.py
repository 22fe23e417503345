"""Adaptive batching: a group of one stream's queued batches evaluates exactly as the batches do
one by one (same verdicts at the same positions, same per-request windows)."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.config import SidecarConfig
from monitor.receive.batch import BatchGroup, decode_batch
from monitor.receive.wire import parse_plugin_message
from monitor.sidecar import Sidecar
from tests.support.dictionaries import planted_direction
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import fixture_config

D = 64
RULES = """rules:
  - {name: token, signal: {source: sae, feature: 3}, above: 2.0}
  - {name: count3, signal: {source: sae, feature: 3}, above: 2.0, window: {kind: count, n: 3}}
  - {name: ema, signal: {source: probes, probe: planted}, above: 0.6, window: {kind: ema, alpha: 0.3}}
  - {name: generated_only, signal: {source: sae, feature: 3}, above: 2.0, scope: generated}
"""


def _batches(seed: int, steps: int = 24):
    """Decode-like steps over 5 requests, some re-sent tokens (dedupe), planted tokens at random."""
    rng = np.random.default_rng(seed)
    u = planted_direction(D)
    next_pos = {f"r{i}": 0 for i in range(5)}
    out = []
    for step in range(steps):
        rids = sorted(rng.choice(list(next_pos), size=rng.integers(1, 5), replace=False).tolist())
        token_request, positions = [], []
        for k, rid in enumerate(rids):
            n = int(rng.integers(1, 4))
            start = next_pos[rid] - (1 if next_pos[rid] and rng.random() < 0.3 else 0)  # sometimes re-sent
            token_request += [k] * n
            positions += list(range(start, start + n))
            next_pos[rid] = start + n
        x = (rng.standard_normal((1, len(positions), D)) * 0.05).astype(np.float32)
        x[0, rng.random(len(positions)) < 0.3] += 10 * u
        generated = (np.array(positions) >= 2).tolist()
        raw = PluginClient.encoded_batch(step, [1], x, rids, token_request, positions, generated)
        msg, data = parse_plugin_message(raw)
        out.append(decode_batch(msg.batch, D, {1}, 1 << 30, 1 << 20, data))
    return out


def _sidecar(tmp_path, name):
    (tmp_path / name).mkdir()
    rules = tmp_path / name / "rules.yaml"
    rules.write_text(RULES)
    cfg = fixture_config(tmp_path / name, D, socket=None, grpc_port=None, metrics_port=None, rules_file=str(rules))
    return Sidecar(SidecarConfig.model_validate(cfg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_evaluate_like_single_batches(tmp_path, seed):
    batches = _batches(seed)
    one, grouped = _sidecar(tmp_path, "one"), _sidecar(tmp_path, "grouped")
    send = lambda stream, directive: True  # noqa: E731
    expected = [v for b in batches for v in one.pipeline.process(b, None, send)]
    got, sizes, i = [], [3, 1, 5, 2, 8], 0
    while i < len(batches):
        n = sizes[len(got) % len(sizes)]
        got += grouped.pipeline.process(BatchGroup.of(batches[i:i + n]), None, send)
        i += n
    key = lambda v: (v.rule.name, v.request.request_id, v.position, round(v.value, 5))  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))
    assert {v.rule.name for v in expected} >= {"token", "count3", "ema"}  # every window kind fired
    assert one.requests.deduplicated_tokens > 0  # re-sent tokens were in the mix
    for rid, state in one.requests._states.items():
        other = grouped.requests._states[rid]
        assert state.next_position == other.next_position
        assert np.array_equal(state.counts, other.counts)
        assert np.allclose(state.ema, other.ema, equal_nan=True)
    for s in (one, grouped):
        s.events.close()
