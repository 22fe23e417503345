"""Issue 10: what a buggy or malicious plugin stream can do to the sidecar (items 3, 4, 5, 11).

Against the real sidecar process over gRPC: one request's bad data costs no other request anything,
non-finite activations never reach a metric or an alert, a plugin for another model is refused at
Hello, and every per-stream queue and label set is bounded, with every loss counted.
"""

from __future__ import annotations

import math
import re
import threading
import time

import grpc
import numpy as np
import pytest

from monitor.config import SidecarConfig
from monitor.protocol import pb, pb_grpc
from monitor.receive.batch import decode_batch
from monitor.receive.wire import parse_plugin_message
from monitor.sidecar import Sidecar
from tests.support.dictionaries import planted_direction, planted_rules
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, fixture_config, metric_value

D = 64
AUTH = [("authorization", f"Bearer {ADMIN_TOKEN}")]
RULES = planted_rules()
MAX_BATCH_BYTES = 512 * 1024
OUTBOX_MESSAGES = 16
ENGINE_LABELS = 4
LIMITS = {"max_batch_bytes": MAX_BATCH_BYTES, "outbox_messages": OUTBOX_MESSAGES, "max_engine_labels": ENGINE_LABELS,
          "max_request_tokens": 1 << 20}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounds")
    (tmp / "rules.yaml").write_text(RULES)
    proc = SidecarProcess(tmp, fixture_config(tmp, D, rules_file=str(tmp / "rules.yaml"), limits=LIMITS))
    with proc:
        yield proc


