"""Shadow steering (issue 12): a rule's steer action or a policy in `mode: shadow` is computed as
in enforce mode, counted (featurewatch_steering_actions_total{mode="shadow"}) and audited (a
`steering` event with "mode": "shadow"), and never reaches the plugin: no directive, no policy in
the plan."""

from __future__ import annotations

import json
import time

import pytest

from monitor.evaluate.compiler import compile_rules
from monitor.evaluate.rules import RulesInvalid, parse_rules
from monitor.protocol import pb
from tests.sidecar.test_sidecar_grpc import AUTH, D, admin, rows
from tests.support.dictionaries import PLANTED_FEATURE
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import SidecarProcess, fixture_config, metric_value

CLAMP = f"{{clamp: {{source: sae, feature: {PLANTED_FEATURE}, value: 0}}"
RULES = f"""
rules:
  - name: shadowed
    signal: {{source: sae, feature: {PLANTED_FEATURE}}}
    above: 2.0
    scope: generated
    actions:
      - alert: {{}}
      - steer: {{clamp: {{source: sae, feature: {PLANTED_FEATURE}, value: 0}}, mode: shadow}}
  - name: enforced
    signal: {{source: sae, feature: {PLANTED_FEATURE}}}
    above: 2.0
    scope: prompt
    actions:
      - steer: {CLAMP}}}
policies:
  - name: shadow_policy
    selector: {{tenant: s}}
    mode: shadow
    steer: [{CLAMP}}}]
  - name: real_policy
    selector: {{tenant: r}}
    steer: [{CLAMP}}}]
"""


# ---------------------------------------------------------------- the rules language


def test_mode_is_accepted_on_a_rules_steer_action_and_on_a_policy():
    spec = parse_rules(RULES, "rules.yaml")
    assert [a.steer.mode for a in spec.rules[0].actions if a.steer] == ["shadow"]
    assert [a.steer.mode for a in spec.rules[1].actions if a.steer] == ["enforce"]  # the default
    assert [p.mode for p in spec.policies] == ["shadow", "enforce"]


@pytest.mark.parametrize("text,where", [
    (RULES.replace("mode: shadow}", "mode: dry-run}"),
     "rules.yaml: rule 'shadowed' field 'actions[1].steer.mode': Input should be 'enforce' or 'shadow' (got 'dry-run')"),
    (RULES.replace("    mode: shadow\n", "    mode: 1\n"),
     "rules.yaml: policy 'shadow_policy' field 'mode': Input should be 'enforce' or 'shadow' (got 1)"),
    (RULES.replace(f"    mode: shadow\n    steer: [{CLAMP}}}]", f"    steer: [{CLAMP}, mode: shadow}}]"),
     "rules.yaml: policy 'shadow_policy' field 'steer[0].mode': Extra inputs are not permitted"),
], ids=["rule-mode", "policy-mode", "policy-action-mode"])
def test_a_bad_mode_names_the_file_the_rule_and_the_field(text, where):
    with pytest.raises(RulesInvalid) as e:
        parse_rules(text, "rules.yaml")
    assert str(e.value).startswith(where), str(e.value)


def test_compiled_shadow_actions_and_policies_are_kept_apart(dictionaries):
    compiled = compile_rules(RULES, dictionaries, layers=[1])
    shadowed, enforced = compiled.rules
    assert shadowed.steering == () and len(shadowed.shadow_steering) == 1
    assert len(enforced.steering) == 1 and enforced.shadow_steering == ()
    assert [p.name for p in compiled.policies] == ["shadow_policy", "real_policy"]  # all of them count
    assert [p.name for p in compiled.enforced_policies] == ["real_policy"]
    assert [p.name for p in compiled.shadow_policies] == ["shadow_policy"]


# ---------------------------------------------------------------- the real sidecar


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shadow")
    (tmp / "rules.yaml").write_text(RULES)
    proc = SidecarProcess(tmp, fixture_config(tmp, D, rules_file=str(tmp / "rules.yaml")))
    with proc:
        yield proc


def _events(sidecar) -> list[dict]:
    reply = admin(sidecar.tcp_address).TailAlerts(pb.TailAlertsRequest(last=200), metadata=AUTH, timeout=10)
    return [json.loads(e.json) for e in reply]


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_a_shadow_rule_and_policy_are_counted_and_audited_and_nothing_is_sent(sidecar):
    client = PluginClient(sidecar.socket_address, D)
    try:
        plan = client.plan()
        assert [p.name for p in plan.policies] == ["real_policy"]  # the shadow policy is not in the plan
        client.start_request("cmpl-s-0-00000001", "cmpl-s", {"tenant": "s"})
        client.start_request("cmpl-f-0-00000002", "cmpl-f", {"tenant": "a"})
        # the planted generated token fires the shadow rule on request s
        client.send(PluginClient.batch(1, [1], rows(3, planted=[2]), ["cmpl-s-0-00000001"], [0, 0, 0], [0, 1, 2],
                                       [False, False, True]))
        # then a planted prompt token fires the enforced rule on request f: its directive is the fence
        # (one pipeline thread, one outbox per stream, both in order)
        client.send(PluginClient.batch(2, [1], rows(2, planted=[1], seed=1), ["cmpl-f-0-00000002"], [0, 0], [0, 1],
                                       [False, False]))
        fence = client.wait_for(lambda m: m.HasField("directive"), timeout=60).directive
        assert fence.request_id == "cmpl-f-0-00000002" and fence.rule == "enforced"
        assert [d.request_id for d in client.directives()] == ["cmpl-f-0-00000002"]  # none for the shadow rule

        def steering() -> list[dict] | None:
            found = [e for e in _events(sidecar) if e["kind"] == "steering"]
            return found if len(found) >= 3 else None
        events = _wait(steering, "the steering events")
        by = {(e.get("rule") or e.get("policy"), e["mode"]): e for e in events}
        rule_event = by[("shadowed", "shadow")]
        assert rule_event["trigger"] == "rule" and rule_event["actions"] == ["clamp"]
        assert rule_event["request_id"] == "cmpl-s-0-00000001" and rule_event["from_position"] == 3
        policy_event = by[("shadow_policy", "shadow")]
        assert policy_event["trigger"] == "policy" and policy_event["api_request_id"] == "cmpl-s"
        assert by[("enforced", "enforce")]["request_id"] == "cmpl-f-0-00000002"
        assert not [e for e in events if e.get("policy") == "shadow_policy" and e["request_id"] != "cmpl-s-0-00000001"]

        text = sidecar.metrics()
        count = lambda **labels: metric_value(text, "featurewatch_steering_actions_total", **labels)  # noqa: E731
        assert count(rule="shadowed", action="clamp", trigger="rule", mode="shadow") == 1
        assert count(rule="shadowed", mode="enforce") == 0
        assert count(rule="shadow_policy", trigger="policy", mode="shadow") == 1
        assert count(rule="enforced", action="clamp", trigger="rule", mode="enforce") == 1
        assert count(rule="shadow_policy", mode="enforce") == 0
    finally:
        client.close()
