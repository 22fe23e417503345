"""The plugin's connection to the sidecar: one gRPC bidi stream, a bounded outbound queue, a
background thread that reconnects with jittered exponential backoff.

The forward thread only ever calls :meth:`SidecarClient.offer` (never blocks: a full queue drops the
item and counts it). Serialisation of activation batches (a device→host copy already made by the
forward thread, then ``tobytes``) happens on gRPC's request-iterator thread. Once the ring's lane
is open (monitor/plugin/lane.py), ``offer`` sends descriptors, RequestStarts and RequestFinishes
on it itself, and the stream carries only the Hello, LaneOpen and stats.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from monitor.plugin.config import PluginConfig, grpc_target
from monitor.plugin.shm_writer import ShmPath, SlotRef
from monitor.protocol import pb

logger = logging.getLogger("vllm.featurewatch")

_DTYPES = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16}
_MAX_MSG = 512 * 1024 * 1024


@dataclass
class Counters:
    batches_enqueued: int = 0
    batches_dropped_queue_full: int = 0
    batches_dropped_disconnected: int = 0
    batches_sent: int = 0
    batches_rejected: int = 0
    tokens_tapped: int = 0
    enqueue_seconds_sum: float = 0.0
    enqueue_count: int = 0
    reconnects: int = 0
    connects: int = 0
    cached_prompt_tokens_untapped: int = 0
    steering_rows_applied: int = 0
    directives_received: int = 0
    directives_applied: int = 0
    directives_rejected: int = 0
    directives_late: int = 0
    policies_rejected: int = 0  # policies refused at parse (bounds, actions.py)
    steering_nonfinite_rows: int = 0  # token rows kept unsteered: steering made them non-finite
    steering_nonfinite_dropped: int = 0  # sources and policies dropped for it (guard.py)
    policy_mismatch: int = 0
    policy_view_missing: int = 0  # engine core had no policy view: no policy applied
    salt_missing: int = 0
    plans_received: int = 0
    requests_started: int = 0
    requests_finished: int = 0
    steps: int = 0
    host_seconds: float = 0.0  # plugin work on the forward thread (pre/before/after the forward)
    batches_sent_shm: int = 0  # of batches_sent, those whose activations went through the ring
    shm_ring_full: int = 0  # steps dropped for want of a free slot (also in batches_dropped_queue_full)
    shm_steps_as_bytes: int = 0  # steps larger than a slot, sent as bytes
    shm_attaches: int = 0
    shm_attach_failures: int = 0
    shm_steps_split: int = 0  # steps larger than a slot, written into several slots
    lane_connect_failures: int = 0
    lane_sent: int = 0  # messages sent on the lane (batch descriptors, request starts and finishes)
    lane_full: int = 0  # dropped: the lane's socket buffer was full (the sidecar is behind or hung)
    lane_gone: int = 0  # dropped: the sidecar's end is closed
    lane_too_large: int = 0  # dropped: larger than one packet
    lane_bytes_dropped: int = 0  # batches without a slot while the lane is open (they cannot overtake it)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BatchItem:
    """One step's activations, already copied off the tap buffer (maybe still in flight on GPU)."""

    step: int
    layers: list[int]
    host: torch.Tensor  # [len(layers), n, d]
    event: object | None
    request_ids: list[str]
    token_request_index: np.ndarray
    positions: np.ndarray
    is_generated: np.ndarray
    captured_unix_s: float
    token_ids: torch.Tensor | None = None  # [n] the forward's input ids of these tokens (host)
    shm: SlotRef | None = None  # set: ``host`` is a view on this ring slot, sent by descriptor
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        # bytes held in this process (a ring slot is bounded by the ring, not by the queue)
        self.nbytes = 0 if self.shm is not None else self.host.numel() * self.host.element_size()

    def messages(self, max_bytes: int) -> Iterator[bytes]:
        """Serialised ``PluginMessage{batch}``s, split by tokens under ``max_bytes``."""
        if self.shm is not None:
            yield self.descriptor_message()
            return
        if self.event is not None:
            self.event.synchronize()
        host = self.host
        dtype = _DTYPES[host.dtype]
        if host.dtype == torch.bfloat16:
            host = host.view(torch.int16)
        arr = host.numpy()
        L, n, d = arr.shape
        ids = token_ids_of(self.token_ids)
        if ids is not None and len(ids) != n:
            ids = None
        per_token = max(1, L * d * arr.itemsize)
        chunk = n if max_bytes <= 0 else max(1, min(n, max_bytes // per_token))
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            idx = self.token_request_index[a:b]
            used = np.unique(idx)
            remap = np.zeros(len(self.request_ids), dtype=np.int64)
            remap[used] = np.arange(len(used))
            meta = pb.ActivationBatch(
                step=self.step,
                layers=self.layers,
                request_ids=[self.request_ids[i] for i in used],
                token_request_index=remap[idx].tolist(),
                positions=self.positions[a:b].tolist(),
                is_generated=self.is_generated[a:b].tolist(),
                captured_unix_s=self.captured_unix_s,
                token_ids=ids[a:b].tolist() if ids is not None else (),
            ).SerializeToString()
            head = pb.Tensor(dtype=dtype, shape=[L, b - a, d]).SerializeToString()
            data = memoryview(np.ascontiguousarray(arr[:, a:b])).cast("B")
            yield encode_batch(meta, head, data)


    def descriptor_message(self) -> bytes:
        """The batch's labels and a descriptor of its slot (the rows are already in the ring)."""
        n = self.host.shape[1]
        ids = token_ids_of(self.token_ids)
        if ids is not None and len(ids) != n:
            ids = None
        return pb.PluginMessage(batch=pb.ActivationBatch(
            step=self.step, layers=self.layers, request_ids=self.request_ids,
            token_request_index=self.token_request_index.tolist(), positions=self.positions.tolist(),
            is_generated=self.is_generated.tolist(), captured_unix_s=self.captured_unix_s,
            token_ids=ids.tolist() if ids is not None else (),
            activations=pb.Tensor(dtype=_DTYPES[self.host.dtype], shape=list(self.host.shape)),
            shm_slot=self.shm.descriptor(),
        )).SerializeToString()


def token_ids_of(ids: torch.Tensor | None) -> np.ndarray | None:
    """The ids as the wire's uint32 takes them, or None (sent as none) if any is out of range:
    the ids are labels, a bad one must not end the stream."""
    if ids is None:
        return None
    a = ids.numpy()
    if not a.size:
        return a
    if a.dtype.kind == "u" and a.itemsize <= 4:
        return a
    if a.dtype.kind == "i" and a.itemsize <= 4:  # vLLM's int32 ids: only the sign can be wrong
        return None if int(a.min()) < 0 else a
    if int(a.min()) < 0 or int(a.max()) > 0xFFFFFFFF:
        return None
    return a


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_TAG_BATCH = b"\x12"  # PluginMessage.batch = 2, length-delimited
_TAG_3 = b"\x1a"  # ActivationBatch.activations = 3 / Tensor.data = 3, length-delimited


def encode_batch(meta: bytes, tensor_head: bytes, data) -> bytes:
    """``PluginMessage{batch: meta + activations{tensor_head + data}}`` in protobuf wire format,
    with the activation bytes copied once (the generic path copies them three times, holding the
    GIL the forward thread needs). Field order on the wire is free in protobuf."""
    n = len(data)
    tensor_len = len(tensor_head) + 1 + len(_varint(n)) + n
    batch_len = len(meta) + 1 + len(_varint(tensor_len)) + tensor_len
    return b"".join((_TAG_BATCH, _varint(batch_len), meta, _TAG_3, _varint(tensor_len),
                     tensor_head, _TAG_3, _varint(n), data))


def serialize_message(m: pb.PluginMessage | bytes) -> bytes:
    return m if isinstance(m, bytes) else m.SerializeToString()


def backoff_delay(backoff: float) -> float:
    """Jitter in [backoff/2, backoff]: replicas restarted together do not reconnect in step, and
    the wait never collapses to zero."""
    return random.uniform(0.5, 1.0) * backoff


class SidecarClient:
    """Background connection. ``hello()`` builds the Hello, ``on_connect()`` returns the messages
    to replay after it (RequestStart of live requests), ``on_message(msg)`` receives what the
    sidecar sends, ``on_disconnect()`` is called when a stream ends."""

    def __init__(
        self,
        cfg: PluginConfig,
        counters: Counters,
        hello: Callable[[], pb.Hello],
        on_connect: Callable[[], list[pb.PluginMessage]],
        on_message: Callable[[pb.SidecarMessage], None],
        on_disconnect: Callable[[], None],
        stats: Callable[[], pb.PluginStats],
    ) -> None:
        self.cfg = cfg
        self.counters = counters
        self._hello, self._on_connect, self._on_message = hello, on_connect, on_message
        self._on_disconnect, self._stats = on_disconnect, stats
        self._q: queue.Queue = queue.Queue(maxsize=cfg.queue_batches + 1024)
        self._batches = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = False
        self.last_error = ""
        self.max_batch_bytes = 0
        self.shm = ShmPath(cfg, counters)
        self._thread: threading.Thread | None = None

    # -- forward-thread side

    def has_room(self, nbytes: int = 0) -> bool:
        return (self._batches < self.cfg.queue_batches
                and self._bytes + nbytes <= self.cfg.queue_bytes)

    def offer(self, item: pb.PluginMessage | BatchItem) -> bool:
        """Enqueue without blocking; drop and count when disconnected or full."""
        t0 = time.perf_counter()
        is_batch = isinstance(item, BatchItem)
        ok = False
        lane = self.shm.lane
        if not self.connected:
            if is_batch:
                self.counters.batches_dropped_disconnected += 1
        elif lane is not None and (lane.opened or self._open_lane(lane)):
            ok = self._send_lane(lane, item)
        elif is_batch and not self.has_room(item.nbytes):
            self.counters.batches_dropped_queue_full += 1
        else:
            try:
                self._q.put_nowait(item)
                ok = True
                if is_batch:
                    with self._lock:
                        self._batches += 1
                        self._bytes += item.nbytes
                    self.counters.batches_enqueued += 1
            except queue.Full:
                if is_batch:
                    self.counters.batches_dropped_queue_full += 1
        if is_batch and not ok and item.shm is not None:
            item.shm.abandon()  # its descriptor will never be sent
        self.counters.enqueue_seconds_sum += time.perf_counter() - t0
        self.counters.enqueue_count += 1
        return ok

    def _open_lane(self, lane) -> bool:
        """Queue LaneOpen on the stream, after everything queued so far: from here on, this thread
        sends on the lane. (Only the forward thread offers, so nothing is queued after it.)"""
        try:
            self._q.put_nowait(pb.PluginMessage(lane_open=pb.LaneOpen(lane=lane.path)))
        except queue.Full:
            return False
        lane.opened = True
        return True

    def _send_lane(self, lane, item: pb.PluginMessage | BatchItem) -> bool:
        """Send on the lane now; drop and count when it cannot take it."""
        c = self.counters
        if isinstance(item, BatchItem):
            if item.shm is None or item.shm.writer is not self.shm.writer:
                c.lane_bytes_dropped += 1  # bytes on the stream would overtake the lane; an old ring's slot is gone
                c.batches_dropped_disconnected += 1
                return False  # (offer frees the slot)
            data = item.descriptor_message()
        else:
            data = item.SerializeToString()
        why = lane.send(data)
        if why is None:
            c.lane_sent += 1
            if isinstance(item, BatchItem):
                c.batches_enqueued += 1
                c.batches_sent += 1
                c.batches_sent_shm += 1
            return True
        if why == "full":
            c.lane_full += 1
        elif why == "gone":
            c.lane_gone += 1
        else:
            c.lane_too_large += 1
        if isinstance(item, BatchItem):  # (offer frees the slot)
            if why == "gone":
                c.batches_dropped_disconnected += 1
            else:
                c.batches_dropped_queue_full += 1
        return False

    @property
    def queue_depth(self) -> int:
        return self._batches

    @property
    def transport(self) -> str:
        """Where activations go now: ``shm`` (the sidecar's ring) or ``grpc`` (bytes on the stream)."""
        return self.shm.transport

    # -- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="featurewatch-client", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = self.cfg.backoff_initial_s
        attempt = 0
        while not self._stop.is_set():
            if attempt:
                self.counters.reconnects += 1
            attempt += 1
            started = time.monotonic()
            try:
                self._stream_once()
            except Exception as e:  # noqa: BLE001 - any failure means: reconnect later
                details = e.details() if isinstance(e, grpc.RpcError) and hasattr(e, "details") \
                    else str(e)
                self.last_error = f"{type(e).__name__}: {details}"
                logger.debug("featurewatch: stream ended: %s", self.last_error)
            # on_disconnect first: whoever sees ``connected`` false finds the disconnect queued
            if self.connected:
                try:
                    self._on_disconnect()
                except Exception:  # noqa: BLE001
                    logger.exception("featurewatch: on_disconnect failed")
            self.connected = False
            self.shm.detach()  # a reconnect attaches to whatever ring the next plan announces
            self._drain()
            if time.monotonic() - started > 5.0:
                backoff = self.cfg.backoff_initial_s
            self._wait(backoff_delay(backoff))
            backoff = min(self.cfg.backoff_max_s, backoff * 2)

    def _wait(self, delay: float) -> None:
        """Sleep between attempts; returns early on stop (tests record the delays instead)."""
        self._stop.wait(delay)

    def _drain(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BatchItem):
                self._release(item)
                self.counters.batches_dropped_disconnected += 1

    def _release(self, item: BatchItem) -> None:
        with self._lock:
            self._batches -= 1
            self._bytes -= item.nbytes

    def _stream_once(self) -> None:
        options = [
            ("grpc.max_send_message_length", _MAX_MSG),
            ("grpc.max_receive_message_length", _MAX_MSG),
            ("grpc.keepalive_time_ms", 10000),
            ("grpc.enable_retries", 0),
        ]
        with grpc.insecure_channel(grpc_target(self.cfg.address or ""), options=options) as ch:
            grpc.channel_ready_future(ch).result(timeout=1.0)
            # Ingest.Stream with a serializer that passes pre-encoded batches through
            stream = ch.stream_stream(
                "/featurewatch.v1.Ingest/Stream",
                request_serializer=serialize_message,
                response_deserializer=pb.SidecarMessage.FromString,
            )
            done = threading.Event()
            token = self.cfg.ingest_token
            responses = stream(self._requests(done),
                               metadata=[("authorization", f"Bearer {token}")] if token else None)
            try:
                for msg in responses:
                    self._on_message(msg)
                    if msg.WhichOneof("kind") == "plan":
                        self.max_batch_bytes = int(msg.plan.max_batch_bytes)
                        self.shm.on_plan(msg.plan)  # before ``connected``: the first batches use it
                        if not self.connected:
                            self.connected = True
                            self.counters.connects += 1
                            logger.info("featurewatch: connected to %s", self.cfg.address)
                    elif msg.WhichOneof("kind") == "ack" and msg.ack.rejected_reason:
                        self.counters.batches_rejected += 1
                    if self._stop.is_set():
                        break
            finally:
                done.set()
                responses.cancel()

    def _requests(self, done: threading.Event) -> Iterator[pb.PluginMessage]:
        hello = self._hello()
        hello.shm_capable = self.shm.allowed
        yield pb.PluginMessage(hello=hello)
        # Wait for the plan before replaying live requests (the sidecar learns them again).
        while not self.connected and not done.is_set() and not self._stop.is_set():
            time.sleep(0.01)
        for m in self._on_connect():
            yield m
        next_stats = time.monotonic() + self.cfg.stats_interval_s
        while not done.is_set() and not self._stop.is_set():
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + self.cfg.stats_interval_s
                yield pb.PluginMessage(stats=self._stats())
            try:
                item = self._q.get(timeout=min(0.05, max(0.0, next_stats - now)))
            except queue.Empty:
                continue
            if isinstance(item, BatchItem):
                if item.shm is not None and item.shm.writer is not self.shm.writer:
                    self._release(item)  # written into a ring this stream does not use
                    self.counters.batches_dropped_disconnected += 1
                    continue
                sent = False
                try:
                    for m in item.messages(self.max_batch_bytes):
                        yield m
                    sent = True
                    self.counters.batches_sent += 1
                    if item.shm is not None:
                        self.counters.batches_sent_shm += 1
                finally:
                    self._release(item)
                    if not sent and item.shm is not None:
                        item.shm.abandon()
            else:
                yield item
        # final stats so the sidecar's view is current when the stream closes cleanly
        if self._stop.is_set():
            yield pb.PluginMessage(stats=self._stats())
