"""featurewatch_plugin_tokens_steered_total: the plugin's cumulative per-policy / per-rule counts
(PluginStats) exported as increases, across reconnects and restarts, with bounded labels."""

from __future__ import annotations

import re

from prometheus_client import generate_latest

from monitor.export.metrics import SidecarMetrics
from monitor.protocol import pb

NAME = "featurewatch_plugin_tokens_steered_total"


def _stats(tapped: int, policies: dict | None = None, rules: dict | None = None) -> pb.PluginStats:
    return pb.PluginStats(tokens_tapped=tapped, policy_tokens_steered=policies or {},
                          rule_tokens_steered=rules or {})


def metric_value(text: str, metric: str, **labels) -> float:
    """Sum of the samples of ``metric`` carrying ``labels`` (a label may be called ``name``)."""
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(metric + "{") and all(re.search(f'[{{,]{k}="{v}"', line) for k, v in labels.items()))


def _value(m: SidecarMetrics, **labels) -> float:
    return metric_value(generate_latest(m.registry).decode(), NAME, **labels)


def _metrics() -> SidecarMetrics:
    m = SidecarMetrics("m", max_engine_labels=2)
    m.engines.acquire("0")
    return m


def test_increases_are_exported_per_kind_and_name():
    m = _metrics()
    m.plugin_stats("0", _stats(10, {"acme": 5}, {"r1": 2}), stream=1, instance="h:1")
    m.plugin_stats("0", _stats(20, {"acme": 9}, {"r1": 2, "r2": 3}), stream=1, instance="h:1")
    assert _value(m, kind="policy", name="acme", engine="0", model_name="m") == 9
    assert _value(m, kind="rule", name="r1") == 2 and _value(m, kind="rule", name="r2") == 3


def test_a_reconnect_continues_and_a_restart_starts_from_zero():
    m = _metrics()
    m.plugin_stats("0", _stats(10, {"acme": 5}), stream=1, instance="h:1")
    m.plugin_restarted("0", 1)  # the stream ended; the same process reconnects on stream 2
    m.plugin_stats("0", _stats(12, {"acme": 7}), stream=2, instance="h:1")
    assert _value(m, name="acme") == 7  # not 5 + 7
    # the process restarted with the same host:pid (a container): its counts went down
    m.plugin_stats("0", _stats(3, {"acme": 2}), stream=3, instance="h:1")
    assert _value(m, name="acme") == 9
    m.plugin_stats("0", _stats(4, {"acme": 4}), stream=3, instance="h:1")
    assert _value(m, name="acme") == 11
    # two processes count separately
    m.plugin_stats("0", _stats(1, {"acme": 1}), stream=4, instance="h:2")
    assert _value(m, name="acme") == 12


def test_names_are_bounded_and_go_with_their_engine_label():
    m = _metrics()
    m.STEERED_NAMES = 2
    m.plugin_stats("0", _stats(1, {"a": 1, "b": 1, "c": 1, "bad name!": 1}, {"other": 1}), stream=1, instance="i")
    text = generate_latest(m.registry).decode()
    names = {re.search(r'[{,]name="([^"]*)"', line).group(1) for line in text.splitlines() if line.startswith(NAME)}
    assert len(names - {"other"}) == 2 and names <= {"a", "b", "c", "other"}, names  # map order is arbitrary
    assert metric_value(text, NAME, kind="policy", name="other") == 2  # the third and the malformed name
    assert metric_value(text, NAME, kind="rule", name="other") == 1
    # the engine label is reclaimed for another engine: its series go
    m.engines.release("0")
    m.engines.acquire("1")
    m.engines.acquire("2")
    lines = generate_latest(m.registry).decode().splitlines()
    assert not [line for line in lines if line.startswith(NAME)]
