"""Alertmanager routing by severity and owner: amtool check-config and amtool config routes test."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.deploy_helpers import REPO, need_binary, run

CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = REPO / "deploy" / "prometheus" / "rules" / "featurewatch.rules.yml"


def test_amtool_check_config():
    amtool = need_binary("amtool")
    result = run([amtool, "check-config", str(CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    "labels, receivers",
    [
        # A featurewatch rule's alert: severity and owner from featurewatch_rule_info.
        ({"alertname": "FeaturewatchRuleFired", "severity": "warning", "owner": "trust-safety", "rule": "competitor_mention"}, "trust-safety"),
        ({"alertname": "FeaturewatchRuleFired", "severity": "critical", "owner": "security", "rule": "deception"}, "oncall-pager,security"),
        ({"alertname": "FeaturewatchRuleFired", "severity": "critical", "owner": "trust-safety"}, "oncall-pager,trust-safety"),
        ({"alertname": "FeaturewatchRuleFired", "severity": "info", "owner": "trust-safety"}, "featurewatch-digest"),
        ({"alertname": "FeaturewatchRuleFired", "severity": "warning", "owner": "nobody-we-know"}, "featurewatch-default"),
        ({"alertname": "FeaturewatchRuleFired", "severity": "warning"}, "featurewatch-default"),  # rule without owner
        # Sidecar health.
        ({"alertname": "FeaturewatchSidecarDown", "severity": "warning", "owner": "ml-platform"}, "ml-platform"),
        ({"alertname": "FeaturewatchSteeringFailClosedSidecarDown", "severity": "critical", "owner": "ml-platform"}, "oncall-pager,ml-platform"),
    ],
)
def test_routes(labels, receivers):
    amtool = need_binary("amtool")
    args = [amtool, "config", "routes", "test", f"--config.file={CONFIG}", f"--verify.receivers={receivers}"]
    result = run(args + [f"{k}={v}" for k, v in labels.items()])
    assert result.returncode == 0, f"{labels}: expected {receivers}, got {result.stdout.strip()} {result.stderr}"


def test_routing_tree_shows_receivers():
    amtool = need_binary("amtool")
    result = run([amtool, "config", "routes", "show", f"--config.file={CONFIG}"])
    assert result.returncode == 0, result.stderr
    for receiver in ("oncall-pager", "featurewatch-digest", "trust-safety", "security", "ml-platform"):
        assert receiver in result.stdout


def test_health_alert_owners_have_routes_and_inhibitions_name_real_alerts():
    config = yaml.safe_load(CONFIG.read_text())
    alerts = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    owners = {r["labels"]["owner"] for r in alerts.values() if "owner" in r.get("labels", {})}
    routed = {m.split("=")[1].strip('"') for route in config["route"]["routes"] for m in route["matchers"] if m.startswith("owner=")}
    assert owners <= routed
    for inhibit in config["inhibit_rules"]:
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            name, _, value = matcher.partition("=")
            assert name.rstrip("~") == "alertname"
            for alert in value.strip('~"').split("|"):
                assert alert in alerts, alert