def wait_until(predicate, what: str, timeout: float = 30.0):
    """Poll an observable condition (a deadline only against hanging, never a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
    return value


def rows(n: int, planted=(), seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((1, n, D)).astype(np.float32) * 0.05
    for i in planted:
        x[0, i] += 10 * planted_direction(D)
    return x


def fence(sidecar, client: PluginClient) -> None:
    """Everything this client sent before has been evaluated and acted on (alerts counted, directives
    handed to the stream) once the PluginStats sent now are exported: one pipeline thread, in order."""
    before = metric(sidecar, "featurewatch_plugin_enqueued_batches_total")
    client.fences = getattr(client, "fences", 0) + 1  # cumulative, as the plugin reports: +1 each time
    client.send(pb.PluginMessage(stats=pb.PluginStats(enqueue_count=client.fences)))
    wait_until(lambda: metric(sidecar, "featurewatch_plugin_enqueued_batches_total") >= before + 1, "the fence")


def metric(sidecar, name, **labels) -> float:
    return metric_value(sidecar.metrics(), name, **labels)


# ---------------------------------------------------------------- item 3: positions out of range

@pytest.mark.parametrize("bad_position", [2**63 - 1, 2**64 - 1, (1 << 20)], ids=["int64-max", "uint64-max", "over-limit"])
def test_an_absurd_position_costs_only_its_own_request(sidecar, bad_position):
    client = PluginClient(sidecar.socket_address, D)
    bad, good = f"bad-{bad_position}", f"good-{bad_position}"
    try:
        client.plan()
        before = metric(sidecar, "featurewatch_tokens_dropped_total", reason="position")
        client.start_request(bad)
        client.start_request(good)
        # the bad request's absurd position arrives first, co-batched with a good request ...
        client.send(PluginClient.batch(1, [1], rows(3), [bad, good], [0, 0, 1], [0, bad_position, 0],
                                       [False, True, False]))
        # ... and both keep being batched together: the good request's planted token must still alert
        client.send(PluginClient.batch(2, [1], rows(2, planted=[1], seed=1), [bad, good], [0, 1], [1, 1], [True, True]))
        directive = client.wait_for(lambda m: m.HasField("directive"), timeout=30).directive
        assert directive.request_id == good and directive.from_position == 2
        fence(sidecar, client)
        assert client.error is None
        # only the bad request's rows of the first batch were dropped, counted by reason
        assert metric(sidecar, "featurewatch_tokens_dropped_total", reason="position") - before == 2
        assert all(d.request_id != bad for d in client.directives())
    finally:
        client.close()
    assert sidecar.proc.poll() is None


# ---------------------------------------------------------------- item 4: NaN / Inf activations

def test_nonfinite_rows_never_reach_metrics_or_alerts(sidecar):
    client = PluginClient(sidecar.socket_address, D)
    try:
        client.plan()
        before = sidecar.metrics()
        ids = ["nan-row", "inf-row", "ninf-row", "fine-row"]
        for rid in ids:
            client.start_request(rid)
        x = rows(4, planted=[3], seed=2)
        u = planted_direction(D)
        x[0, 0, 5] = np.nan
        x[0, 1, int(np.argmax(u))] = np.inf  # alone, a +Inf along the planted direction fires both rules
        x[0, 2] = -np.inf
        client.send(PluginClient.batch(1, [1], x, ids, [0, 1, 2, 3], [0, 0, 0, 0], [True] * 4))
        directive = client.wait_for(lambda m: m.HasField("directive"), timeout=30).directive
        assert directive.request_id == "fine-row"
        fence(sidecar, client)
        after = sidecar.metrics()
        score_sum = metric_value(after, "featurewatch_probe_score_sum", probe="planted")
        assert math.isfinite(score_sum), score_sum
        assert metric_value(after, "featurewatch_tokens_dropped_total", reason="nonfinite") - \
            metric_value(before, "featurewatch_tokens_dropped_total", reason="nonfinite") == 3
        # the fine request fired each rule once; the Inf row fired nothing (its directive, had it
        # had one, would have come before the fine request's: same batch, lower request index)
        for rule in ("planted_feature", "planted_probe"):
            assert metric_value(after, "featurewatch_alerts_total", rule=rule) - \
                metric_value(before, "featurewatch_alerts_total", rule=rule) == 1, rule
        assert [d.request_id for d in client.directives()] == ["fine-row"]
    finally:
        client.close()


def test_nonfinite_rows_in_a_batch_group_are_dropped_as_alone(tmp_path):
    """Adaptive batching evaluates queued batches as one group: the NaN row of one part is left out
    exactly as when that batch is evaluated alone."""
    from monitor.receive.batch import BatchGroup

    def parts():
        out = []
        for step in range(3):
            x = rows(3, planted=[0, 2], seed=step)
            if step == 1:
                x[0, 0, 7] = np.nan
            raw = PluginClient.encoded_batch(step, [1], x, [f"g{step}", "shared"], [0, 1, 1], [0, step * 2, step * 2 + 1],
                                             [True] * 3)
            msg, data = parse_plugin_message(raw)
            out.append(decode_batch(msg.batch, D, {1}, 1 << 30, 1 << 20, data))
        return out
    send = lambda stream, directive: True  # noqa: E731
    key = lambda v: (v.rule.name, v.request.request_id, v.position)  # noqa: E731
    (tmp_path / "one").mkdir()
    (tmp_path / "group").mkdir()
    one, group = _steered_sidecar(tmp_path / "one"), _steered_sidecar(tmp_path / "group")
    try:
        alone = [key(v) for b in parts() for v in one.pipeline.process(b, None, send)]
        grouped = [key(v) for v in group.pipeline.process(BatchGroup.of(parts()), None, send)]
        assert sorted(alone) == sorted(grouped)
        assert ("planted_feature", "g1", 0) not in alone and ("planted_feature", "g0", 0) in alone
        for sc in (one, group):
            text = "\n".join(f"{s.name} {s.labels} {s.value}" for m in sc.metrics.registry.collect() for s in m.samples)
            assert "featurewatch_tokens_dropped_total {'reason': 'nonfinite'} 1.0" in text
    finally:
        for sc in (one, group):
            sc.worker.stop()
            sc.events.close()


def test_nonfinite_bf16_rows_are_dropped_too(sidecar):
    import torch

    client = PluginClient(sidecar.socket_address, D, dtype=pb.BFLOAT16)
    try:
        client.plan()
        before = metric(sidecar, "featurewatch_tokens_dropped_total", reason="nonfinite")
        x = torch.from_numpy(rows(2, planted=[0, 1], seed=3)).to(torch.bfloat16)
        x[0, 0, 0] = float("inf")
        wire = x.view(torch.int16).numpy()
        client.start_request("bf16-inf")
        client.start_request("bf16-fine")
        client.send(PluginClient.batch(1, [1], wire, ["bf16-inf", "bf16-fine"], [0, 1], [0, 0], [True, True],
                                       dtype=pb.BFLOAT16))
        directive = client.wait_for(lambda m: m.HasField("directive"), timeout=30).directive
        assert directive.request_id == "bf16-fine"
        fence(sidecar, client)
        assert metric(sidecar, "featurewatch_tokens_dropped_total", reason="nonfinite") - before == 1
        assert all(d.request_id != "bf16-inf" for d in client.directives())
    finally:
        client.close()


# ---------------------------------------------------------------- item 5: d_model mismatch

def test_a_plugin_for_another_model_width_is_refused_at_hello(sidecar):
    before = metric(sidecar, "featurewatch_plugin_streams_ended_total", reason="d_model_mismatch")
    client = PluginClient(sidecar.socket_address, 32)
    try:
        client._reader.join(30)
        assert not client._reader.is_alive()
        assert client.error is not None and client.error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = client.error.details()
        for part in ("d_model 32", "layer 1", "'sae'", "d_in 64", "'probes'"):
            assert part in details, details
        assert not any(m.HasField("plan") for m in client.received)  # no plan: it never gets to send batches
    finally:
        client.close()
    assert metric(sidecar, "featurewatch_plugin_streams_ended_total", reason="d_model_mismatch") - before == 1


def test_a_second_hello_with_another_width_ends_the_stream(sidecar):
    client = PluginClient(sidecar.socket_address, D, engine="rehello")
    try:
        client.plan()
        client.send(pb.PluginMessage(hello=pb.Hello(model_name="m", d_model=48, engine="rehello")))
        client._reader.join(30)
        assert client.error is not None and client.error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "d_model 48" in client.error.details()
    finally:
        client.close()
    wait_until(lambda: metric(sidecar, "featurewatch_plugin_connected", engine="rehello") == 0, "the stream to detach")


# ---------------------------------------------------------------- item 11: bounds

def _raw_stream(address: str, engine: str):
    """A plugin stream whose responses are never read (no BDP probing: the flow-control window
    stays small, so the sidecar's writes back up quickly)."""
    channel = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
    outgoing: list = [pb.PluginMessage(hello=pb.Hello(model_name="m", d_model=D, engine=engine)).SerializeToString()]
    cond = threading.Condition()

    def requests():
        sent = 0
        while True:
            with cond:
                while sent >= len(outgoing):
                    cond.wait()
                item = outgoing[sent]
            sent += 1
            if item is None:
                return
            yield item

    call = channel.stream_stream("/featurewatch.v1.Ingest/Stream", request_serializer=lambda b: b,
                                 response_deserializer=pb.SidecarMessage.FromString)(requests())

    def send(items):
        with cond:
            outgoing.extend(items)
            cond.notify_all()
    return channel, call, send


def test_a_plugin_that_never_reads_cannot_grow_the_sidecar(sidecar):
    before = sidecar.metrics()
    channel, call, send = _raw_stream(sidecar.socket_address, "deaf")
    try:
        # each batch on a layer outside the plan is rejected with an ack the plugin never reads
        bad = PluginClient.batch(1, [7], rows(1), ["r"], [0], [0], [True]).SerializeToString()
        sent = 0
        while metric(sidecar, "featurewatch_outbox_dropped_total", kind="ack") == 0:
            assert sent < 50_000, "acks never dropped: the outbox is not bounded"
            send([bad] * 500)
            sent += 500
            wait_until(lambda: metric(sidecar, "featurewatch_batches_dropped_total", reason="unknown_layer")
                       - metric_value(before, "featurewatch_batches_dropped_total", reason="unknown_layer") >= sent,
                       "the sidecar to read what was sent")
        text = sidecar.metrics()
        assert 0 < metric_value(text, "featurewatch_queue_depth", stage="outbox") <= OUTBOX_MESSAGES
        assert metric_value(text, "featurewatch_queue_capacity", stage="outbox") == OUTBOX_MESSAGES
        # a plan cannot be dropped like an ack: the stream is closed instead, and counted
        ended = metric_value(text, "featurewatch_plugin_streams_ended_total", reason="outbox_full")
        admin = pb_grpc.AdminStub(grpc.insecure_channel(sidecar.tcp_address))
        admin.SetSteering(pb.KillSwitchRequest(steering_enabled=False, author="test"), metadata=AUTH, timeout=10)
        admin.SetSteering(pb.KillSwitchRequest(steering_enabled=True, author="test"), metadata=AUTH, timeout=10)
        with pytest.raises(grpc.RpcError) as exc:
            for _ in call:
                pass
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_until(lambda: metric(sidecar, "featurewatch_plugin_streams_ended_total", reason="outbox_full") == ended + 1,
                   "the closed stream to be counted")
        wait_until(lambda: metric(sidecar, "featurewatch_plugin_connected", engine="deaf") == 0, "the stream to detach")
        assert metric(sidecar, "featurewatch_queue_depth", stage="outbox") == 0
    finally:
        send([None])
        call.cancel()
        channel.close()


def _engine_labels(text: str) -> set[str]:
    return set(re.findall(r'engine="([^"]*)"', text))


def test_engine_label_values_are_bounded_and_reclaimed(sidecar):
    wait_until(lambda: metric(sidecar, "featurewatch_plugin_connected") == 0, "earlier streams to detach")
    clients = []
    try:
        for i in range(ENGINE_LABELS + 2):  # more engines at once than the label budget
            clients.append(PluginClient(sidecar.socket_address, D, engine=f"first-{i}"))
        clients.append(PluginClient(sidecar.socket_address, D, engine="x" * 300))  # a label nobody wants
        for c in clients:
            c.plan()
            c.send(pb.PluginMessage(stats=pb.PluginStats(reconnects=1, enqueue_count=1)))

        def stats_in():
            text = sidecar.metrics()
            return text if metric_value(text, "featurewatch_plugin_enqueued_batches_total") >= len(clients) else None
        text = wait_until(stats_in, "every stream's stats")
        labels = _engine_labels(text)
        assert "other" in labels and not any(len(v) > 64 for v in labels)
        assert len(labels - {"other"}) <= ENGINE_LABELS, labels
        assert metric_value(text, "featurewatch_plugin_connected") == len(clients)
        assert metric_value(text, "featurewatch_plugin_connected", engine="other") == len(clients) - ENGINE_LABELS
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: metric(sidecar, "featurewatch_plugin_connected") == 0, "the streams to detach")
    # a new generation of engines reuses the freed label slots: the series of the old ones go away
    clients = [PluginClient(sidecar.socket_address, D, engine=f"second-{i}") for i in range(ENGINE_LABELS)]
    try:
        for c in clients:
            c.plan()
        labels = _engine_labels(sidecar.metrics())
        assert {f"second-{i}" for i in range(ENGINE_LABELS)} <= labels
        assert not any(v.startswith("first-") for v in labels), labels
    finally:
        for c in clients:
            c.close()


