"""Steering units (issue 16): `add.scale` multiplies the unit direction, optionally × the layer's
median residual norm measured from live traffic; an add needs only a decoder row, so a TopK SAE's
feature can be added (not clamped); errors name the action's index and call a policy a policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.act.steering import SteeringController
from monitor.act.units import MIN_TOKENS, SAMPLE, ResidualNorms
from monitor.config import SidecarConfig, SourceConfig
from monitor.encode.stage import Dictionaries
from monitor.evaluate.compiler import compile_rules
from monitor.evaluate.rules import RulesInvalid
from monitor.receive.batch import decode_batch
from monitor.receive.wire import parse_plugin_message
from monitor.sidecar import Sidecar
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import fixture_config

D = 64
F = 5
ROW_NORM = 1.89  # the decoder-row norm of the report: the raw row is not a unit


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(D).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def topk_dir(tmp_path_factory):
    """A TopK SAE written by sae-lens itself, feature F's decoder row of norm 1.89."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=32, k=4))
    with torch.no_grad():
        sae.W_dec[F] = torch.from_numpy(ROW_NORM * _unit(1))
    path = tmp_path_factory.mktemp("topk") / "sae"
    sae.save_model(path)
    return path


@pytest.fixture(scope="module")
def dictionaries(topk_dir):
    return Dictionaries([SourceConfig(name="tk", kind="sae", layer=1, path=topk_dir)])


def test_an_add_on_a_topk_feature_is_its_unit_decoder_row(dictionaries):
    compiled = compile_rules(f"""
rules:
  - name: r
    signal: {{source: tk, feature: {F}}}
    above: 1
    actions: [{{alert: {{}}}}, {{steer: {{add: {{source: tk, feature: {F}, scale: -4}}}}}}]
policies:
  - {{name: p, steer: [{{add: {{source: tk, feature: {F}, scale: 2}}}}]}}
""", dictionaries, file="x.yaml")
    [action] = compiled.rules[0].steering
    direction = np.frombuffer(action.add.direction.data, np.float32)
    np.testing.assert_allclose(direction, _unit(1), atol=1e-6)  # the row's direction, norm 1 (not 1.89)
    assert action.add.scale == -4 and action.layer == 1
    assert compiled.policies[0].actions[0].add.scale == 2


def test_a_clamp_on_a_topk_feature_is_refused_naming_the_action_and_the_policy(dictionaries):
    with pytest.raises(RulesInvalid) as exc:
        compile_rules(f"""
rules:
  - name: r
    signal: {{source: tk, feature: {F}}}
    above: 1
    actions: [{{alert: {{}}}}, {{steer: {{clamp: {{source: tk, feature: {F}}}}}}}]
policies:
  - {{name: p, steer: [{{add: {{source: tk, feature: 1, scale: 1}}}}, {{clamp: {{source: tk, feature: {F}}}}}]}}
""", dictionaries, file="x.yaml")
    rule, policy = (str(e) for e in exc.value.errors)
    assert rule.startswith("x.yaml: rule 'r' field 'actions[1].steer.clamp': ") and "TopK" in rule
    assert policy.startswith("x.yaml: policy 'p' field 'steer[1].clamp': ") and "TopK" in policy


def test_residual_norm_units_wait_for_traffic_then_scale_by_the_median(dictionaries):
    compiled = compile_rules(f"""
rules:
  - name: r
    signal: {{source: tk, feature: {F}}}
    above: 1
    actions: [{{steer: {{add: {{source: tk, feature: {F}, scale: -0.1, scale_unit: residual_norm}}}}}}]
""", dictionaries)
    withheld = []
    controller = SteeringController(True, "open", on_withheld=withheld.append)
    actions = compiled.rules[0].steering
    assert controller.directive("a", "r", 3, actions) is None and withheld == ["residual_norm_unknown"]
    rows = torch.from_numpy(np.stack([(7.0 + 0.01 * k) * _unit(k) for k in range(MIN_TOKENS)]))
    medians = [controller.norms.observe(1, rows[k:k + SAMPLE], np.arange(SAMPLE)) for k in range(0, MIN_TOKENS, SAMPLE)]
    assert medians[:-1] == [None] * (len(medians) - 1)  # not before MIN_TOKENS rows
    assert medians[-1] == pytest.approx(7.0 + 0.01 * 31.5, rel=1e-6)
    [add] = controller.directive("a", "r", 3, actions).actions
    assert add.add.scale == pytest.approx(-0.1 * 7.315, rel=1e-6)
    np.testing.assert_allclose(np.frombuffer(add.add.direction.data, np.float32), _unit(1), atol=1e-6)
    huge = compile_rules(f"""
rules:
  - name: r
    signal: {{source: tk, feature: {F}}}
    above: 1
    actions: [{{steer: {{add: {{source: tk, feature: {F}, scale: 9000, scale_unit: residual_norm}}}}}}]
""", dictionaries).rules[0].steering
    assert controller.directive("b", "r", 3, huge) is None and withheld[-1] == "out_of_bounds"


