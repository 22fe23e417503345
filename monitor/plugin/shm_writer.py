"""The plugin's shared-memory path: the forward thread copies a step's tapped rows straight into a
slot of the ring the sidecar announced, and sends only a descriptor: on the ring's lane when the
sidecar offers one (monitor/plugin/lane.py), else on the gRPC stream.

Chosen per stream and per step, never required: the plugin asks for a ring only over a Unix
socket (``Hello.shm_capable``); it attaches only to the ring its sidecar announced in the TapPlan
(same owner, mode 0600, matching nonce: monitor/protocol/shm_ring.py); a GPU tap buffer, or any
attach failure, sends bytes as before; a step larger than a slot takes several slots. A stream
that ends detaches (ring and lane), and the next plan (a restarted sidecar's new ring) attaches
again. A full ring drops the step and counts it (``batches_dropped_queue_full`` and
``shm_ring_full``): the forward never waits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from monitor.plugin.config import PluginConfig, grpc_target
from monitor.plugin.lane import LaneSender
from monitor.protocol import pb
from monitor.protocol.shm_ring import RingError, RingWriter

logger = logging.getLogger("vllm.featurewatch")


@dataclass(frozen=True)
class SlotRef:
    """A published slot: what the descriptor names."""

    writer: RingWriter
    slot: int
    sequence: int
    nbytes: int
    rows: torch.Tensor  # the slot's payload as the rows written (shape and dtype of the descriptor)

    def descriptor(self) -> pb.ShmSlot:
        return pb.ShmSlot(segment=self.writer.name, slot=self.slot, sequence=self.sequence, nbytes=self.nbytes)

    def abandon(self) -> None:
        """The descriptor will never be sent (queue full, stream gone): free the slot."""
        self.writer.abandon(self.slot)


class ShmPath:
    """One client's ring, if any. ``writer`` is read by the forward thread, set by the client's."""

    def __init__(self, cfg: PluginConfig, counters) -> None:
        self.allowed = bool(cfg.shm and cfg.address and grpc_target(cfg.address).startswith("unix:"))
        # the lane carries only what the forward thread sends, so only a host tap buffer (whose
        # steps all go through the ring) uses it: the runtime turns it off for a GPU tap buffer
        self.lane_allowed = cfg.shm_lane
        self.counters = counters
        self.writer: RingWriter | None = None
        self.lane: LaneSender | None = None
        self.last_error = ""

    @property
    def transport(self) -> str:
        return "shm" if self.writer is not None else "grpc"

    def on_plan(self, plan: pb.TapPlan) -> None:
        """Attach to the announced ring (once per ring); no ring announced: bytes."""
        if not plan.HasField("shm_ring"):
            self.detach()
            return
        ring = plan.shm_ring
        current = self.writer
        if current is not None and current.geometry.path == ring.path and current.geometry.nonce == ring.nonce:
            return
        self.detach()
        if not self.allowed:
            return
        try:
            self.writer = RingWriter.attach(ring.path, ring.slots, ring.slot_bytes, ring.nonce)
            self.counters.shm_attaches += 1
            self.last_error = ""
            logger.info("featurewatch: activations go through the shared-memory ring %s (%d slots of %d bytes)",
                        ring.path, ring.slots, ring.slot_bytes)
        except (RingError, OSError, ValueError) as exc:
            self.counters.shm_attach_failures += 1
            self.last_error = str(exc)[:300]
            logger.warning("featurewatch: shared-memory ring not usable, sending bytes: %s", self.last_error)
            return
        if ring.lane and self.lane_allowed:
            try:
                self.lane = LaneSender.connect(ring.lane)
            except OSError as exc:
                self.counters.lane_connect_failures += 1
                self.last_error = f"lane: {exc}"[:300]
                logger.warning("featurewatch: lane %s not usable, descriptors go on the stream: %s", ring.lane, exc)

    def detach(self) -> None:
        writer, self.writer = self.writer, None
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.close()
        if writer is not None:
            writer.detach()

    def describe(self) -> dict:
        w = self.writer
        lane = self.lane
        return {"transport": self.transport, "allowed": self.allowed, "last_error": self.last_error,
                "lane": None if lane is None else {"path": lane.path, "open": lane.opened, "sent": lane.sent},
                "ring": None if w is None else {"path": w.geometry.path, "slots": w.geometry.n_slots,
                                                "slot_bytes": w.slot_bytes, "free_slots": w.free_slots()}}


def write_step(writer: RingWriter, src: torch.Tensor, rows: slice | torch.Tensor, n: int,
               tokens: np.ndarray | None, step: int) -> SlotRef | None:
    """Copy the tap buffer's ``rows`` (planned layers) x first ``n`` tokens (only ``tokens``, an
    index into them, when set) of ``src`` (host memory) into a free slot and publish it; None when
    no slot is free. The caller checked that they fit a slot.

    The rows are gathered straight into the slot (no intermediate tensor: one copy), by numpy on
    this thread: torch would split a copy this size over its intra-op threads, which on a busy
    host spin waiting for cores and cost several times the copy's own CPU."""
    layer_rows = range(*rows.indices(src.shape[0])) if isinstance(rows, slice) else rows.tolist()
    shape = (len(layer_rows), n if tokens is None else len(tokens), src.shape[2])
    nbytes = shape[0] * shape[1] * shape[2] * src.element_size()
    got = writer.acquire(nbytes)
    if got is None:
        return None
    slot, sequence, buf = got
    try:
        a = _as_numpy(src)
        dst = buf.view(a.dtype).reshape(shape)
        if tokens is None and isinstance(rows, slice):
            np.copyto(dst, a[rows, :n])
        else:
            for i, row in enumerate(layer_rows):
                if tokens is None:
                    np.copyto(dst[i], a[row, :n])
                else:
                    np.take(a[row, :n], tokens, axis=0, out=dst[i])
        writer.publish(slot, sequence, step, nbytes)
    except BaseException:
        writer.abandon(slot)
        raise
    return SlotRef(writer, slot, sequence, nbytes, torch.from_numpy(dst).view(src.dtype))


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a host tensor (bfloat16, which numpy lacks, as its 16-bit patterns)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
