"""Every dashboard query against a real Prometheus that scraped a real sidecar (and vLLM metrics).

A real `featurewatch serve` (tests/support/sidecar.py) with the Redis rule/event store, driven by
the plugin's side of the gRPC stream (tests/support/plugin_client.py) with planted traffic: alerts,
rule-triggered and policy steering, a malformed batch, plugin stats, a rejected and an accepted
rules reload. vLLM's own series come from a static-but-advancing exposition of vLLM's metric
names (tests/deploy/fake_vllm.py): no vLLM engine runs here. Prometheus scrapes both every second
with one `instance` label, as deploy/prometheus/prometheus.yml does.

Then: the template variables are resolved the way Grafana does (label_values through the series
API), substituted into every panel target and annotation, and each query must return data.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time

import numpy as np
import pytest

from tests.deploy.deploy_helpers import REPO, PrometheusProcess, need_binary, wait_for
from tests.deploy.fake_vllm import FakeVllmMetrics

pytest.importorskip("tests.support.sidecar", reason="the sidecar test support is not in this tree")
from monitor.protocol import pb  # noqa: E402
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction, planted_rules  # noqa: E402
from tests.support.plugin_client import PluginClient  # noqa: E402
from tests.support.sidecar import SidecarProcess, fixture_config, metric_value  # noqa: E402

D = 64
INSTANCE = "replica-0"
RATE_INTERVAL = "4s"  # Grafana: max(4 x scrape interval, interval + scrape interval) at 1 s scrapes
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# tenant a's requests also match a policy in shadow mode (counted and audited, never sent)
RULES = planted_rules("    labels: {owner: security}\n") + (
    "  - name: tenant_a_shadow\n    selector: {tenant: a}\n    mode: shadow\n"
    f"    steer: [{{add: {{source: sae, feature: {PLANTED_FEATURE}, scale: -1.0}}}}]\n")
# Series that only exist once a store fails or an event is lost. The sidecar declares them (checked
# below); they get data when the failure happens, which this test does not stage.
FAILURE_ONLY = {"featurewatch_store_errors_total", "featurewatch_events_dropped_total"}


def activations(n: int, planted: list[int], seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((1, n, D)).astype(np.float32) * 0.05
    x[0, planted] += 10.0 * planted_direction(D)
    return x


class Traffic(threading.Thread):
    """Requests through the plugin stream until stopped: a planted generated token in every
    other request (feature + probe alerts, a steering directive), tenant b under a policy."""

    def __init__(self, client: PluginClient) -> None:
        super().__init__(daemon=True)
        self.client, self.stop_event, self.sent = client, threading.Event(), 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            step, n = 100, 0
            while not self.stop_event.is_set():
                rid = f"cmpl-live{n}-0-0000abcd"
                self.client.start_request(rid, f"cmpl-live{n}", {"tenant": "b" if n % 3 == 0 else "a"}, TRACEPARENT)
                prompt = activations(6, planted=[], seed=n)
                self.client.send(PluginClient.batch(step, [1], prompt, [rid], [0] * 6, range(6), [False] * 6))
                gen = activations(3, planted=[1] if n % 2 == 0 else [], seed=1000 + n)
                self.client.send(PluginClient.batch(step + 1, [1], gen, [rid], [0] * 3, range(6, 9), [True] * 3))
                self.client.finish_request(rid)
                self.client.send(pb.PluginMessage(stats=pb.PluginStats(
                    batches_enqueued=2 * (n + 1), batches_sent=2 * (n + 1), batches_dropped_queue_full=n // 4,
                    tokens_tapped=9 * (n + 1), enqueue_seconds_sum=0.0002 * (n + 1), enqueue_count=2 * (n + 1),
                    reconnects=1 + n // 10, cached_prompt_tokens_untapped=16 * (n + 1), queue_depth=n % 3, queue_capacity=64,
                    # what the plugin's forward steered: tenant b's policy, the feature rule's directives
                    policy_tokens_steered={"tenant_b_suppress": 9 * ((n + 2) // 3)},
                    rule_tokens_steered={"planted_feature": 2 * ((n + 1) // 2)})))
                step, n = step + 2, n + 1
                self.sent = n
                self.stop_event.wait(0.15)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def regex_escape(value: str) -> str:
    """Grafana's escaping of a variable value inside a PromQL regex matcher string."""
    return re.sub(r"([\\$^*{}\[\]'+?.()|])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str], range_s: int) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{range_s}s")
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${name}", regex_escape(values[name]))
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def has_data(result: dict) -> bool:
    for series in result["result"]:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        if any(not math.isnan(float(v)) for _, v in points):
            return True
    return False


