"""gRPC services: the plugin's ingest stream and the operators' admin API (bearer token)."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
from dataclasses import dataclass, field

import grpc

from monitor.evaluate.rules import RulesInvalid
from monitor.protocol import pb, pb_grpc
from monitor.receive.batch import BatchRejected, decode_batch
from monitor.receive.wire import DecodeError, parse_plugin_message

log = logging.getLogger(__name__)
CREDIT_EVERY = 32


@dataclass(eq=False)
class PluginStream:
    """One connected plugin: what it said in Hello and its outbound message queue."""

    id: int
    hello: pb.Hello
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    allowed_layers: set = field(default_factory=set)
    received: int = 0

    @property
    def engine(self) -> str:
        return self.hello.engine or "0"


class IngestService(pb_grpc.IngestServicer):
    """Reads one plugin's stream: Hello -> plan; batches validated then queued for the pipeline."""

    def __init__(self, sidecar) -> None:
        self.sidecar = sidecar
        self._ids = itertools.count(1)

    def handler(self) -> grpc.GenericRpcHandler:
        """Ingest.Stream receiving raw bytes, parsed by :func:`parse_plugin_message` (no copy of the
        activations) instead of the generated deserializer."""
        return grpc.method_handlers_generic_handler("featurewatch.v1.Ingest", {
            "Stream": grpc.stream_stream_rpc_method_handler(
                self.Stream, request_deserializer=None, response_serializer=pb.SidecarMessage.SerializeToString)})

    async def Stream(self, request_iterator, context):
        sc = self.sidecar
        try:
            first, _ = parse_plugin_message(await request_iterator.__anext__())
        except DecodeError:
            first = pb.PluginMessage()
        if first.WhichOneof("kind") != "hello":
            sc.metrics.batches_dropped.labels("no_hello").inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "first message on the stream must be Hello")
        stream = PluginStream(next(self._ids), first.hello)
        sc.attach(stream)
        reader = asyncio.create_task(self._read(request_iterator, stream))
        try:
            while True:
                getter = asyncio.create_task(stream.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not stream.outbox.empty():  # flush what was queued before the plugin hung up
                    yield stream.outbox.get_nowait()
                break
        finally:
            reader.cancel()
            sc.detach(stream)

    async def _read(self, request_iterator, stream: PluginStream) -> None:
        sc = self.sidecar
        try:
            async for raw in request_iterator:
                try:
                    msg, data = parse_plugin_message(raw)
                except DecodeError as exc:
                    sc.metrics.batches_dropped.labels("malformed").inc()
                    log.debug("undecodable message (%d bytes) on stream %d: %s", len(raw), stream.id, exc)
                    continue
                kind = msg.WhichOneof("kind")
                if kind == "batch":
                    self._batch(msg.batch, stream, data)
                elif kind in ("request_start", "request_finish", "stats"):
                    sc.submit(stream, msg)
                elif kind == "hello":
                    stream.hello = msg.hello
                    sc.attach(stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # transport errors end this stream only
            log.info("plugin stream %d ended: %s", stream.id, exc)
            sc.metrics.batches_dropped.labels("transport").inc()

    def _batch(self, msg: pb.ActivationBatch, stream: PluginStream, data=None) -> None:
        sc = self.sidecar
        stream.received += 1
        sc.metrics.batches_received.labels(sc.config.model_name, stream.engine).inc()
        limits = sc.config.limits
        try:
            batch = decode_batch(msg, stream.hello.d_model, stream.allowed_layers, limits.max_batch_bytes,
                                 limits.max_tokens_per_batch, data)
        except BatchRejected as exc:
            sc.metrics.batches_dropped.labels(exc.reason).inc()
            log.debug("rejected batch %d from stream %d: %s", msg.step, stream.id, exc)
            stream.outbox.put_nowait(pb.SidecarMessage(ack=pb.Ack(step=msg.step, rejected_reason=str(exc))))
            return
        if not sc.enqueue_batch(stream, batch):
            stream.outbox.put_nowait(pb.SidecarMessage(ack=pb.Ack(step=msg.step, rejected_reason="queue_full")))
        elif stream.received % CREDIT_EVERY == 0:
            stream.outbox.put_nowait(pb.SidecarMessage(ack=pb.Ack(step=msg.step, credits=sc.free_slots())))


class AdminService(pb_grpc.AdminServicer):
    """Rules get/put/validate, the steering kill switch, and the event tail. Token required."""

    def __init__(self, sidecar) -> None:
        self.sidecar = sidecar

    async def _authorize(self, context) -> None:
        token = self.sidecar.config.admin_token
        if not token:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"admin API disabled: set ${self.sidecar.config.admin_token_env} on the sidecar")
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")

    async def GetRules(self, request, context):
        await self._authorize(context)
        stored = self.sidecar.rule_store.get()
        return pb.RuleSet(yaml=stored.yaml, version=stored.version, author=stored.author, updated_unix_s=stored.updated_unix_s)

    async def PutRules(self, request, context):
        await self._authorize(context)
        try:
            compiled = await asyncio.to_thread(self.sidecar.compile, request.yaml, "<admin>")
        except RulesInvalid as exc:  # refused, naming file, rule ("policy:<name>" for a policy) and field
            return pb.PutRulesResponse(ok=False, errors=[
                pb.RuleError(file=e.file, rule=e.wire_rule, field=e.field, message=e.message) for e in exc.errors])
        except Exception as exc:  # a compile failure nothing anticipated: still the input's fault, never UNKNOWN
            log.exception("PutRules: rules could not be compiled")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"rules could not be compiled, rules in force unchanged: {type(exc).__name__}: {str(exc)[:200]}")
        version = self.sidecar.rule_store.get().version
        if not request.dry_run:
            try:
                version = await asyncio.to_thread(self.sidecar.publish_rules, request.yaml, request.author or "admin")
            except Exception as exc:  # the store is away (e.g. Redis down): nothing changed anywhere
                self.sidecar.metrics.store_errors.labels(type(self.sidecar.rule_store).__name__, "put").inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"rule store unavailable, rules in force unchanged (v{version}): {exc}")
        return pb.PutRulesResponse(ok=True, version=version, rules=len(compiled.rules), policies=len(compiled.policies))

    async def SetSteering(self, request, context):
        await self._authorize(context)
        self.sidecar.set_steering(request.steering_enabled, request.author or "admin")
        return pb.KillSwitchState(steering_enabled=self.sidecar.steering.enabled)

    async def TailAlerts(self, request, context):
        await self._authorize(context)
        store = self.sidecar.event_store
        events = await asyncio.to_thread(store.tail, request.last)
        last_id = None
        for event in events:
            last_id = event.get("id", last_id)
            yield event_message(event)
        if not request.follow:
            return
        if last_id is None:
            recent = await asyncio.to_thread(store.tail, 1)
            last_id = recent[-1]["id"] if recent else "0-0"
        while not context.cancelled():
            for event in await asyncio.to_thread(store.follow, last_id, 500):
                last_id = event.get("id", last_id)
                yield event_message(event)


def event_message(event: dict) -> pb.AlertEvent:
    return pb.AlertEvent(
        event_id=str(event.get("id", "")), kind=str(event.get("kind", "")), rule=str(event.get("rule", "") or event.get("policy", "")),
        severity=str(event.get("severity", "")), request_id=str(event.get("request_id", "")),
        api_request_id=str(event.get("api_request_id", "")), unix_s=float(event.get("unix_s", 0.0)),
        json=json.dumps(event, default=str, sort_keys=True),
    )
