"""What an operator sees from a real `featurewatch serve` (issue 16): a warning (once) and a metric
when vLLM's served model name differs from the sidecar's `model_name`, and a clean stop — no
Triton/nanobind "leaked" lines (frozen objects were never collected at exit)."""

from __future__ import annotations

import time

from tests.support.plugin_client import PluginClient
from tests.support.sidecar import SidecarProcess, fixture_config, metric_value

D = 64


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_served_model_name_that_differs_is_warned_once_and_counted_and_the_stop_is_clean(tmp_path):
    proc = SidecarProcess(tmp_path, fixture_config(tmp_path, D)).start()  # model_name: test-model
    clients = []
    try:
        same = PluginClient(proc.socket_address, D, model_name="test-model", engine="same")
        same.plan()
        clients.append(same)
        for engine in ("0", "1"):
            client = PluginClient(proc.socket_address, D, model_name="served-name", engine=engine)
            client.plan()
            clients.append(client)
        wait_for(lambda: metric_value(proc.metrics(), "featurewatch_plugin_model_name_mismatch") == 2, "two mismatched")
        for client in clients[1:]:
            client.close()
        wait_for(lambda: metric_value(proc.metrics(), "featurewatch_plugin_model_name_mismatch") == 0, "streams gone")
    finally:
        for client in clients:
            client.close()
        proc.stop()
    log = proc.log()
    warnings = [line for line in log.splitlines() if "serves model 'served-name'" in line]
    assert len(warnings) == 1 and "model_name is 'test-model'" in warnings[0]
    assert "draining" in log
    assert "leaked" not in log and "nanobind" not in log, log[-3000:]
