"""The sidecar's side of activations over shared memory: a ring per plugin stream that asked for
one over the Unix socket, announced in its TapPlan, and batches read from it by descriptor.

The ring is an optimisation, never a dependency: a ring that cannot be created leaves the stream
on the bytes path, a descriptor that names no readable slot is rejected and counted like any
malformed batch (`featurewatch_batches_dropped_total{reason}`), and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter, Gauge

from monitor.protocol import pb
from monitor.protocol.shm_ring import RingReader, SlotRejected, remove_stale
from monitor.receive.batch import TORCH_DTYPES, BatchRejected
from monitor.receive.lane import LaneError, LaneReader

log = logging.getLogger(__name__)
TRANSPORTS = ("shm", "grpc")


class ShmIngest:
    """Creates, announces, reads and closes the rings of one sidecar's plugin streams."""

    def __init__(self, sidecar) -> None:
        self.sidecar = sidecar
        self.config = sidecar.config.shm
        r = sidecar.metrics.registry
        self.streams = Gauge("featurewatch_plugin_streams", "Connected plugin streams, by the path their "
                             "activations take (shm: shared-memory ring, grpc: bytes on the stream).",
                             ["transport"], registry=r)
        for transport in TRANSPORTS:
            self.streams.labels(transport).set_function(lambda t=transport: self._count(t))
        self.batches = Counter("featurewatch_batches_by_transport", "Activation batches received, by the path "
                               "their activations took.", ["transport"], registry=r)
        self.ring_errors = Counter("featurewatch_shm_ring_errors", "Rings that could not be created (the stream "
                                   "stays on the bytes path).", registry=r)
        self.lane_packets = Counter("featurewatch_lane_messages", "Plugin messages received through a stream's "
                                    "lane (monitor/receive/lane.py) instead of the gRPC stream, by kind.",
                                    ["kind"], registry=r)
        self.lane_errors = Counter("featurewatch_lane_errors", "Lanes not created or not opened (the stream "
                                   "keeps its descriptors on the gRPC stream), by reason.", ["reason"], registry=r)
        self._warned = False
        if self.config.enabled:
            for name in remove_stale(self.config.dir):
                log.info("removed the ring %s of a sidecar that is gone", name)

    def _count(self, transport: str) -> int:
        rings = [getattr(s, "ring", None) is not None for s in list(self.sidecar.streams)]
        return sum(rings) if transport == "shm" else len(rings) - sum(rings)

    def open(self, stream, peer: str) -> None:
        """A ring for this stream if the plugin can use one: it said so, and it is on this host."""
        hello = stream.hello
        if not (self.config.enabled and hello.shm_capable and peer.startswith("unix:")):
            return
        elsize = TORCH_DTYPES[hello.dtype].itemsize if hello.dtype in TORCH_DTYPES else 4
        layers = set(self.sidecar.config.layers()) | set(self.sidecar.rules.layers)
        if hello.available_layers:
            layers &= set(hello.available_layers)
        step_bytes = max(1, hello.max_tokens_per_step) * max(1, len(layers)) * hello.d_model * elsize
        limit = min(self.sidecar.config.limits.max_batch_bytes, self.config.max_bytes // self.config.slots)
        slot_bytes = max(hello.d_model * elsize * max(1, len(layers)), min(step_bytes, limit))  # one token fits
        n_slots = max(2, min(self.config.slots, self.config.max_bytes // slot_bytes))
        try:
            stream.ring = RingReader.create(self.config.dir, n_slots, slot_bytes)
        except OSError as exc:
            self.ring_errors.inc()
            if not self._warned:
                self._warned = True
                log.warning("shared-memory ring not created in %s (%s): plugins send activations as bytes",
                            self.config.dir, exc)
            return
        if self.config.lane:
            try:
                stream.lane = LaneReader.create(stream.ring.path)
            except OSError as exc:
                self.lane_errors.labels("create").inc()
                log.info("no lane for plugin stream %d (%s): descriptors stay on the stream", stream.id, exc)
        log.info("plugin stream %d: ring %s, %d slots of %d bytes%s", stream.id, stream.ring.path, n_slots, slot_bytes,
                 ", lane " + str(stream.lane.path) if stream.lane is not None else "")

    def open_lane(self, stream, request: pb.LaneOpen, on_packet) -> bool:
        """The plugin's ``LaneOpen``: accept its connection and read the lane on the event loop,
        ``on_packet(raw)`` per packet (None: oversized). False (counted) if it cannot be opened;
        the plugin's messages on the lane are then lost, as on a broken stream."""
        lane = getattr(stream, "lane", None)
        if lane is None or request.lane != str(lane.path):
            self.lane_errors.labels("not_announced").inc()
            log.warning("plugin stream %d: LaneOpen for %r, which is not its lane", stream.id, request.lane[:200])
            return False
        try:
            lane.accept()
        except OSError as exc:
            self.lane_errors.labels("accept").inc()
            log.warning("plugin stream %d: lane not opened: %s", stream.id, exc)
            lane.close()
            return False
        stream.lane_reader = lambda: self._read_lane(stream, on_packet)
        asyncio.get_running_loop().add_reader(lane.fileno(), stream.lane_reader)
        return True

    @staticmethod
    def _read_lane(stream, on_packet) -> None:
        lane = stream.lane
        for raw in lane.receive():
            on_packet(raw)
        if lane.closed:  # the plugin closed its end: the stream's end cleans up the rest
            ShmIngest._stop_reading(lane)

    @staticmethod
    def drain_lane(stream) -> None:
        """Read what the lane holds now, before the stream's end closes it: nothing sent is lost."""
        reader = getattr(stream, "lane_reader", None)
        if reader is not None and not stream.lane.closed:
            reader()

    @staticmethod
    def _stop_reading(lane: LaneReader) -> None:
        if lane.conn is not None:
            try:
                asyncio.get_running_loop().remove_reader(lane.fileno())
            except RuntimeError:  # no loop: nothing reads it
                pass
        lane.close()

    @staticmethod
    def announce(stream, msg: pb.SidecarMessage) -> pb.SidecarMessage:
        """The plan with this stream's ring in it (a copy: plans may be shared)."""
        ring = getattr(stream, "ring", None)
        if ring is None or msg.WhichOneof("kind") != "plan":
            return msg
        g = ring.geometry
        out = pb.SidecarMessage()
        out.CopyFrom(msg)
        lane = getattr(stream, "lane", None)
        out.plan.shm_ring.CopyFrom(pb.ShmRing(path=g.path, slots=g.n_slots, slot_bytes=g.slot_bytes, nonce=g.nonce,
                                              lane=str(lane.path) if lane is not None else ""))
        return out

    def data(self, stream, msg: pb.ActivationBatch, data):
        """The activation bytes of a batch: ``data`` for a bytes batch, else a leased view on the
        ring's slot (freed when the batch is done with). Raises BatchRejected."""
        if not msg.HasField("shm_slot"):
            self.batches.labels("grpc").inc()
            return data
        ref = msg.shm_slot
        ring = getattr(stream, "ring", None)
        if data is not None and len(data) or msg.activations.data:
            raise BatchRejected("malformed", "a batch with both a ring slot and inline activation bytes")
        if ring is None or ref.segment != ring.name:
            raise BatchRejected("malformed", f"ring {ref.segment[:80]!r} is not this stream's "
                                             f"({ring.name if ring else 'none announced'})")
        try:
            view = ring.take(ref.slot, ref.sequence, msg.step, ref.nbytes)
        except SlotRejected as exc:
            raise BatchRejected(exc.reason, exc.detail) from None
        self.batches.labels("shm").inc()
        return view

    @staticmethod
    def close(stream) -> None:
        lane = getattr(stream, "lane", None)
        if lane is not None:
            ShmIngest._stop_reading(lane)
        ring = getattr(stream, "ring", None)
        if ring is not None:
            ring.close()
            if ring.overwritten_in_use:
                log.warning("ring %s: %d slots were rewritten while the sidecar read them", ring.name,
                            ring.overwritten_in_use)
