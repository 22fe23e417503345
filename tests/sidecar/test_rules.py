"""Rules language, compiler and per-request evaluation, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.evaluate.compiler import compile_rules
from monitor.evaluate.rules import RulesInvalid, parse_rules
from monitor.evaluate.state import LayerBatch, RequestInfo, RequestTable, ema_trace, segmented_ema
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction

D = 64


def test_schema_errors_name_file_rule_and_field():
    text = """
rules:
  - name: ok
    signal: {source: sae, feature: 1}
    above: 1
  - name: bad_window
    signal: {source: sae, feature: 1}
    above: 1
    window: {kind: count, n: 0}
"""
    with pytest.raises(RulesInvalid) as exc:
        parse_rules(text, "rules.yaml")
    [error] = exc.value.errors
    assert (error.file, error.rule, error.field) == ("rules.yaml", "bad_window", "window.count.n")
    assert "rules.yaml: rule 'bad_window' field 'window.count.n'" in str(exc.value)


def test_yaml_syntax_error_is_reported_with_file():
    with pytest.raises(RulesInvalid, match="r.yaml: file: not valid YAML"):
        parse_rules("rules: [", "r.yaml")


def test_references_checked_against_loaded_dictionaries(dictionaries):
    text = """
rules:
  - {name: a, signal: {source: nope, feature: 1}, above: 1}
  - {name: b, signal: {source: sae, feature: 999}, above: 1}
  - {name: c, signal: {source: probes, probe: missing}, above: 0.5}
  - name: d
    signal: {source: sae, feature: 1}
    above: 1
    actions: [{steer: {clamp: {source: sae, feature: 500}}}]
"""
    with pytest.raises(RulesInvalid) as exc:
        compile_rules(text, dictionaries, file="r.yaml")
    found = {(e.rule, e.field) for e in exc.value.errors}
    assert found == {("a", "signal.source"), ("b", "signal.feature"), ("c", "signal.probe"),
                     ("d", "actions[0].steer.clamp.feature")}
    assert any("out of range for 'sae' (d_sae=32)" in e.message for e in exc.value.errors)


def test_compiled_clamp_carries_the_features_columns(dictionaries):
    text = f"""
rules:
  - name: planted
    signal: {{source: sae, feature: {PLANTED_FEATURE}}}
    above: 2
    actions: [{{alert: {{}}}}, {{steer: {{clamp: {{source: sae, feature: {PLANTED_FEATURE}, value: 0}}}}}}]
policies:
  - name: tenant_a
    selector: {{tenant: a}}
    steer: [{{add: {{source: sae, feature: {PLANTED_FEATURE}, scale: -2}}}}]
"""
    compiled = compile_rules(text, dictionaries, version=7)
    [rule] = compiled.rules
    assert rule.alert and rule.layer == 1 and compiled.version == 7
    [action] = rule.steering
    encoder = np.frombuffer(action.clamp.encoder.data, np.float32)
    np.testing.assert_allclose(encoder, planted_direction(D), atol=1e-6)
    assert action.clamp.threshold == pytest.approx(0.5) and action.clamp.bias == pytest.approx(-1.0)
    [policy] = compiled.policies
    assert dict(policy.selector) == {"tenant": "a"} and policy.actions[0].add.scale == -2


def _layer_batch(rids, token_request, positions, generated):
    return LayerBatch(1, rids, np.array(token_request), np.array(positions), np.array(generated, bool))


def test_count_window_fires_once_at_the_nth_token_and_dedupes(dictionaries):
    compiled = compile_rules(f"""
rules:
  - {{name: thrice, signal: {{source: sae, feature: {PLANTED_FEATURE}}}, above: 2, scope: generated, window: {{kind: count, n: 3}}}}
""", dictionaries)
    table = RequestTable(100, 60)
    table.reset_rules(1)
    table.start(RequestInfo("r1"))
    col = compiled.rules[0].column
    signals = np.zeros((6, 1), np.float32)
    signals[[1, 2, 4, 5], col] = 5.0  # token 1 is a prompt token: out of scope
    batch = _layer_batch(["r1"], [0] * 6, [0, 1, 2, 3, 4, 5], [False, False, True, True, True, True])
    keep = table.dedupe(batch)
    [verdict] = table.evaluate(compiled, batch, signals, keep)
    assert verdict.position == 5 and verdict.request.request_id == "r1"
    # The same tokens again (preemption recompute): all deduplicated, no second verdict.
    again = table.dedupe(batch)
    assert not again.any() and table.deduplicated_tokens == 6
    assert table.evaluate(compiled, batch, signals, again) == []


def test_ema_window_matches_a_sequential_ema():
    rng = np.random.default_rng(0)
    values = rng.random(200)
    expected, e = [], np.nan
    for v in values:
        e = v if np.isnan(e) else 0.8 * e + 0.2 * v
        expected.append(e)
    np.testing.assert_allclose(ema_trace(values, 0.2, np.nan), expected, rtol=1e-12)
    np.testing.assert_allclose(ema_trace(values[100:], 0.2, expected[99]), expected[100:], rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.01, 0.2, 0.9, 0.999, 1.0])
def test_segmented_ema_restarts_per_request_and_matches_sequential(alpha):
    rng = np.random.default_rng(1)
    lengths = [1, 5, 70, 33, 1, 100]
    values = rng.random(sum(lengths)) * 10
    starts = np.cumsum([0] + lengths[:-1])
    seeds = np.array([np.nan, 0.5, np.nan, 0.1, 3.0, np.nan])
    expected = []
    for seed, start, n in zip(seeds, starts, lengths):
        e = seed
        for v in values[start:start + n]:
            e = v if np.isnan(e) else (1 - alpha) * e + alpha * v
            expected.append(e)
    np.testing.assert_allclose(segmented_ema(values, starts, alpha, seeds), expected, rtol=1e-10, atol=1e-12)


def test_request_table_is_bounded():
    table = RequestTable(max_requests=3, idle_timeout_s=60)
    for i in range(5):
        table.start(RequestInfo(f"r{i}"))
    assert len(table) == 3 and table.evicted == 2 and table.get("r0") is None
