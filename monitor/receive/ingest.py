"""The plugin's ingest stream: Hello -> plan; batches validated then queued for the pipeline;
acks, plans and directives back through a bounded outbox.

What one stream can cost the sidecar is bounded here: a Hello for another model width is refused,
every reply waits in an outbox bounded in messages and bytes (acks beyond it are dropped, a plan
or directive that does not fit closes the stream: a plugin that does not read cannot be steered),
its engine label comes from a bounded set, and every way a stream ends is counted
(`featurewatch_plugin_streams_ended_total{reason}`).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import grpc

from monitor.protocol import pb
from monitor.receive.batch import BatchRejected, decode_batch
from monitor.receive.shm import ShmIngest
from monitor.receive.wire import DecodeError, parse_plugin_message

log = logging.getLogger(__name__)
CREDIT_EVERY = 32
MAX_HELLO_BYTES = 64 * 1024  # a Hello is kept for the stream's lifetime: names and a layer list, never more
# RequestStart (ids, trace context, flat metadata) is kept per tracked request; RequestFinish and
# PluginStats are a few fields. Larger ones are dropped and counted (`control_oversized`).
MAX_CONTROL_BYTES = 16 * 1024


class Outbox:
    """Replies waiting to be written to one plugin, bounded in messages and bytes. ``put`` never
    blocks (it runs on the event loop and, for directives, is scheduled from the pipeline thread);
    ``get`` waits, and returns None once the outbox is closed and empty."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._items: deque = deque()
        self._bytes = 0
        self._closed = False
        self._waiter: asyncio.Future | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, msg: pb.SidecarMessage) -> bool:
        """False (nothing queued) when closed or full."""
        size = msg.ByteSize()
        if self._closed or len(self._items) >= self.max_messages or self._bytes + size > self.max_bytes:
            return False
        self._items.append((msg, size))
        self._bytes += size
        self._wake()
        return True

    def get_nowait(self) -> pb.SidecarMessage | None:
        if not self._items:
            return None
        msg, size = self._items.popleft()
        self._bytes -= size
        return msg

    async def get(self) -> pb.SidecarMessage | None:
        while not self._items and not self._closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def close(self, discard: bool = False) -> None:
        """No more puts; ``get`` drains what is queued (nothing if ``discard``), then returns None."""
        self._closed = True
        if discard:
            self._items.clear()
            self._bytes = 0
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@dataclass(eq=False)
class PluginStream:
    """One connected plugin: what it said in Hello, its label, and its outbound messages."""

    id: int
    hello: pb.Hello
    outbox: Outbox = field(default_factory=lambda: Outbox(4096, 64 << 20))
    allowed_layers: set = field(default_factory=set)
    received: int = 0
    label: str | None = None  # the `engine` label this stream's series use (bounded set; see LabelBudget)
    metrics: object = None
    context: object = None  # the RPC's servicer context, to end the stream from outside its handler
    end_reason: str | None = None  # why the sidecar ended the stream (None: the plugin or the transport did)
    end_status: tuple | None = None  # (grpc.StatusCode, details) the plugin gets
    writing: bool = False  # the handler is waiting for a write to go out (to a plugin that may not read)
    closer: asyncio.Task | None = None
    ring: object = None  # this stream's shared-memory ring (monitor.receive.shm), None: bytes only
    lane: object = None  # the ring's lane for descriptors and requests (monitor.receive.lane), if any
    lane_reader: object = None  # reads the lane once the plugin opened it

    @property
    def engine(self) -> str:
        return self.label if self.label is not None else (self.hello.engine or "0")

    def reply(self, msg: pb.SidecarMessage) -> bool:
        """Queue a message for the plugin. An ack that does not fit is dropped (acks are advisory);
        a plan or directive that does not fit ends the stream, so the plugin reconnects and starts
        again from a fresh plan instead of running on a state it never received."""
        if self.outbox.put(ShmIngest.announce(self, msg)):
            return True
        kind = msg.WhichOneof("kind")
        if self.end_reason is None and self.metrics is not None:
            self.metrics.outbox_dropped.labels(kind).inc()
        if kind != "ack":
            self.end("outbox_full", grpc.StatusCode.RESOURCE_EXHAUSTED,
                     f"outbox full ({len(self.outbox)} messages unread): the plugin does not read its replies")
        return False

    def end(self, reason: str, code: grpc.StatusCode, details: str) -> None:
        """End the stream from the sidecar's side (on the event loop): counted once as ``reason``.
        The handler sends the status when it next waits for a reply; if it is stuck writing to a
        plugin that does not read, the status is sent from here (that write is abandoned)."""
        if self.end_reason is not None:
            return
        self.end_reason, self.end_status = reason, (code, details)
        self.outbox.close(discard=True)
        log.warning("plugin stream %d (engine %s) closed: %s", self.id, self.engine, details)
        if self.writing and self.context is not None:
            self.closer = asyncio.get_running_loop().create_task(_abort(self.context, code, details))


