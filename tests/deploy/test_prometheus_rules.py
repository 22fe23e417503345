"""Prometheus scrape config and alerting rules: promtool check + promtool unit tests + contract."""

from __future__ import annotations

import re

import yaml

from tests.deploy.deploy_helpers import REPO, contract_metric_names, need_binary, run

PROM = REPO / "deploy" / "prometheus"
RULES = PROM / "rules" / "featurewatch.rules.yml"
RULE_TESTS = REPO / "tests" / "deploy" / "promtool" / "featurewatch_rules_test.yml"

PROMQL_FUNCS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "increase", "rate", "irate", "by", "on",
    "without", "ignoring", "group_left", "group_right", "and", "or", "unless", "histogram_quantile",
    "last_over_time", "absent", "bool", "offset", "clamp_min", "clamp_max", "label_replace",
}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_FUNCS and not re.fullmatch(r"e\d*", n)}


def test_promtool_check_rules():
    promtool = need_binary("promtool")
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests():
    promtool = need_binary("promtool")
    result = run([promtool, "test", "rules", str(RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_and_routable():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {a["alert"] for a in alerts} <= tested, "alerts without a firing promtool test case"
    for alert in alerts:
        labels = alert.get("labels", {})
        if alert["alert"] == "FeaturewatchRuleFired":
            # severity/owner come from the featurewatch rule, through the join.
            assert "* on(rule) group_left(severity, owner)" in alert["expr"]
            assert "featurewatch_rule_info" in alert["expr"]
        else:
            assert labels.get("severity") in ("info", "warning", "critical"), alert["alert"]
            assert labels.get("owner"), alert["alert"]
        assert alert["annotations"].get("summary"), alert["alert"]


def test_rules_use_only_contract_metrics():
    known = contract_metric_names() | {"up"}
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert')}: metrics not in docs/ARCHITECTURE.md: {unknown}"


def test_scrape_config_compose():
    promtool = need_binary("promtool")
    result = run([promtool, "check", "config", "--syntax-only", str(PROM / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"featurewatch", "vllm"}
    # vLLM and its sidecar are one replica: same `instance` so panels and rules can join them.
    instances = {j["job_name"]: j["static_configs"][0]["labels"]["instance"] for j in jobs.values()}
    assert instances["featurewatch"] == instances["vllm"]
    assert jobs["featurewatch"]["static_configs"][0]["targets"] == ["featurewatch:9400"]
    assert jobs["vllm"]["static_configs"][0]["targets"] == ["vllm:8000"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_scrape_config_kubernetes():
    promtool = need_binary("promtool")
    path = PROM / "prometheus-k8s.yml"
    result = run([promtool, "check", "config", "--syntax-only", str(path)])
    output = result.stdout + result.stderr
    # Debian's prometheus build leaves out Kubernetes service discovery: its promtool cannot parse
    # kubernetes_sd_configs. Upstream builds (and CI's) check the whole file.
    debian_without_k8s_sd = "field kubernetes_sd_configs not found" in output
    assert result.returncode == 0 or debian_without_k8s_sd, output
    config = yaml.safe_load(path.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"featurewatch", "vllm"}
    for name, annotation_on in (("featurewatch", "pod"), ("vllm", "service")):
        relabels = jobs[name]["relabel_configs"]
        keep = relabels[0]
        assert keep["action"] == "keep" and keep["regex"] == "true"
        assert keep["source_labels"] == [f"__meta_kubernetes_{annotation_on}_annotation_prometheus_io_scrape"]
        port = relabels[1]
        assert port["target_label"] == "__address__"
        assert re.fullmatch(port["regex"], "10.0.0.7:8000;9400") and port["replacement"] == "$1:$2"
        assert {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "instance"} in relabels