def test_a_message_over_the_grpc_limit_is_counted(sidecar):
    # earlier tests' streams end (cancelled: `aborted`) asynchronously: count from when all are gone
    wait_until(lambda: metric(sidecar, "featurewatch_plugin_connected") == 0, "earlier streams to detach")
    before = metric(sidecar, "featurewatch_plugin_streams_ended_total", reason="aborted")
    client = PluginClient(sidecar.socket_address, D)
    try:
        client.plan()
        client.send(b"\x12" + b"\x00" * (2 * MAX_BATCH_BYTES + 5 * 1024 * 1024))  # over 2 x max_batch_bytes + 4 MiB
        client._reader.join(30)
        assert client.error is not None and client.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        client.close()
    wait_until(lambda: metric(sidecar, "featurewatch_plugin_streams_ended_total", reason="aborted") == before + 1,
               "the broken stream to be counted")
    # a plugin that half-closes its stream ends it cleanly: counted apart
    wait_until(lambda: metric(sidecar, "featurewatch_plugin_connected") == 0, "the broken stream to detach")
    clean = metric(sidecar, "featurewatch_plugin_streams_ended_total", reason="plugin_closed")
    client = PluginClient(sidecar.socket_address, D)
    client.plan()
    client.half_close()
    client._reader.join(30)
    assert client.error is None
    client.close()
    wait_until(lambda: metric(sidecar, "featurewatch_plugin_streams_ended_total", reason="plugin_closed") == clean + 1,
               "the clean end to be counted")


