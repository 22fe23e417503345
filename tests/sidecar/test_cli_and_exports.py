"""CLI commands against a real sidecar, OTel span parenting, exemplars, stub currency, SIGTERM drain."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from monitor.config import SidecarConfig
from monitor.evaluate.state import RequestInfo
from monitor.receive.batch import decode_batch
from monitor.sidecar import Sidecar
from tests.sidecar.test_sidecar_grpc import RULES, TRACEPARENT, rows
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, fixture_config

D = 64
ROOT = Path(__file__).resolve().parents[2]


def cli(*args, env_token: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {"FEATUREWATCH_ADMIN_TOKEN": ADMIN_TOKEN} if env_token else {}
    import os

    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120, **kw)


def test_generated_stubs_are_current():
    result = subprocess.run(["bash", "scripts/gen_proto.sh", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_rules_validate_reports_file_rule_field(tmp_path):
    config = fixture_config(tmp_path, D)
    (tmp_path / "fw.yaml").write_text(json.dumps(config))
    good = tmp_path / "good.yaml"
    good.write_text(RULES)
    ok = cli("rules", "validate", str(good), "--config", str(tmp_path / "fw.yaml"))
    assert ok.returncode == 0 and "2 rules, 1 policies valid (schema and references)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(RULES.replace("feature: 3}", "feature: 77}", 1))
    failed = cli("rules", "validate", str(bad), "--config", str(tmp_path / "fw.yaml"))
    assert failed.returncode == 2
    assert f"{bad}: rule 'planted_feature' field 'signal.feature': feature 77 out of range" in " ".join(failed.stderr.split())


def test_rules_apply_and_alerts_tail_against_a_running_sidecar(tmp_path):
    with SidecarProcess(tmp_path, fixture_config(tmp_path, D)) as sc:
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES)
        applied = cli("rules", "apply", str(rules), "--address", sc.tcp_address, "--author", "carol")
        assert applied.returncode == 0, applied.stderr
        assert "2 rules, 1 policies applied as version 1" in applied.stdout
        denied = cli("rules", "apply", str(rules), "--address", sc.tcp_address, "--token", "nope")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        client = PluginClient(sc.socket_address, D)
        client.plan()
        client.start_request("req-1-abcdef12", "cmpl-req-1")
        client.send(PluginClient.batch(1, [1], rows(1, planted=[0]), ["req-1-abcdef12"], [0], [7], [True]))
        client.wait_for(lambda m: m.HasField("directive"))
        client.close()
        tail = cli("alerts", "tail", "--address", sc.tcp_address, "--json", "-n", "50")
        events = [json.loads(line) for line in tail.stdout.splitlines()]
        assert {"rules", "alert", "steering"} <= {e["kind"] for e in events}
        alert = next(e for e in events if e["kind"] == "alert")
        assert alert["api_request_id"] == "cmpl-req-1" and alert["position"] == 7
        assert any(e["kind"] == "rules" and e.get("author") == "carol" for e in events)
        # Exemplars: the OpenMetrics exposition carries the alert's trace id when the request had one.
        req = urllib.request.Request(sc.metrics_url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        text = urllib.request.urlopen(req, timeout=5).read().decode()
        assert 'featurewatch_alerts_total{model_name="test-model",rule="planted_feature",severity="critical"} 1.0' in text
        assert sc.stop() == 0  # SIGTERM drains and exits cleanly
        assert "draining" in sc.log()


def test_alert_and_steering_spans_are_siblings_under_the_requests_parent(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULES)
    raw = fixture_config(tmp_path, D, rules_file=str(tmp_path / "rules.yaml"), socket=None, grpc_port=None,
                         metrics_port=None, tracing={"exporter": "memory"})
    sidecar = Sidecar(SidecarConfig.model_validate(raw))
    try:
        sidecar.pipeline.request_started(RequestInfo("r-0-00000000", "cmpl-r", {}, TRACEPARENT), 1, 0)
        msg = PluginClient.batch(1, [1], rows(1, planted=[0]), ["r-0-00000000"], [0], [3], [True])
        batch = decode_batch(msg.batch, D, {1}, 1 << 20, 1 << 16)
        sent = []
        verdicts = sidecar.pipeline.process(batch, None, lambda stream, d: sent.append(d) or True)
        assert [v.rule.name for v in verdicts] == ["planted_feature"] and len(sent) == 1
        spans = {s.name: s for s in sidecar.tracing.memory_exporter.get_finished_spans()}
        assert set(spans) == {"featurewatch.alert", "featurewatch.steer"}
        for span in spans.values():
            assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
            assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
        assert spans["featurewatch.alert"].attributes["gen_ai.security.decision.type"] == "warn"
        assert spans["featurewatch.steer"].attributes["gen_ai.security.decision.type"] == "modify"
    finally:
        sidecar.events.close()
        sidecar.tracing.shutdown()
