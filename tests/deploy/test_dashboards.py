"""The Grafana dashboard: generated from code, committed current, structurally sound."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from tests.deploy.deploy_helpers import REPO, contract_metric_names

DASHBOARDS = REPO / "dashboards"


def load_generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DASHBOARDS / "featurewatch.json").read_text())


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def test_committed_json_is_current():
    generator = load_generator()
    committed = (DASHBOARDS / "featurewatch.json").read_text()
    assert committed == generator.render(), "dashboards/featurewatch.json is stale: run python dashboards/generate.py"
    assert generator.main(["--check"]) == 0


def test_check_mode_detects_stale(tmp_path):
    generator = load_generator()
    stale = tmp_path / "featurewatch.json"
    stale.write_text("{}\n")
    assert generator.main(["--check", "--out", str(stale)]) == 1
    assert generator.main(["--out", str(stale)]) == 0 and generator.main(["--check", "--out", str(stale)]) == 0


def test_top_level_and_variables(dashboard):
    assert dashboard["uid"] == "featurewatch" and dashboard["title"] == "featurewatch"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables)[:3] == ["datasource", "model_name", "instance"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model_name", "instance", "rule", "probe"):
        var = variables[name]
        assert var["type"] == "query" and var["includeAll"] and var["multi"] and var["allValue"] == ".*"
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"]).group(2) == name
    # vLLM's label names: the same variables select vLLM's series and featurewatch's.
    assert "vllm:num_requests_running" in variables["model_name"]["query"]["query"]
    assert "vllm:num_requests_running" in variables["instance"]["query"]["query"]


def test_panels_structure(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "bargauge", "table", "heatmap"}
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        assert p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]


def test_every_query_filters_on_the_template_variables(dashboard):
    for expr in exprs(dashboard):
        selectors = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr)
        assert selectors, expr
        for metric, matchers in selectors:
            assert 'instance=~"$instance"' in matchers, f"{metric} in {expr}"
            if metric.startswith("vllm:"):
                assert 'model_name=~"$model_name"' in matchers, expr
        assert "[5m]" not in expr and "[1m]" not in expr, "use $__rate_interval"


def test_metrics_are_the_contracts(dashboard):
    known = contract_metric_names()
    used = {m for e in exprs(dashboard) for m in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", e)}
    featurewatch = {m for m in used if m.startswith("featurewatch_")}
    assert featurewatch <= known, f"not in docs/ARCHITECTURE.md: {featurewatch - known}"
    assert {m for m in used if not m.startswith("featurewatch_")} <= {
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:e2e_request_latency_seconds_bucket",
        "vllm:time_to_first_token_seconds_bucket", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:kv_cache_usage_perc",
    }


def test_required_views_are_present(dashboard):
    by_title = {p["title"]: p for p in panels(dashboard)}
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Features and rules", "Alerts", "Probes", "Steering", "Sidecar health", "vLLM"]

    def uses(title: str, *needles: str) -> None:
        text = " ".join(t["expr"] for t in by_title[title]["targets"])
        for needle in needles:
            assert needle in text, (title, needle)

    uses("Feature firing rate", "featurewatch_feature_active_tokens_total")
    uses("Alert rate by rule", "featurewatch_alerts_total")
    assert by_title["Alert rate by rule"]["targets"][0]["exemplar"] is True  # trace_id exemplars
    heatmap = by_title["Probe score distribution"]
    assert heatmap["type"] == "heatmap" and heatmap["targets"][0]["format"] == "heatmap"
    uses("Probe score quantiles", "histogram_quantile(0.99", "featurewatch_probe_score_bucket")
    uses("Steering actions", "featurewatch_steering_actions_total")
    uses("Directives sent vs tokens steered", "featurewatch_steering_actions_total", "featurewatch_plugin_tokens_steered_total",
         'mode="shadow"')
    uses("Queue fill", "featurewatch_queue_depth", "featurewatch_queue_capacity")
    uses("Batches received and dropped", "featurewatch_batches_dropped_total", "featurewatch_plugin_batches_dropped_total")
    uses("Encode latency", "featurewatch_encode_seconds_bucket")
    uses("Token-to-verdict lag", "featurewatch_token_to_verdict_seconds_bucket")
    uses("Plugin connection", "featurewatch_plugin_connected")
    uses("vLLM requests running / waiting", "vllm:num_requests_running")
    uses("vLLM end-to-end request latency", "vllm:e2e_request_latency_seconds_bucket")
    uses("Monitored share of vLLM tokens", "featurewatch_tokens_processed_total", "vllm:generation_tokens_total")
    assert by_title["Rules in force"]["targets"][0]["format"] == "table"