def test_an_oversized_request_start_is_dropped_and_the_request_still_watched(sidecar):
    """A RequestStart is kept as long as its request is tracked: one with megabytes of metadata is
    dropped (counted); the request's batches are still evaluated."""
    client = PluginClient(sidecar.socket_address, D)
    try:
        client.plan()
        before = metric(sidecar, "featurewatch_batches_dropped_total", reason="control_oversized")
        client.start_request("fat-start", metadata={f"k{i}": "v" * 1000 for i in range(100)})
        client.send(PluginClient.batch(1, [1], rows(1, planted=[0]), ["fat-start"], [0], [0], [True]))
        directive = client.wait_for(lambda m: m.HasField("directive"), timeout=30).directive
        assert directive.request_id == "fat-start"
        assert metric(sidecar, "featurewatch_batches_dropped_total", reason="control_oversized") - before == 1
    finally:
        client.close()


def test_tcp_ingest_needs_the_ingest_token_when_one_is_set(tmp_path):
    proc = SidecarProcess(tmp_path, fixture_config(tmp_path, D), env={"FEATUREWATCH_INGEST_TOKEN": "ingest-secret"})
    hello = pb.PluginMessage(hello=pb.Hello(model_name="m", d_model=D)).SerializeToString()

    def first_reply(address: str, metadata=None):
        with grpc.insecure_channel(address) as channel:
            call = channel.stream_stream("/featurewatch.v1.Ingest/Stream", request_serializer=lambda b: b,
                                         response_deserializer=pb.SidecarMessage.FromString)(iter([hello]), metadata=metadata)
            try:
                return next(iter(call))
            except grpc.RpcError as exc:
                return exc
            finally:
                call.cancel()
    with proc:
        for metadata in (None, [("authorization", "Bearer wrong")]):
            refused = first_reply(proc.tcp_address, metadata)
            assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert metric_value(proc.metrics(), "featurewatch_plugin_streams_ended_total", reason="unauthenticated") == 2
        assert first_reply(proc.tcp_address, [("authorization", "Bearer ingest-secret")]).HasField("plan")
        assert first_reply(proc.socket_address).HasField("plan")  # the Unix socket: its file mode is the check