def test_the_median_reads_only_sampled_rows_of_unsteered_requests():
    norms = ResidualNorms()
    x = torch.ones(10_000, D)  # norm 8 everywhere ...
    x[::2] *= 100  # ... but 800 on the rows that may not be measured
    for _ in range(MIN_TOKENS // SAMPLE):
        norms.observe(2, x, np.arange(1, 10_000, 2))
    assert norms.median(2) == pytest.approx(8.0) and norms.median(1) is None
    assert [norms.due(2) for _ in range(8)] == [True, False, False, False] * 2  # known: one batch in four


def _batch(step: int, rid: str, positions: list[int], scale: float):
    x = np.stack([scale * _unit(100 + p) for p in positions])[None].astype(np.float32)
    raw = PluginClient.encoded_batch(step, [1], x, [rid], [0] * len(positions), positions, [True] * len(positions))
    msg, data = parse_plugin_message(raw)
    return decode_batch(msg.batch, D, {1}, 1 << 30, 1 << 20, data)


def test_policies_in_residual_norm_units_reach_the_plan_once_the_norm_is_measured(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
policies:
  - name: relative
    selector: {{tenant: acme}}
    steer: [{{add: {{source: sae, feature: {PLANTED_FEATURE}, scale: -0.25, scale_unit: residual_norm}}}}]
  - name: absolute
    selector: {{tenant: other}}
    steer: [{{add: {{source: sae, feature: {PLANTED_FEATURE}, scale: -1}}}}]
""")
    cfg = fixture_config(tmp_path, D, socket=None, grpc_port=None, metrics_port=None, rules_file=str(rules))
    sidecar = Sidecar(SidecarConfig.model_validate(cfg))
    try:
        assert [p.name for p in sidecar.plan().policies] == ["absolute"]  # nothing measured yet
        assert sidecar.steering.norms.needs_replan() is False
        send = lambda stream, directive: True  # noqa: E731
        from monitor.evaluate.state import RequestInfo

        sidecar.pipeline.request_started(RequestInfo("steered-0", metadata={"tenant": "acme"}, steering_policy="relative"), 4, 0)
        sidecar.pipeline.process(_batch(1, "steered-0", list(range(200)), 50.0), None, send)  # steered: not measured
        assert sidecar.steering.norms.median(1) is None
        for step in range(MIN_TOKENS // SAMPLE):  # SAMPLE rows are measured per batch
            assert sidecar.steering.norms.median(1) is None
            sidecar.pipeline.process(_batch(2 + step, "plain-0", list(range(32 * step, 32 * step + 32)), 6.0), None, send)
        assert sidecar.steering.norms.median(1) == pytest.approx(6.0, rel=1e-5)
        assert sidecar.steering.norms.needs_replan() is True  # the sidecar sends every plugin a new plan
        plan = sidecar.plan()
        assert sidecar.steering.norms.needs_replan() is False
        by_name = {p.name: p for p in plan.policies}
        assert by_name["relative"].actions[0].add.scale == pytest.approx(-0.25 * 6.0, rel=1e-5)
        assert by_name["absolute"].actions[0].add.scale == -1
        np.testing.assert_allclose(np.frombuffer(by_name["relative"].actions[0].add.direction.data, np.float32),
                                   planted_direction(D), atol=1e-6)
        gauge = sidecar.metrics.registry.get_sample_value("featurewatch_residual_norm",
                                                          {"model_name": "test-model", "layer": "1"})
        assert gauge == pytest.approx(6.0, rel=1e-5)
    finally:
        sidecar.events.close()
