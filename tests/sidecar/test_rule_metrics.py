"""Per-rule metrics mean what the rule means: `featurewatch_rule_matched_tokens_total` counts only
the rule's in-scope tokens, and for an EMA window the tokens where the running average was above
(issue 16: a `scope: generated` rule counted prompt tokens)."""

from __future__ import annotations

import numpy as np

from monitor.config import SidecarConfig
from monitor.receive.batch import decode_batch
from monitor.receive.wire import parse_plugin_message
from monitor.sidecar import Sidecar
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import fixture_config

D = 64
F = PLANTED_FEATURE
RULES = f"""rules:
  - {{name: generated_only, signal: {{source: sae, feature: {F}}}, above: 2.0, scope: generated}}
  - {{name: prompt_only, signal: {{source: sae, feature: {F}}}, above: 2.0, scope: prompt}}
  - {{name: every_token, signal: {{source: sae, feature: {F}}}, above: 2.0}}
  - {{name: count_generated, signal: {{source: sae, feature: {F}}}, above: 2.0, scope: generated,
      window: {{kind: count, n: 5}}}}
  - {{name: ema_generated, signal: {{source: sae, feature: {F}}}, above: 2.0, scope: generated,
      window: {{kind: ema, alpha: 0.5}}}}
"""


def _batch(step: int, planted: list[bool], positions: list[int], generated: list[bool]):
    x = (np.random.default_rng(step).standard_normal((1, len(positions), D)) * 0.05).astype(np.float32)
    x[0, np.array(planted)] += 10 * planted_direction(D)  # feature value 9 where planted, 0 elsewhere
    raw = PluginClient.encoded_batch(step, [1], x, ["r-0-00000000"], [0] * len(positions), positions, generated)
    msg, data = parse_plugin_message(raw)
    return decode_batch(msg.batch, D, {1}, 1 << 30, 1 << 20, data)


def test_rule_matched_tokens_respect_scope_and_window(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    cfg = fixture_config(tmp_path, D, socket=None, grpc_port=None, metrics_port=None, rules_file=str(rules))
    sidecar = Sidecar(SidecarConfig.model_validate(cfg))
    try:
        send = lambda stream, directive: True  # noqa: E731
        # prefill: 4 prompt tokens, 3 of them planted; then 3 generated tokens, the first planted
        sidecar.pipeline.process(_batch(1, [False, True, True, True], [0, 1, 2, 3], [False] * 4), None, send)
        for step, (pos, planted) in enumerate([(4, True), (5, False), (6, False)], start=2):
            sidecar.pipeline.process(_batch(step, [planted], [pos], [True]), None, send)

        def matched(rule: str) -> float:
            return sidecar.metrics.registry.get_sample_value(
                "featurewatch_rule_matched_tokens_total", {"model_name": "test-model", "rule": rule}) or 0.0

        assert matched("generated_only") == 1  # was 4: the three planted prompt tokens counted too
        assert matched("prompt_only") == 3
        assert matched("every_token") == 4
        assert matched("count_generated") == 1  # matched tokens, whether or not the window fired
        # EMA over the generated tokens 9, 0, 0 (alpha 0.5): 9, 4.5, 2.25 — all three above 2.0
        assert matched("ema_generated") == 3
        fired = {name for (name,) in _alerts(sidecar)}
        assert fired == {"generated_only", "prompt_only", "every_token", "ema_generated"}
    finally:
        sidecar.events.close()


def _alerts(sidecar):
    family = next(m for m in sidecar.metrics.registry.collect() if m.name == "featurewatch_alerts")
    return {(s.labels["rule"],) for s in family.samples if s.name.endswith("_total") and s.value > 0}