# ---------------------------------------------------------------- item 11: steering table

def _steered_sidecar(tmp_path, **limits) -> Sidecar:
    (tmp_path / "rules.yaml").write_text(RULES)
    cfg = fixture_config(tmp_path, D, socket=None, grpc_port=None, metrics_port=None, rules_file=str(tmp_path / "rules.yaml"),
                         limits=limits)
    return Sidecar(SidecarConfig.model_validate(cfg))


def _decoded(step, request_ids, planted):
    n = len(request_ids)
    raw = PluginClient.encoded_batch(step, [1], rows(n, planted=planted, seed=step), request_ids, list(range(n)), [0] * n,
                                     [True] * n)
    msg, data = parse_plugin_message(raw)
    return decode_batch(msg.batch, D, {1}, 1 << 30, 1 << 20, data)


def test_unfinished_steered_requests_leave_the_steering_table_on_eviction_and_expiry(tmp_path):
    sc = _steered_sidecar(tmp_path, max_tracked_requests=2)
    send = lambda stream, directive: True  # noqa: E731
    try:
        sc.pipeline.process(_decoded(1, ["steered-a"], planted=[0]), None, send)
        assert "steered-a" in sc.steering.steered
        sc.pipeline.process(_decoded(2, ["b", "c"], planted=[]), None, send)  # the table holds 2: a is evicted
        assert sc.requests.get("steered-a") is None
        assert "steered-a" not in sc.steering.steered
        sc.pipeline.process(_decoded(3, ["steered-d"], planted=[0]), None, send)
        assert "steered-d" in sc.steering.steered
        sc.requests.get("steered-d").touched -= sc.config.limits.request_idle_timeout_s + 1
        assert sc.requests.expire_idle() == 1
        assert "steered-d" not in sc.steering.steered
    finally:
        sc.worker.stop()
        sc.events.close()
