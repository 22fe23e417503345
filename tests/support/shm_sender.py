"""A plugin's shared-memory path for tests and benchmarks: attach to the ring a sidecar announced,
write a batch's activations into a slot, and build the descriptor message that goes on the stream."""

from __future__ import annotations

import time

import numpy as np

from monitor.protocol import pb
from monitor.protocol.shm_ring import RingWriter


class ShmSender:
    def __init__(self, ring: pb.ShmRing) -> None:
        self.writer = RingWriter.attach(ring.path, ring.slots, ring.slot_bytes, ring.nonce)

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
