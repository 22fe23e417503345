"""PluginStats are cumulative per plugin process: a plugin that reconnects resends its totals on the
new stream. The exported featurewatch_plugin_*_total must stay equal to the process's own counts
(keyed by the Hello's engine and instance), a new process counts from zero, and a count that went
backwards for the same identity (a restart) is a counter reset, never a negative increment."""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import generate_latest

from monitor.export.metrics import SidecarMetrics
from monitor.protocol import pb
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import SidecarProcess, fixture_config, metric_value

D = 64
ENGINE = "5"
INSTANCE = "vllm-host-a:4242"
P = "featurewatch_plugin_"
# exported counter -> how a test's expected totals name it
COUNTERS = {P + "batches_dropped_total": "dropped", P + "enqueued_batches_total": "enqueued",
            P + "enqueue_seconds_total": "seconds", P + "reconnects_total": "reconnects",
            P + "cached_prompt_tokens_total": "cached"}
STEERED = P + "tokens_steered_total"


def stats(dropped=0, enqueued=0, seconds=0.0, reconnects=0, cached=0, tapped=0, acme=0, r1=0) -> pb.PluginMessage:
    """One PluginStats message with cumulative counts, as the plugin reports them."""
    return pb.PluginMessage(stats=pb.PluginStats(
        batches_dropped_queue_full=dropped, enqueue_count=enqueued, batches_enqueued=enqueued,
        enqueue_seconds_sum=seconds, reconnects=reconnects, cached_prompt_tokens_untapped=cached,
        tokens_tapped=tapped, policy_tokens_steered={"acme": acme} if acme else {},
        rule_tokens_steered={"r1": r1} if r1 else {}))


def exported(text: str, engine: str = ENGINE) -> dict:
    out = {short: metric_value(text, name, engine=engine) for name, short in COUNTERS.items()}
    for line in text.splitlines():
        for key, kind in (("acme", "policy"), ("r1", "rule")):
            if line.startswith(STEERED + "{") and all(f'{k}="{v}"' in line for k, v in
                                                      (("engine", engine), ("kind", kind), ("name", key))):
                out[key] = out.get(key, 0.0) + float(line.split()[-1])
    return {"acme": 0.0, "r1": 0.0, **out}


def settled(sidecar: SidecarProcess, expected: dict, timeout: float = 60.0) -> dict:
    """The exported counts once every one has reached ``expected`` (the deadline only bounds a hang).
    A counter that double counts overshoots and stays there, so the caller's equality check fails."""
    deadline = time.monotonic() + timeout
    while True:
        now = exported(sidecar.metrics())
        if all(now[k] >= v - 1e-9 for k, v in expected.items()):
            return now
        assert time.monotonic() < deadline, f"stats never exported: have {now}, want {expected}"
        time.sleep(0.05)


def connected(sidecar: SidecarProcess) -> float:
    return metric_value(sidecar.metrics(), "featurewatch_plugin_connected", engine=ENGINE)