async def _abort(context, code: grpc.StatusCode, details: str) -> None:
    try:
        await context.abort(code, details)
    except BaseException:  # noqa: BLE001 - abort raises by design; the RPC is over either way
        pass


def width_mismatch(hello: pb.Hello, dictionaries) -> str | None:
    """Why this plugin's residual stream cannot feed the configured dictionaries, or None."""
    if dictionaries is None:
        return None
    wrong = []
    for name, cfg in dictionaries.configs.items():
        encoder = dictionaries.saes.get(name) or dictionaries.probes.get(name)
        d_in = getattr(encoder, "d_in", None)
        if d_in is not None and d_in != hello.d_model:
            wrong.append(f"layer {cfg.layer} {cfg.kind} {name!r} d_in {d_in}")
    if not wrong:
        return None
    return (f"plugin d_model {hello.d_model} (model {hello.model_name[:80]!r}) does not match the sidecar's "
            f"dictionaries: {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}; "
            f"is the sidecar configured for this model?")


class IngestService:
    """Reads one plugin's stream: Hello -> plan; batches validated then queued for the pipeline."""

    def __init__(self, sidecar) -> None:
        self.sidecar = sidecar
        self._ids = itertools.count(1)
        limits = sidecar.config.limits
        self.max_outbox = (limits.outbox_messages, limits.outbox_bytes)
        self.shm = ShmIngest(sidecar)
        metrics = sidecar.metrics
        metrics.queue_capacity.labels("outbox").set(self.max_outbox[0])
        metrics.queue_depth.labels("outbox").set_function(lambda: sum(len(s.outbox) for s in list(sidecar.streams)))

    def handler(self) -> grpc.GenericRpcHandler:
        """Ingest.Stream receiving raw bytes, parsed by :func:`parse_plugin_message` (no copy of the
        activations) instead of the generated deserializer."""
        return grpc.method_handlers_generic_handler("featurewatch.v1.Ingest", {
            "Stream": grpc.stream_stream_rpc_method_handler(
                self.Stream, request_deserializer=None, response_serializer=pb.SidecarMessage.SerializeToString)})

    async def Stream(self, request_iterator, context):
        sc = self.sidecar
        ended = sc.metrics.plugin_streams_ended
        token = sc.config.ingest_token
        if token and not context.peer().startswith("unix:"):  # TCP: anyone who reaches the port could feed it
            sent = dict(context.invocation_metadata() or ()).get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                ended.labels("unauthenticated").inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"Ingest over TCP needs 'authorization: Bearer ${sc.config.ingest_token_env}'")
        try:
            raw = await request_iterator.__anext__()
        except StopAsyncIteration:
            raw = b""
        try:
            first, _ = parse_plugin_message(raw)
        except DecodeError:
            first = pb.PluginMessage()
        if first.WhichOneof("kind") != "hello":
            sc.metrics.batches_dropped.labels("no_hello").inc()
            ended.labels("no_hello").inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "first message on the stream must be Hello")
        if len(raw) > MAX_HELLO_BYTES:
            ended.labels("bad_hello").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Hello of {len(raw)} bytes > {MAX_HELLO_BYTES}")
        problem = width_mismatch(first.hello, getattr(sc, "dictionaries", None))
        if problem:
            ended.labels("d_model_mismatch").inc()
            log.error("plugin refused at Hello: %s", problem)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        stream = PluginStream(next(self._ids), first.hello, outbox=Outbox(*self.max_outbox),
                              label=sc.metrics.engines.acquire(first.hello.engine or "0"), metrics=sc.metrics,
                              context=context)
        reason = "aborted"  # unless the loop below ends in one of the ways it knows
        try:
            self.shm.open(stream, context.peer())
            sc.attach(stream)
            reader = asyncio.create_task(self._read(request_iterator, stream))
            try:
                while (msg := await stream.outbox.get()) is not None:
                    stream.writing = True
                    yield msg
                    stream.writing = False
                if stream.closer is not None:  # the sidecar ended it while a write was stuck
                    await stream.closer
                    return
                if stream.end_status is not None:  # the sidecar ended it
                    await context.abort(*stream.end_status)
                # The plugin half-closed (or the transport gave up: the core failed its read, e.g. a
                # message over the gRPC size limit, and cancelled the call). A last ack tells them
                # apart: on a cancelled call it never gets out, and this generator is closed here.
                yield pb.SidecarMessage(ack=pb.Ack(step=0, credits=sc.free_slots()))
                reason = "error" if reader.done() and not reader.cancelled() and reader.result() else "plugin_closed"
            finally:
                reader.cancel()
        finally:
            ended.labels(stream.end_reason or reason).inc()
            sc.detach(stream)
            self.shm.close(stream)  # batches still queued keep their slots mapped until processed
            sc.metrics.engines.release(stream.label)
            sc.worker.call(lambda: sc.metrics.plugin_restarted(stream.label, stream.id))  # after its queued stats

    async def _read(self, request_iterator, stream: PluginStream) -> bool:
        """Read until the plugin half-closes; True when the stream broke on an error instead."""
        try:
            async for raw in request_iterator:
                if not self._message(raw, stream):
                    return False
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - transport errors end this stream only
            if stream.end_reason is not None:  # the sidecar aborted the call: reads fail from then on
                return False
            log.info("plugin stream %d ended: %s", stream.id, exc)
            self.sidecar.metrics.batches_dropped.labels("transport").inc()
            return True
        finally:
            self.shm.drain_lane(stream)  # what the plugin sent on its lane before it closed the stream
            stream.outbox.close()  # the handler writes what is queued, then ends

    def _message(self, raw: bytes | None, stream: PluginStream, lane: bool = False) -> bool:
        """One message from the stream (or, ``lane``, from its lane); False: the stream is ended."""
        sc = self.sidecar
        if raw is None:  # a lane packet over MAX_PACKET, cut short
            sc.metrics.batches_dropped.labels("oversized").inc()
            return True
        try:
            msg, data = parse_plugin_message(raw)
        except DecodeError as exc:
            sc.metrics.batches_dropped.labels("malformed").inc()
            log.debug("undecodable message (%d bytes) on stream %d: %s", len(raw), stream.id, exc)
            return True
        kind = msg.WhichOneof("kind")
        if lane:
            self.shm.lane_packets.labels(kind or "none").inc()
            if kind not in ("batch", "request_start", "request_finish", "stats"):
                sc.metrics.batches_dropped.labels("malformed").inc()
                return True
        if kind == "batch":
            self._batch(msg.batch, stream, data)
        elif kind in ("request_start", "request_finish", "stats"):
            if len(raw) > MAX_CONTROL_BYTES:
                sc.metrics.batches_dropped.labels("control_oversized").inc()
                log.debug("%s of %d bytes dropped on stream %d", kind, len(raw), stream.id)
                return True
            sc.submit(stream, msg)
        elif kind == "lane_open":
            self.shm.open_lane(stream, msg.lane_open, lambda packet: self._message(packet, stream, lane=True))
        elif kind == "hello":
            problem = width_mismatch(msg.hello, getattr(sc, "dictionaries", None))
            if problem or len(raw) > MAX_HELLO_BYTES:
                stream.end("d_model_mismatch" if problem else "bad_hello", grpc.StatusCode.FAILED_PRECONDITION,
                           problem or f"Hello of {len(raw)} bytes > {MAX_HELLO_BYTES}")
                return False
            stream.hello = msg.hello  # the engine label stays the one the stream started with
            sc.attach(stream)
        return stream.end_reason is None

    def _batch(self, msg: pb.ActivationBatch, stream: PluginStream, data=None) -> None:
        sc = self.sidecar
        stream.received += 1
        sc.metrics.batches_received.labels(sc.config.model_name, stream.engine).inc()
        limits = sc.config.limits
        try:
            data = self.shm.data(stream, msg, data)
            batch = decode_batch(msg, stream.hello.d_model, stream.allowed_layers, limits.max_batch_bytes,
                                 limits.max_tokens_per_batch, data, limits.max_request_tokens)
        except BatchRejected as exc:
            sc.metrics.batches_dropped.labels(exc.reason).inc()
            log.debug("rejected batch %d from stream %d: %s", msg.step, stream.id, exc)
            stream.reply(pb.SidecarMessage(ack=pb.Ack(step=msg.step, rejected_reason=str(exc)[:200])))
            return
        for reason, n in batch.dropped.items():
            sc.metrics.tokens_dropped.labels(reason).inc(n)
        if not sc.enqueue_batch(stream, batch):
            stream.reply(pb.SidecarMessage(ack=pb.Ack(step=msg.step, rejected_reason="queue_full")))
        elif stream.received % CREDIT_EVERY == 0:
            stream.reply(pb.SidecarMessage(ack=pb.Ack(step=msg.step, credits=sc.free_slots())))