def test_every_dashboard_query_returns_data(tmp_path, redis_server):
    prometheus_bin = need_binary("prometheus")
    dashboard = json.loads((REPO / "dashboards" / "featurewatch.json").read_text())

    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    config = fixture_config(tmp_path, D, rules_file=str(rules_path), rules_poll_interval_s=0.2,
                            store={"kind": "redis", "url": redis_server.url, "reconcile_interval_s": 1.0})
    vllm = FakeVllmMetrics(config["model_name"])
    vllm_port = vllm.start()
    sidecar = SidecarProcess(tmp_path, config)
    prometheus = None
    client = traffic = None
    try:
        sidecar.start()
        prometheus = PrometheusProcess(prometheus_bin, tmp_path / "prometheus", {
            "featurewatch": (f"127.0.0.1:{config['metrics_port']}", {"instance": INSTANCE}),
            "vllm": (f"127.0.0.1:{vllm_port}", {"instance": INSTANCE}),
        }, rule_files=[REPO / "deploy" / "prometheus" / "rules" / "featurewatch.rules.yml"]).start()
        started = time.time()
        # Prometheus syncs its first targets up to 5 s after start: let it scrape the idle state
        # first, so the changes made below are seen as changes.
        wait_for(lambda: len(prometheus.api("query", query="up == 1")["result"]) == 2, timeout=20, interval=0.2,
                 what="prometheus to scrape the sidecar and vLLM")

        client = PluginClient(sidecar.socket_address, D, model_name=config["model_name"])
        client.plan()
        traffic = Traffic(client)
        traffic.start()
        # A malformed batch: counted in featurewatch_batches_dropped_total{reason}.
        bad = PluginClient.batch(1, [1], activations(2, [], 0), ["r"], [0, 0], [0, 1], [True, True])
        bad.batch.activations.data = bad.batch.activations.data[:-4]
        client.send(bad)
        # A rejected reload (last good set stays), then an accepted one (version changes): each
        # waits for the sidecar to have seen the previous write, not for a time to pass.
        version = metric_value(sidecar.metrics(), "featurewatch_rules_version")
        rules_path.write_text("rules: [{name: broken}]\n")
        wait_for(lambda: metric_value(sidecar.metrics(), "featurewatch_rule_reloads_total", result="error") >= 1,
                 timeout=60, interval=0.1, what="the sidecar to refuse the broken rules file")
        rules_path.write_text(RULES.replace("above: 0.9", "above: 0.8"))
        wait_for(lambda: metric_value(sidecar.metrics(), "featurewatch_rules_version") != version,
                 timeout=60, interval=0.1, what="the sidecar to apply the fixed rules file")

        checks = {
            "reload error scraped": 'count_over_time(featurewatch_rule_reloads_total{result="error"}[1m])',
            "rules version changed": "changes(featurewatch_rules_version[1m]) > 0",
            "alerts scraped 4 times": "count_over_time(featurewatch_alerts_total[1m]) >= 4",
        }
        pending: list[str] = []

        def scraped_enough() -> bool:
            pending[:] = [name for name, q in checks.items() if not prometheus.api("query", query=q)["result"]]
            if traffic.sent <= 20:
                pending.append(f"traffic ({traffic.sent} requests sent)")
            return not pending

        try:
            wait_for(scraped_enough, timeout=30, interval=0.5, what="prometheus to scrape the planted traffic")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: still waiting for {pending}; traffic error {traffic.error!r}\n"
                                 f"sidecar log:\n{sidecar.log()[-3000:]}") from None
        # a few more scrapes with traffic flowing (counted, not waited for by the clock)
        def scrapes() -> float:
            result = prometheus.api("query", query="sum(count_over_time(featurewatch_rules_version[10m]))")["result"]
            return float(result[0]["value"][1]) if result else 0.0
        seen = scrapes()
        wait_for(lambda: scrapes() >= seen + 3, timeout=60, interval=0.2, what="three more scrapes")
        traffic.stop_event.set()
        traffic.join(5)
        assert traffic.error is None, traffic.error
        end = time.time()
        range_s = int(end - started) + 1

        # Template variables, resolved like Grafana (label_values over the series API), in order.
        values: dict[str, str] = {}
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"]).groups()
            selector = substitute(selector, values, range_s)
            series = prometheus.api("series", **{"match[]": selector, "start": started, "end": end})
            found = sorted({s[label] for s in series if label in s})
            assert found, f"variable {var['name']}: {var['query']['query']} found nothing"
            values[var["name"]] = found[0]
        assert values["model_name"] == config["model_name"] and values["instance"] == INSTANCE

        failures, empty_failure_only = [], []
        for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
            for target in panel["targets"]:
                expr = substitute(target["expr"], values, range_s)
                if target["instant"]:
                    result = prometheus.api("query", query=expr, time=end)
                else:
                    result = prometheus.api("query_range", query=expr, start=started, end=end, step=1)
                if has_data(result):
                    continue
                metrics = set(re.findall(r"(featurewatch_\w+)\{", expr))
                if metrics and metrics <= FAILURE_ONLY:
                    empty_failure_only.append(expr)
                else:
                    failures.append(f"{panel['title']!r} [{target['refId']}]: {expr}")
        assert not failures, "queries without data:\n" + "\n".join(failures)

        # The failure-only series are declared by the sidecar under these exact names.
        exposition = sidecar.metrics()
        for name in FAILURE_ONLY:
            assert re.search(rf"^# TYPE {name.removesuffix('_total')}(_total)? counter$", exposition, re.M), name
        print("failure-only queries without data:", empty_failure_only)
        assert len(empty_failure_only) <= 2, empty_failure_only

        for annotation in dashboard["annotations"]["list"]:
            if "expr" in annotation:
                expr = substitute(annotation["expr"], values, range_s)
                result = prometheus.api("query_range", query=expr, start=started, end=end, step=1)
                assert has_data(result), f"annotation {annotation['name']!r}: {expr}"

        # The "Alert rate by rule" panel shows exemplars: trace ids reached Prometheus.
        exemplars = prometheus.api("query_exemplars", query="featurewatch_alerts_total", start=started, end=end)
        trace_ids = {e["labels"].get("trace_id") for group in exemplars for e in group["exemplars"]}
        assert TRACEPARENT.split("-")[1] in trace_ids

        # The shipped alerting rules work on the real sidecar's series: the generic rule carries the
        # featurewatch rule's severity and owner (from featurewatch_rule_info) for Alertmanager.
        firing = prometheus.api("query", query='ALERTS{alertname="FeaturewatchRuleFired", alertstate="firing"}', time=end)
        routed = {(a["metric"]["rule"], a["metric"]["severity"], a["metric"].get("owner")) for a in firing["result"]}
        assert ("planted_feature", "critical", "trust-safety") in routed, routed
        assert ("planted_probe", "warning", "security") in routed, routed

        # The events went through the Redis store: alerts and the rule changes are in the stream.
        from monitor.stores.redis import RedisEventStore

        stream = RedisEventStore(redis_server.url)
        try:
            kinds = {e["kind"] for e in stream.tail(500)}
        finally:
            stream.close()
        assert {"alert", "steering", "rules"} <= kinds
    finally:
        if traffic is not None:
            traffic.stop_event.set()
        if client is not None:
            client.close()
        if prometheus is not None:
            prometheus.stop()
        sidecar.stop()
        vllm.stop()