def wait_disconnected(sidecar: SidecarProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while connected(sidecar) != 0:
        assert time.monotonic() < deadline, "the closed stream never detached"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    with SidecarProcess(tmp, fixture_config(tmp, D)) as proc:
        yield proc


def session(sidecar: SidecarProcess, instance: str, *reports: pb.PluginMessage) -> None:
    """One stream of a plugin process: Hello, the reports, then the stream closes and detaches."""
    client = PluginClient(sidecar.socket_address, D, engine=ENGINE, instance=instance)
    try:
        client.plan()
        for report in reports:
            client.send(report)
    finally:
        client.half_close()
    try:
        wait_disconnected(sidecar)
    finally:
        client.close()


def test_reconnects_resend_cumulative_stats_without_double_counting(sidecar):
    first = dict(dropped=3, enqueued=10, seconds=0.5, reconnects=0, cached=7, acme=4, r1=2)
    session(sidecar, INSTANCE, stats(tapped=50, **first))
    assert settled(sidecar, first) == first
    # the same process reconnects three times; each new stream resends its totals (some grown)
    totals = first
    for n in range(1, 4):
        totals = dict(first, reconnects=n, enqueued=10 + n, seconds=0.5 + n, acme=4 + n)
        report = stats(tapped=50 + n, **totals)
        session(sidecar, INSTANCE, report, report)  # the same totals twice on one stream, too
        assert settled(sidecar, totals) == pytest.approx(totals)

    # another process (a new pid on the same host) is a new identity: its counts are added from zero
    other = dict(dropped=2, enqueued=4, seconds=0.25, reconnects=0, cached=1, acme=1, r1=1)
    session(sidecar, "vllm-host-a:5555", stats(tapped=9, **other))
    both = {k: totals[k] + other[k] for k in totals}
    assert settled(sidecar, both) == pytest.approx(both)

    # the first identity restarted (a container keeps host and pid): its counts went backwards; the
    # new counts are increases, as Prometheus treats a counter reset, never a negative increment
    restarted = dict(dropped=1, enqueued=2, seconds=0.125, reconnects=0, cached=1, acme=1, r1=0)
    session(sidecar, INSTANCE, stats(tapped=3, **restarted))
    after = {k: both[k] + restarted[k] for k in both}
    assert settled(sidecar, after) == pytest.approx(after)


# ---------------------------------------------------------------- the same rule on SidecarMetrics


def _metrics() -> SidecarMetrics:
    m = SidecarMetrics("m", max_engine_labels=2)
    m.engines.acquire(ENGINE)
    return m


def _enqueued(m: SidecarMetrics, engine: str = ENGINE) -> float:
    return metric_value(generate_latest(m.registry).decode(), P + "enqueued_batches_total", engine=engine)


def test_a_late_report_of_an_older_stream_is_not_a_restart():
    m = _metrics()
    m.plugin_stats(ENGINE, stats(enqueued=10).stats, stream=1, instance="5|h:1")
    m.plugin_stats(ENGINE, stats(enqueued=12).stats, stream=2, instance="5|h:1")  # reconnected
    m.plugin_stats(ENGINE, stats(enqueued=11).stats, stream=1, instance="5|h:1")  # the old stream's last, late
    assert _enqueued(m) == 12
    m.plugin_stats(ENGINE, stats(enqueued=13).stats, stream=2, instance="5|h:1")
    assert _enqueued(m) == 13


def test_a_non_finite_or_negative_seconds_sum_is_left_out():
    m = _metrics()
    for bad in (math.nan, math.inf, -1.0):
        m.plugin_stats(ENGINE, stats(enqueued=1, seconds=bad).stats, stream=1, instance="5|h:1")
    m.plugin_stats(ENGINE, stats(enqueued=2, seconds=0.5).stats, stream=1, instance="5|h:1")
    text = generate_latest(m.registry).decode()
    assert metric_value(text, P + "enqueue_seconds_total", engine=ENGINE) == 0.5
    assert _enqueued(m) == 2


def test_the_identity_table_is_bounded_and_forgets_a_reclaimed_label():
    m = _metrics()
    m.plugin_counts.limit = 3
    for pid in range(10):
        m.plugin_stats(ENGINE, stats(enqueued=1).stats, stream=pid + 1, instance=f"5|h:{pid}")
    assert len(m.plugin_counts) == 3
    assert _enqueued(m) == 10
    # the label is reclaimed for other engines: its series go, and so do the identities behind it,
    # so a process that comes back under a fresh label exports its whole cumulative count again
    m.engines.release(ENGINE)
    m.engines.acquire("a")
    m.engines.acquire("b")
    assert _enqueued(m) == 0 and len(m.plugin_counts) == 0
    m.engines.release("a")
    m.engines.acquire(ENGINE)
    m.plugin_stats(ENGINE, stats(enqueued=4).stats, stream=20, instance="5|h:9")
    assert _enqueued(m) == 4
