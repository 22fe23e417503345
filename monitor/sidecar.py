"""The sidecar process: wires receive -> encode -> evaluate -> export -> act, and keeps it serving.

Fail-open: nothing here can block or fail a request in vLLM. Batches that do not fit the bounded
queue are dropped and counted; bad rules are rejected and the last good set keeps running.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from monitor.act.steering import SteeringController
from monitor.config import ConfigError, SidecarConfig
from monitor.encode.stage import Dictionaries
from monitor.evaluate.compiler import CompiledRules, compile_rules
from monitor.evaluate.state import RequestInfo, RequestTable
from monitor.export.context import context_text
from monitor.export.events import EventSink
from monitor.export.metrics import SidecarMetrics
from monitor.export.tracing import Tracing
from monitor.pipeline import Pipeline, PipelineThread
from monitor.record.recorder import recorder_for
from monitor.protocol import pb, pb_grpc
from monitor.receive.server import AdminService, IngestService, PluginStream
from monitor.rules_file import RulesFileWatcher, RulesOrigin, describe, rules_origin
from monitor.stores.base import StoredRules

log = logging.getLogger("featurewatch.sidecar")
SCOPES = {"all": pb.TOKEN_SCOPE_ALL, "prompt": pb.TOKEN_SCOPE_PROMPT, "generated": pb.TOKEN_SCOPE_GENERATED}
GRPC_MESSAGE_SLACK = 4 * 1024 * 1024


def make_stores(config: SidecarConfig):
    """The configured stores. Redis need not be up: the stores connect (and reconnect) on their own."""
    if config.store.kind == "memory":
        from monitor.stores.memory import MemoryEventStore, MemoryRuleStore

        return MemoryRuleStore(), MemoryEventStore()
    from monitor.stores.redis import open_redis_stores
    from monitor.stores.redis.connection import safe_url

    try:
        return open_redis_stores(config.store)
    except ValueError as exc:  # redis-py's URL parsing: the config is wrong, not Redis
        raise ConfigError(f"store.url: cannot use {safe_url(config.store.url)[:200]!r}: {str(exc)[:200]}") from None


class Sidecar:
    def __init__(self, config: SidecarConfig, dictionaries: Dictionaries | None = None, rule_store=None, event_store=None) -> None:
        self.config = config
        self.dictionaries = dictionaries or Dictionaries(config.sources, device=config.encode_device)
        context = context_text(config.tokenizer)  # a bad tokenizer path stops the start (ConfigError)
        default_rules, default_events = (None, None) if rule_store and event_store else make_stores(config)
        self.rule_store = rule_store or default_rules
        self.event_store = event_store or default_events
        self.metrics = SidecarMetrics(config.model_name, max_engine_labels=config.limits.max_engine_labels)
        self.events = EventSink(self.event_store, self.metrics, context=context)
        self.tracing = Tracing(config.tracing, config.model_name)
        self.steering = SteeringController(config.steering.enabled, config.steering.failure_mode,
                                           on_withheld=lambda reason: self.metrics.steering_withheld.labels(reason).inc())
        self._replan_pending = False  # a plan with newly measured residual norms is on its way
        self._logged_waiting: tuple = ()
        self.metrics.set_steering(self.steering.enabled, self.steering.failure_mode)
        self.requests = RequestTable(config.limits.max_tracked_requests, config.limits.request_idle_timeout_s)
        self.pipeline = Pipeline(compile_rules("", self.dictionaries), self.requests, self.metrics, self.events,
                                 self.tracing, self.steering, config.model_name)
        # record: the flight recorder's own thread, handed references after each batch (None: off)
        self.recorder = recorder_for(config, self.metrics.registry, lambda: self.rules.version)
        self.streams: set[PluginStream] = set()
        self._mismatched: set[PluginStream] = set()  # streams whose Hello.model_name is not ours
        self._warned_models: set[str] = set()
        self._queued_batches = 0
        self._queued_bytes = 0
        self._queue_lock = threading.Lock()
        self.worker = PipelineThread(self._handle, self._handled, self._init_worker, config.limits.group_batches)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._servers: list = []
        self._metrics_server = None
        self._rules_lock = threading.RLock()  # one compile-and-swap at a time (file watcher, store thread, admin)
        self.rules_origin = RulesOrigin("none", "", "", "")
        self.metrics.set_rules_source(self.rules_origin)
        self.rules_file = (RulesFileWatcher(self, config.rules_file, config.rules_poll_interval_s)
                           if config.rules_file is not None else None)
        self._store_seen: dict = {}
        self.health = health.aio.HealthServicer()
        self.metrics.queue_capacity.labels("encode").set(config.limits.queue_batches)
        self._load_initial_rules()

    def _init_worker(self) -> None:
        """OpenMP thread counts are per calling thread: set torch's on the pipeline thread itself."""
        import torch

        torch.set_num_threads(self.config.encode_threads or max(1, (os.cpu_count() or 2) - 1))

    # ------------------------------------------------------------------ rules
    @property
    def rules(self) -> CompiledRules:
        return self.pipeline.rules

    def compile(self, text: str, file: str, version: int = 0) -> CompiledRules:
        return compile_rules(text, self.dictionaries, version, file, layers=self.config.layers(),
                             direction_dirs=self.config.direction_roots())

    def _load_initial_rules(self) -> None:
        """Start-up never stops on rules: a bad rules file is reported (counted, logged, an event) like a
        bad reload, and an unreachable store leaves the file's rules in force here alone. The sidecar
        serves what it has (the file's rules, the store's, or none) and takes the fix when it comes."""
        if self.rules_file is not None:
            self.rules_file.check()  # never raises
        self.rule_store.subscribe(self._on_stored)
        if self.rules_file is not None and self.rules_file.store_pending():
            return  # the file's rules are in force and wait for the store
        try:
            stored = self.rule_store.get()
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read yet: its subscription catches up
            log.error("rule store unreadable at start, serving without its rules: %s", describe(exc))
            return
        if stored.yaml:
            self._on_stored(stored)

    def publish_rules(self, text: str, author: str) -> int:
        """Validated rules go to the store; every replica (this one included) applies them from there."""
        version = self.rule_store.put(text, author)
        self.events.emit("rules", version=version, author=author, action="put")
        return version

    def _on_stored(self, stored: StoredRules) -> None:
        """The store delivered a set. File rules the store has not taken yet win: they are stored now
        (and come back as a new version) rather than replaced by what the store had; and with a rules
        file, only the file's own text is put in force (the file is authoritative)."""
        if self.rules_file is not None and (self.rules_file.store_pending() or not self.rules_file.follows(stored)):
            return
        self._apply(stored)

    def apply_stored(self, stored: StoredRules) -> bool:
        return self._apply(stored)

    def _apply(self, stored: StoredRules) -> bool:
        """Compile a stored set and put it in force; any failure keeps the rules in force."""
        with self._rules_lock:
            if stored.version == self.rules.version and stored.yaml == self.rules.yaml:
                return True  # already in force (a store may announce the same version more than once)
            try:
                compiled = self.compile(stored.yaml, f"<store v{stored.version}>", stored.version)
            except Exception as exc:  # noqa: BLE001 - RulesInvalid or anything else: counted, never raised
                reason = describe(exc)
                self.metrics.rule_reloads.labels("error").inc()
                log.error("rules v%d rejected, keeping v%d: %s", stored.version, self.rules.version, reason)
                self.events.emit("rules", version=stored.version, author=stored.author, action="rejected", error=reason)
                return False
            return self.install(compiled, f"v{stored.version} by {stored.author or '?'}", author=stored.author,
                                updated_unix_s=stored.updated_unix_s)

    def install(self, compiled: CompiledRules, what: str, *, author: str = "", stored: bool = True,
                updated_unix_s: float | None = None) -> bool:
        """Put compiled rules in force on the pipeline thread, between two batches (the per-request
        state is resized there), and send every plugin the new plan."""
        with self._rules_lock:
            try:
                self.worker.call(lambda: self.pipeline.swap_rules(compiled)).result()
            except Exception as exc:  # noqa: BLE001 - e.g. the pipeline stopped: the old rules stay
                self.metrics.rule_reloads.labels("error").inc()
                log.error("rules %s not put in force: %s", what, describe(exc))
                return False
            self.rules_origin = rules_origin(compiled.yaml, author, self.config.store.kind if stored else "",
                                             self.rules_file, time.time() if updated_unix_s is None else updated_unix_s)
            self.metrics.set_rules_source(self.rules_origin)
            self.metrics.rule_reloads.labels("ok").inc()
            log.info("rules in force: %s, %d rules, %d policies; source: %s", what, len(compiled.rules),
                     len(compiled.policies), self.rules_origin.describe())
        if self._loop is not None:  # layers, policies or version changed: every plugin gets the new plan
            self._loop.call_soon_threadsafe(self._broadcast_plan)
        return True

    # ------------------------------------------------------------------ plugin streams
    def plan(self) -> pb.TapPlan:
        layers = sorted(set(self.config.layers()) | set(self.rules.layers))
        policies, waiting = self.steering.norms.resolve_policies(self.rules.enforced_policies)  # never shadow ones
        if tuple(waiting) != self._logged_waiting:
            self._logged_waiting = tuple(waiting)
            if waiting:
                log.warning("policies %s wait for the residual norm of their layers (scale_unit: residual_norm; "
                            "measured from the first requests): their relative adds are left out until then", waiting)
        return pb.TapPlan(
            layers=layers, scope=SCOPES[self.config.token_scope], steering_enabled=self.steering.enabled,
            steering_failure_mode=self.steering.failure_mode,
            policies=policies if self.steering.enabled else [],
            rules_version=self.rules.version, max_batch_bytes=self.config.limits.max_batch_bytes,
        )

    def attach(self, stream: PluginStream) -> None:
        plan = self.plan()
        stream.allowed_layers = set(plan.layers)
        missing = set(plan.layers) - set(stream.hello.available_layers)
        if stream.hello.available_layers and missing:
            log.warning("plugin %s did not hook layers %s that rules need", stream.engine, sorted(missing))
        if stream not in self.streams:
            self.streams.add(stream)
            self.metrics.plugin_restarted(stream.engine, stream.id)
            self.metrics.plugin_connected.labels(self.config.model_name, stream.engine).inc()
            log.info("plugin connected: model=%s engine=%s d=%d layers=%s", stream.hello.model_name,
                     stream.engine, stream.hello.d_model, list(stream.hello.available_layers))
            self._check_model_name(stream)
        stream.reply(pb.SidecarMessage(plan=plan))  # bounded: a plan that cannot be queued ends the stream

    def detach(self, stream: PluginStream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            self.metrics.plugin_connected.labels(self.config.model_name, stream.engine).dec()
        if stream in self._mismatched:
            self._mismatched.discard(stream)
            self.metrics.plugin_model_mismatch.set(len(self._mismatched))

    def _check_model_name(self, stream: PluginStream) -> None:
        """vLLM's metrics carry its served model name, ours `model_name`: when they differ, dashboards
        joining on model_name show nothing of one side. Warn once per name, and count the streams."""
        served = stream.hello.model_name
        if not served or served == self.config.model_name:
            return
        self._mismatched.add(stream)
        self.metrics.plugin_model_mismatch.set(len(self._mismatched))
        if served not in self._warned_models and len(self._warned_models) < 16:
            self._warned_models.add(served)
            log.warning("plugin %s serves model %r but this sidecar's model_name is %r: set model_name: %s in the "
                        "sidecar config (or FEATUREWATCH_MODEL_NAME in vLLM) so vLLM's and featurewatch's metrics share "
                        "the model_name label", stream.engine, served[:200], self.config.model_name, served[:200])

    def _broadcast_plan(self) -> None:
        for stream in list(self.streams):
            self.attach(stream)

    def _replan(self) -> None:
        """A residual norm that policies use became known or moved: every plugin gets the policies
        resolved with it."""
        self._replan_pending = False
        if self.streams:
            self._broadcast_plan()
        else:
            self.plan()

    def set_steering(self, enabled: bool, author: str) -> None:
        self.steering.enabled = enabled
        self.metrics.set_steering(enabled, self.steering.failure_mode)
        self.events.emit("steering", trigger="kill_switch", steering_enabled=enabled, author=author)
        self._broadcast_plan()

    def send(self, stream: PluginStream | None, directive: pb.SteeringDirective) -> bool:
        """Called from the pipeline thread: hand a directive to the stream's outbox."""
        if stream is None or stream not in self.streams or self._loop is None:
            return False
        self._loop.call_soon_threadsafe(stream.reply, pb.SidecarMessage(directive=directive))
        return True

    # ------------------------------------------------------------------ queue
    def free_slots(self) -> int:
        return max(0, self.config.limits.queue_batches - self._queued_batches)

    def enqueue_batch(self, stream: PluginStream, batch) -> bool:
        limits = self.config.limits
        with self._queue_lock:
            if self._queued_batches >= limits.queue_batches or self._queued_bytes + batch.nbytes > limits.queue_bytes:
                full = True
            else:
                full = False
                self._queued_batches += 1
                self._queued_bytes += batch.nbytes
                depth = self._queued_batches
        if full:
            self.metrics.batches_dropped.labels("queue_full").inc()
            return False
        self.metrics.bytes_received.labels(self.config.model_name).inc(batch.nbytes)
        self.metrics.queue_depth.labels("encode").set(depth)
        self.worker.put(stream, batch)
        return True

    def submit(self, stream: PluginStream, msg: pb.PluginMessage) -> None:
        """Control messages share the batch queue so they stay ordered with the batches."""
        self.worker.put(stream, msg)

    def _handled(self, item, failed: bool) -> None:
        """Called on the pipeline thread after each item."""
        if failed:
            self.metrics.batches_dropped.labels("pipeline_error").inc()
        if isinstance(item, (pb.PluginMessage, tuple)):
            return
        with self._queue_lock:
            self._queued_batches -= 1
            self._queued_bytes -= item.nbytes
            depth = self._queued_batches
        self.metrics.queue_depth.labels("encode").set(depth)

    def _handle(self, stream: PluginStream, item) -> None:
        if not isinstance(item, pb.PluginMessage):
            verdicts = []
            try:
                verdicts = self.pipeline.process(item, stream, self.send)
            finally:  # (a batch the pipeline failed on is still recorded: a recorded request has no holes)
                if self.recorder is not None:  # references only: the recorder's thread copies what it keeps
                    self.recorder.batch(item, verdicts)
            if not self._replan_pending and self._loop is not None and self.steering.norms.needs_replan():
                self._replan_pending = True
                self._loop.call_soon_threadsafe(self._replan)
            return
        kind = item.WhichOneof("kind")
        if kind == "request_start":
            m = item.request_start
            info = RequestInfo(m.request_id, m.api_request_id, dict(m.metadata), m.traceparent, stream, m.steering_policy)
            self.pipeline.request_started(info, m.prompt_tokens, m.cached_prompt_tokens)
            if self.recorder is not None:
                self.recorder.request_started(info, m.prompt_tokens, m.started_unix_s)
        elif kind == "request_finish":
            self.pipeline.request_finished(item.request_finish.request_id)
            if self.recorder is not None:
                f = item.request_finish
                self.recorder.request_finished(f.request_id, f.generated_tokens, f.finish_reason)
        elif kind == "stats":
            self.metrics.plugin_stats(stream.engine, item.stats, stream.id,
                                      f"{stream.hello.engine}|{stream.hello.instance}" if stream.hello.instance else "")

    def export_store_counters(self) -> None:
        """Stores count their own errors and drops (they never raise into the hot path); export the
        increases as featurewatch_store_errors_total / featurewatch_events_dropped_total."""
        for store in (self.rule_store, self.event_store):
            name = getattr(store, "store_name", type(store).__name__)
            for attr, metric in (("errors", lambda op: self.metrics.store_errors.labels(name, op)),
                                 ("dropped", lambda reason: self.metrics.events_dropped.labels(f"store_{reason}"))):
                counts = dict(getattr(store, attr, None) or {})
                seen = self._store_seen.setdefault((id(store), attr), {})
                for key, value in counts.items():
                    if value > seen.get(key, 0):
                        metric(key).inc(value - seen.get(key, 0))
                        seen[key] = value

    async def _export_store_counters(self) -> None:
        while True:
            await asyncio.sleep(self.config.store_counters_interval_s)
            self.export_store_counters()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(30)
            expired = await asyncio.wrap_future(self.worker.call(self.requests.expire_idle))
            if expired:
                self.metrics.requests_evicted.labels("idle").inc(expired)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.metrics.watch_gc()
        limit = self.config.limits.max_batch_bytes * 2 + GRPC_MESSAGE_SLACK
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        servers = []
        ingest, admin = IngestService(self), AdminService(self)
        if self.config.socket is not None:
            servers.append(self._server(options, ingest, admin, f"unix:{self.config.socket}"))
        if self.config.grpc_port is not None:
            servers.append(self._server(options, ingest, admin, f"{self.config.grpc_host}:{self.config.grpc_port}"))
        for server, address in servers:
            port = self._bind(server, address)
            if address.startswith("unix:"):
                await server.start()
                os.chmod(self.config.socket, 0o600)  # only this user (and the vLLM container's uid) may connect
            else:
                self.grpc_port = port
                await server.start()
            self._servers.append(server)
        for service in ("", "featurewatch.v1.Ingest", "featurewatch.v1.Admin"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port is not None:
            self._metrics_server, _ = start_http_server(self.config.metrics_port, self.config.metrics_host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._export_store_counters()))
        if self.rules_file is not None:
            self._tasks.append(asyncio.create_task(self.rules_file.run()))
        log.info("featurewatch sidecar serving: socket=%s grpc_port=%s metrics_port=%s", self.config.socket,
                 getattr(self, "grpc_port", None), getattr(self, "metrics_port", None))

    @staticmethod
    def _bind(server, address: str) -> int:
        """Bind a port; a Unix socket is created 0600 from the start (gRPC creates it here, before
        `start`, with the process umask: a later chmod would leave a window where others may connect)."""
        if not address.startswith("unix:"):
            return server.add_insecure_port(address)
        old = os.umask(0o177)
        try:
            return server.add_insecure_port(address)
        finally:
            os.umask(old)

    def _server(self, options, ingest, admin, address):
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((ingest.handler(),))
        pb_grpc.add_AdminServicer_to_server(admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server, address

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued (SIGTERM): health goes NOT_SERVING first so probes see it."""
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + timeout_s
        while self.worker.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.worker.pending:
            log.warning("drain timed out with %d batches queued", self._queued_batches)

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._loop is not None:
            await self.drain(grace_s)
        for server in self._servers:
            await server.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.worker.stop()
        if self.recorder is not None:
            self.recorder.stop()  # writes what it holds
        self.metrics.unwatch_gc()
        self.events.close()
        self.tracing.shutdown()
        for store in (self.rule_store, self.event_store):
            store.close()
        if self.config.socket is not None and self.config.socket.exists():
            self.config.socket.unlink()


async def serve(config: SidecarConfig, ready=None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    import signal

    sidecar = Sidecar(config)
    await sidecar.start()
    # Everything loaded so far (torch, the dictionaries, ~200k objects) lives as long as the process:
    # leave it out of every later collection, or each full collection stalls the sidecar (~80 ms here).
    gc.collect()
    gc.freeze()
    if ready is not None:
        ready(sidecar)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await sidecar.stop()
    # Give the frozen objects back to the collector before the interpreter exits: frozen, they are
    # never collected at exit, and native extensions that check for leaks at teardown (Triton's
    # nanobind module, imported by the encode kernels) print ~30 lines of "leaked instance" warnings.
    gc.unfreeze()

