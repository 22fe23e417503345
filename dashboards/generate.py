#!/usr/bin/env python3
"""Generate the featurewatch Grafana dashboard from code.

    python dashboards/generate.py           # writes dashboards/featurewatch.json
    python dashboards/generate.py --check   # exits 1 if the committed JSON is stale

The JSON is committed (import it in Grafana, or provision it: deploy/compose/grafana/). A test
checks it is current, checks its structure, and runs every query against a real Prometheus that
scraped a real sidecar (tests/deploy/test_dashboards*.py).

Conventions: every query filters on the `model_name` / `instance` template variables, which the
featurewatch sidecar and vLLM's own /metrics share (see deploy/prometheus/prometheus.yml); series
without a `model_name` label (sidecar-wide metrics) filter on `instance` only. Rates use
`$__rate_interval`. Only metric names from docs/ARCHITECTURE.md and vLLM's `vllm:*` are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "featurewatch.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Label filters.
FW = 'model_name=~"$model_name", instance=~"$instance"'  # series with model_name (and vLLM's)
INST = 'instance=~"$instance"'  # sidecar-wide series
RI = "$__rate_interval"


def rate(metric: str, labels: str, by: str | None = None, fn: str = "rate", window: str = RI) -> str:
    agg = f"sum by ({by}) " if by else "sum"
    return f"{agg}({fn}({metric}{{{labels}}}[{window}]))"


def quantile(q: float, metric: str, labels: str, by: str = "") -> str:
    by_le = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({by_le}) (rate({metric}_bucket{{{labels}}}[{RI}])))"


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    format: str = "time_series"
    exemplar: bool = False

    def to_json(self, ref: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "datasource": DS,
            "refId": ref,
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "instant": self.instant,
            "format": self.format,
        }
        if self.exemplar:
            out["exemplar"] = True
        return out


@dataclass
class Panel:
    title: str
    targets: list[Target]
    kind: str = "timeseries"
    unit: str = "short"
    description: str = ""
    w: int = 8
    h: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    mappings: list[dict[str, Any]] = field(default_factory=list)
    custom: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    title: str
    panels: list[Panel]


def ts(title: str, *targets: Target, unit: str = "short", description: str = "", w: int = 8, stack: bool = False) -> Panel:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": True}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return Panel(
        title,
        list(targets),
        unit=unit,
        description=description,
        w=w,
        custom=custom,
        options={"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
                 "tooltip": {"mode": "multi", "sort": "desc"}},
    )


def stat(title: str, *targets: Target, unit: str = "short", description: str = "", mappings=None, text_mode: str = "auto") -> Panel:
    return Panel(
        title,
        list(targets),
        kind="stat",
        unit=unit,
        description=description,
        w=4,
        h=4,
        mappings=mappings or [],
        options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                 "colorMode": "value", "graphMode": "area", "textMode": text_mode, "justifyMode": "auto"},
    )


def latency(title: str, metric: str, labels: str, description: str, qs=(0.5, 0.9, 0.99), w: int = 8) -> Panel:
    return ts(title, *(Target(quantile(q, metric, labels), f"p{round(q * 100)}") for q in qs), unit="s", description=description, w=w)


# --------------------------------------------------------------------------------------------
# The dashboard.


def rows() -> list[Row]:
    alerts = f'{FW}, rule=~"$rule"'
    return [
        Row("Overview", [
            stat("Requests monitored", Target(rate("featurewatch_requests_total", FW)), unit="reqps",
                 description="Requests the sidecar saw start (RequestStart), per second."),
            stat("Alerts", Target(rate("featurewatch_alerts_total", alerts)), unit="reqps",
                 description="featurewatch rules fired (once per request and rule), per second."),
            stat("Plugins connected", Target(f"sum(featurewatch_plugin_connected{{{FW}}})"),
                 description="vLLM plugin streams connected to the selected sidecars."),
            stat("Rules version", Target(f"max(featurewatch_rules_version{{{INST}}})", "newest"),
                 Target(f"min(featurewatch_rules_version{{{INST}}})", "oldest"),
                 description="Rule set version in force; newest != oldest means replicas have not converged."),
            stat("Steering", Target(f"min(featurewatch_steering_enabled{{{INST}}})"),
                 mappings=[{"type": "value", "options": {"0": {"text": "off", "color": "orange"}, "1": {"text": "on", "color": "green"}}}],
                 description="The steering kill switch (0 = steering disabled everywhere selected)."),
            stat("Steering failure mode", Target(f"max by (mode) (featurewatch_steering_failure_mode{{{INST}}}) == 1", "{{mode}}"),
                 text_mode="name",
                 description="open: a missing sidecar never blocks a request; closed: requests that need steering fail without it."),
        ]),
        Row("Features and rules", [
            ts("Feature firing rate", Target(rate("featurewatch_feature_active_tokens_total", FW, "source, feature"), "{{source}} #{{feature}}"),
               unit="short", w=12,
               description="Tokens per second on which a rule-referenced SAE feature is active (> 0)."),
            ts("Feature firing per 1k monitored tokens",
               Target(f"1000 * {rate('featurewatch_feature_active_tokens_total', FW, 'source, feature')}"
                      f" / scalar(max(sum by (layer) (rate(featurewatch_tokens_processed_total{{{FW}}}[{RI}]))))",
                      "{{source}} #{{feature}}"),
               w=12, description="Active tokens per 1000 tokens monitored on a layer: a firing rate independent of traffic."),
            ts("Rule-matching tokens", Target(rate("featurewatch_rule_matched_tokens_total", alerts, "rule"), "{{rule}}"),
               description="In-scope tokens above each rule's threshold, per second (before windows/aggregation)."),
            ts("Tokens monitored", Target(rate("featurewatch_tokens_processed_total", FW, "layer, scope"), "layer {{layer}} {{scope}}"),
               description="Token rows evaluated per second, per tapped layer and scope (prompt/generated)."),
            ts("Prompt tokens not tapped (prefix cache)",
               Target(rate("featurewatch_plugin_cached_prompt_tokens_total", FW), "cached prompt tokens"),
               Target(rate("featurewatch_tokens_processed_total", f'{FW}, scope="prompt"', "layer"), "tapped prompt tokens, layer {{layer}}"),
               description="Prompt tokens served from vLLM's prefix cache are never recomputed, so never tapped or monitored."),
        ]),
        Row("Alerts", [
            Panel("Alert rate by rule", [Target(rate("featurewatch_alerts_total", alerts, "rule, severity"), "{{rule}} ({{severity}})", exemplar=True)],
                  w=12, description="Rules fired per second. Exemplars carry the trace_id of a firing request.",
                  custom={"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"},
                  options={"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "sum"]},
                           "tooltip": {"mode": "multi", "sort": "desc"}}),
            Panel("Alerts in range", [Target(f"sort_desc(sum by (rule, severity) (increase(featurewatch_alerts_total{{{alerts}}}[$__range])))",
                                             "{{rule}} ({{severity}})", instant=True)],
                  kind="bargauge", w=12, description="Alerts per rule over the dashboard's time range.",
                  options={"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                           "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}),
            ts("Flagged request share",
               Target(f"{rate('featurewatch_alerts_total', alerts, 'rule')} / scalar({rate('featurewatch_requests_total', FW)})", "{{rule}}"),
               unit="percentunit", w=12, description="Share of requests on which each rule fired."),
            Panel("Rules in force", [Target(f'max by (rule, severity, owner, signal) (featurewatch_rule_info{{{INST}, rule=~"$rule"}})',
                                            instant=True, format="table")],
                  kind="table", w=12, description="Loaded rules with the labels Alertmanager routes on (severity, owner).",
                  options={"showHeader": True, "cellHeight": "sm"},
                  overrides=[{"matcher": {"id": "byName", "options": "Time"}, "properties": [{"id": "custom.hidden", "value": True}]},
                             {"matcher": {"id": "byName", "options": "Value"}, "properties": [{"id": "custom.hidden", "value": True}]}]),
        ]),
        Row("Probes", [
            Panel("Probe score distribution",
                  [Target(f'sum by (le) (rate(featurewatch_probe_score_bucket{{{FW}, probe=~"$probe"}}[{RI}]))', "{{le}}", format="heatmap")],
                  kind="heatmap", unit="short", w=12,
                  description="Per-token calibrated probe probabilities (the histogram's buckets, as a heatmap).",
                  options={"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "unit": "percentunit"},
                           "rowsFrame": {"layout": "le"}, "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange",
                                                                    "scale": "exponential", "exponent": 0.5, "steps": 64},
                           "tooltip": {"mode": "single", "yHistogram": True}, "legend": {"show": True}}),
            ts("Probe score quantiles",
               *(Target(quantile(q, "featurewatch_probe_score", f'{FW}, probe=~"$probe"', by="probe"), f"{{{{probe}}}} p{round(q * 100)}")
                 for q in (0.5, 0.9, 0.99)),
               unit="percentunit", w=6, description="Per-token probe probability quantiles, per probe."),
            ts("Mean probe score",
               Target(f'sum by (probe) (rate(featurewatch_probe_score_sum{{{FW}, probe=~"$probe"}}[{RI}]))'
                      f' / sum by (probe) (rate(featurewatch_probe_score_count{{{FW}, probe=~"$probe"}}[{RI}]))', "{{probe}}"),
               unit="percentunit", w=6, description="Mean per-token probe probability."),
        ]),
        Row("Steering", [
            ts("Steering actions", Target(rate("featurewatch_steering_actions_total", FW, "rule, action, trigger, mode"),
                                          "{{rule}} {{action}} ({{trigger}}, {{mode}})"),
               w=12, stack=True, description="Steering directives issued (trigger=rule) or always-on policies applied (trigger=policy), per second; "
                                             "mode=shadow: computed and audited, never sent."),
            latency("Steering decision latency", "featurewatch_steering_decision_seconds", INST,
                    "From capture of the firing token in the worker to the directive sent back to the plugin.", qs=(0.5, 0.99), w=12),
            ts("Directives sent vs tokens steered",
               Target(rate("featurewatch_steering_actions_total", f'{FW}, mode="enforce"', "trigger, rule"), "sent: {{rule}} ({{trigger}})"),
               Target(rate("featurewatch_plugin_tokens_steered_total", FW, "kind, name"), "steered tokens: {{name}} ({{kind}})"),
               Target(rate("featurewatch_steering_actions_total", f'{FW}, mode="shadow"', "trigger, rule"), "shadow only: {{rule}} ({{trigger}})"),
               w=24,
               description="Per rule and policy: directive actions sent (trigger=rule) or requests a policy applied to (trigger=policy), "
                           "against the tokens the plugin's forward actually steered (counted in the forward, after its finiteness "
                           "guard). Sent but no tokens steered: steering is silently not applied. Shadow-mode steering is "
                           "counted but never sent."),
        ]),
        Row("Sidecar health", [
            ts("Plugin connection",
               Target(f"sum by (instance, engine) (featurewatch_plugin_connected{{{FW}}})", "{{instance}} engine {{engine}} connected"),
               Target(rate("featurewatch_plugin_reconnects_total", FW, "instance, engine", fn="increase"), "{{instance}} engine {{engine}} reconnects"),
               description="Plugin streams connected (1 per engine) and reconnects."),
            ts("Batches received and dropped",
               Target(rate("featurewatch_batches_received_total", FW), "received"),
               Target(rate("featurewatch_batches_dropped_total", INST, "reason"), "dropped in sidecar: {{reason}}"),
               Target(rate("featurewatch_plugin_batches_dropped_total", FW), "dropped in plugin (queue full)"),
               unit="ops", description="Activation batches per second; every drop is a monitoring gap, counted by reason."),
            ts("Queue fill",
               Target(f"max by (instance, stage) (featurewatch_queue_depth{{{INST}}}) / max by (instance, stage) (featurewatch_queue_capacity{{{INST}}})",
                      "{{instance}} {{stage}}"),
               unit="percentunit", description="Queue depth over capacity per pipeline stage; at 100 % batches are dropped (queue_full)."),
            latency("Encode latency", "featurewatch_encode_seconds", INST, "SAE/probe encode time per batch and layer.", qs=(0.5, 0.99)),
            latency("Token-to-verdict lag", "featurewatch_token_to_verdict_seconds", INST,
                    "From capture of a token in the vLLM worker to its evaluated verdict in the sidecar."),
            latency("Garbage-collector pauses", "featurewatch_gc_pause_seconds", INST,
                    "Python GC pauses in the sidecar (every thread stops); start-up objects are frozen out of them.",
                    qs=(0.99,)),
            ts("Plugin enqueue time per batch",
               Target(f"{rate('featurewatch_plugin_enqueue_seconds_total', FW)} / {rate('featurewatch_plugin_enqueued_batches_total', FW)}", "mean"),
               unit="s", description="What the forward pass pays to hand a batch to the plugin's sender (it never blocks on the sidecar)."),
            ts("Rule reloads", Target(rate("featurewatch_rule_reloads_total", INST, "result", fn="increase"), "{{result}}"),
               description="Rule reloads by result; on error the last good set stays in force."),
            ts("Events written and dropped",
               Target(rate("featurewatch_events_total", INST, "kind"), "{{kind}}"),
               Target(rate("featurewatch_events_dropped_total", INST, "reason"), "dropped: {{reason}}"),
               unit="ops", description="Alert/audit events to the event store (memory or Redis stream), and drops by reason."),
            ts("Store errors", Target(rate("featurewatch_store_errors_total", INST, "store, op", fn="increase"), "{{store}} {{op}}"),
               description="Errors talking to the rule/event store (Redis away: rules stay on the last good set, events are buffered)."),
        ]),
        Row("vLLM", [
            ts("vLLM requests running / waiting",
               Target(f"sum by (instance) (vllm:num_requests_running{{{FW}}})", "{{instance}} running"),
               Target(f"sum by (instance) (vllm:num_requests_waiting{{{FW}}})", "{{instance}} waiting"),
               description="vLLM's own scheduler gauges for the same model_name / instance."),
            latency("vLLM end-to-end request latency", "vllm:e2e_request_latency_seconds", FW, "vLLM's request latency histogram.", qs=(0.5, 0.99)),
            latency("vLLM time to first token", "vllm:time_to_first_token_seconds", FW, "vLLM's TTFT histogram.", qs=(0.5, 0.99)),
            ts("vLLM token throughput",
               Target(rate("vllm:prompt_tokens_total", FW), "prompt"),
               Target(rate("vllm:generation_tokens_total", FW), "generation"),
               unit="short", description="Tokens per second through vLLM."),
            ts("Monitored share of vLLM tokens",
               Target(f"max(sum by (layer) (rate(featurewatch_tokens_processed_total{{{FW}}}[{RI}])))"
                      f" / ({rate('vllm:prompt_tokens_total', FW)} + {rate('vllm:generation_tokens_total', FW)})", "monitored"),
               unit="percentunit",
               description="Tokens featurewatch evaluated over tokens vLLM processed. Below 100 %: prefix-cached prompt tokens, drops, or scope."),
            ts("vLLM KV cache usage", Target(f"max by (instance) (vllm:kv_cache_usage_perc{{{FW}}})", "{{instance}}"),
               unit="percentunit", description="vLLM KV-cache usage (1 = full)."),
        ]),
    ]


def variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str, description: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "description": description,
            "type": "query",
            "datasource": DS,
            "query": {"query": query, "refId": f"{name}-variable"},
            "definition": query,
            "refresh": 2,  # on time range change
            "sort": 1,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "regex": "",
            "hide": 0,
        }

    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        query_var("model_name", "Model",
                  'label_values({__name__=~"featurewatch_requests_total|featurewatch_plugin_connected|vllm:num_requests_running"}, model_name)',
                  "vLLM's served model name (the sidecar's model_name)."),
        query_var("instance", "Replica",
                  'label_values({__name__=~"featurewatch_rules_version|vllm:num_requests_running"}, instance)',
                  "One serving replica: vLLM and its featurewatch sidecar share the instance label."),
        query_var("rule", "Rule", "label_values(featurewatch_rule_info, rule)", "featurewatch alert rules."),
        query_var("probe", "Probe", 'label_values(featurewatch_probe_score_bucket{model_name=~"$model_name"}, probe)',
                  "Linear probes (probe banks)."),
    ]


def annotations() -> list[dict[str, Any]]:
    return [
        {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
         "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"},
        {"name": "Rule set changes", "datasource": DS, "enable": True, "iconColor": "purple",
         "expr": f"changes(featurewatch_rules_version{{{INST}}}[2m]) > 0", "step": "60s",
         "titleFormat": "featurewatch rules changed", "textFormat": "{{instance}}: rules version changed", "useValueForTime": False},
    ]


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row in rows():
        panels.append({"type": "row", "id": next_id, "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        x, row_h = 0, 0
        for p in row.panels:
            if x + p.w > 24:
                x, y = 0, y + row_h
                row_h = 0
            refs = "ABCDEFGHIJ"
            panel: dict[str, Any] = {
                "type": p.kind,
                "id": next_id,
                "title": p.title,
                "description": p.description,
                "datasource": DS,
                "gridPos": {"h": p.h, "w": p.w, "x": x, "y": y},
                "targets": [t.to_json(refs[i]) for i, t in enumerate(p.targets)],
                "fieldConfig": {
                    "defaults": {"unit": p.unit, "mappings": p.mappings, "custom": p.custom,
                                 "color": {"mode": "palette-classic" if p.kind == "timeseries" else "thresholds"},
                                 "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]}},
                    "overrides": p.overrides,
                },
                "options": p.options,
            }
            if p.kind == "heatmap":
                panel["fieldConfig"]["defaults"].pop("color")
            panels.append(panel)
            next_id += 1
            x += p.w
            row_h = max(row_h, p.h)
        y += row_h
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *({"type": "panel", "id": kind, "name": kind} for kind in sorted({p["type"] for p in panels if p["type"] != "row"})),
        ],
        "annotations": {"list": annotations()},
        "description": "featurewatch: SAE features, probe scores, alert rules and steering inside vLLM, with the sidecar's health beside vLLM's own metrics.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "liveNow": False,
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["featurewatch", "vllm", "llm", "interpretability"],
        "templating": {"list": variables()},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "featurewatch",
        "uid": "featurewatch",
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the generated one")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python dashboards/generate.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
