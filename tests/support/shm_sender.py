"""A plugin's shared-memory path for tests and benchmarks: attach to the ring a sidecar announced,
write a batch's activations into a slot, and build the descriptor message that goes on the stream
(or, ``lane``, on the ring's lane: the plugin's own ``monitor.plugin.lane.LaneSender``)."""

from __future__ import annotations

import time

import numpy as np

from monitor.plugin.lane import LaneSender
from monitor.protocol import pb
from monitor.protocol.shm_ring import RingWriter


class ShmSender:
    def __init__(self, ring: pb.ShmRing, lane: bool = False) -> None:
        self.writer = RingWriter.attach(ring.path, ring.slots, ring.slot_bytes, ring.nonce)
        self.lane = LaneSender.connect(ring.lane) if lane else None

    def lane_open(self) -> pb.PluginMessage:
        """Sent on the stream before the first message on the lane."""
        return pb.PluginMessage(lane_open=pb.LaneOpen(lane=self.lane.path))

    def send_on_lane(self, msg: pb.PluginMessage | bytes) -> None:
        data = msg if isinstance(msg, bytes) else msg.SerializeToString()
        why = self.lane.send(data)
        if why is not None:
            raise AssertionError(f"lane send failed: {why}")

    def batch(self, step: int, layers, activations: np.ndarray, request_ids, token_request, positions, generated,
              dtype: int = pb.FLOAT32) -> bytes | None:
        """The descriptor message of ``activations`` written into a slot; None when the ring is full."""
        data = np.ascontiguousarray(activations).view(np.uint8).reshape(-1)
        got = self.writer.acquire(data.nbytes)
        if got is None:
            return None
        slot, seq, view = got
        view[:] = data
        self.writer.publish(slot, seq, step, data.nbytes)
        return pb.PluginMessage(batch=pb.ActivationBatch(
            step=step, layers=list(layers), activations=pb.Tensor(dtype=dtype, shape=list(activations.shape)),
            request_ids=list(request_ids), token_request_index=list(token_request), positions=list(positions),
            is_generated=list(generated), captured_unix_s=time.time(),
            shm_slot=pb.ShmSlot(segment=self.writer.name, slot=slot, sequence=seq, nbytes=data.nbytes),
        )).SerializeToString()
