"""A real, small gRPC sidecar for the plugin's tests: implements ``Ingest.Stream``, records what the
plugin sends, sends a TapPlan after each Hello and steering directives on demand.

Runs in the test process (``grpc.server`` with a thread pool) on a Unix socket or TCP port;
``stop()`` kills it abruptly (streams cancelled), ``start()`` brings it back on the same address.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures

import grpc
import numpy as np

from monitor.protocol import pb, pb_grpc

_MAX = 512 * 1024 * 1024


def f32_tensor(v) -> pb.Tensor:
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    return pb.Tensor(dtype=pb.FLOAT32, shape=[a.size], data=a.tobytes())


def clamp_action(layer: int, encoder, decoder, *, bias=0.0, threshold=0.0, value=0.0,
                 gate_encoder=None, gate_bias=0.0, feature=0) -> pb.SteeringAction:
    c = pb.Clamp(source="test", feature=feature, encoder=f32_tensor(encoder), bias=bias,
                 threshold=threshold, decoder=f32_tensor(decoder), value=value,
                 gate_bias=gate_bias)
    if gate_encoder is not None:
        c.gate_encoder.CopyFrom(f32_tensor(gate_encoder))
    return pb.SteeringAction(layer=layer, clamp=c)


def add_action(layer: int, direction, scale: float) -> pb.SteeringAction:
    return pb.SteeringAction(layer=layer, add=pb.AddDirection(direction=f32_tensor(direction),
                                                              scale=scale))


def decode_batch(b: pb.ActivationBatch) -> np.ndarray:
    t = b.activations
    if t.dtype == pb.FLOAT32:
        arr = np.frombuffer(t.data, dtype="<f4")
    elif t.dtype == pb.FLOAT16:
        arr = np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    else:
        arr = (np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return arr.reshape(list(t.shape))


class FakeSidecar(pb_grpc.IngestServicer):
    def __init__(self, address: str, plan: pb.TapPlan | None = None) -> None:
        self.address = address
        self.plan = plan or pb.TapPlan(steering_enabled=True, steering_failure_mode="open")
        self.lock = threading.Lock()
        self.hellos: list[pb.Hello] = []
        self.batches: list[pb.ActivationBatch] = []
        self.starts: dict[str, pb.RequestStart] = {}
        self.finishes: dict[str, pb.RequestFinish] = {}
        self.stats: list[pb.PluginStats] = []
        self.streams: list[queue.Queue] = []
        self.on_start: Callable[[pb.RequestStart], list[pb.SteeringDirective]] | None = None
        self.server: grpc.Server | None = None

    # -- lifecycle

    def start(self) -> FakeSidecar:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[("grpc.max_receive_message_length", _MAX),
                     ("grpc.max_send_message_length", _MAX)])
        pb_grpc.add_IngestServicer_to_server(self, server)
        if self.address.startswith("unix://"):
            path = self.address[len("unix://"):]
            if os.path.exists(path):
                os.unlink(path)
        self.port = server.add_insecure_port(self.address)
        if not self.address.startswith("unix:") and self.address.endswith(":0"):
            self.address = self.address[:-1] + str(self.port)  # restart on the same port
        server.start()
        self.server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.server.stop(grace).wait()
            self.server = None
        with self.lock:
            for q in self.streams:
                q.put(None)
            self.streams = []

    # -- what the tests drive

    def send(self, msg: pb.SidecarMessage) -> None:
        with self.lock:
            for q in self.streams:
                q.put(msg)

    def set_plan(self, plan: pb.TapPlan) -> None:
        self.plan = plan
        self.send(pb.SidecarMessage(plan=plan))

    def directive(self, **kw) -> None:
        self.send(pb.SidecarMessage(directive=pb.SteeringDirective(**kw)))

    def reset(self) -> None:
        with self.lock:
            self.batches.clear()
            self.starts.clear()
            self.finishes.clear()
            self.stats.clear()

    def wait_for(self, pred: Callable[[], bool], timeout: float = 120.0) -> bool:
        """Poll ``pred`` until it holds. The timeout only ends a wait for something that never
        happens; it is generous so that a slow, shared machine never fails a test."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.02)
        return pred()

    def connected(self) -> bool:
        with self.lock:
            return bool(self.streams)

    # -- queries

    def request_ids(self) -> list[str]:
        with self.lock:
            return list(self.starts)

    def find_request(self, **metadata) -> str:
        with self.lock:
            for rid, s in self.starts.items():
                if all(s.metadata.get(k) == v for k, v in metadata.items()):
                    return rid
        raise KeyError(metadata)

    def activations(self, request_id: str) -> dict[int, dict[int, np.ndarray]]:
        """layer -> position -> activation row (first occurrence wins: dedupe on position)."""
        out: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
        with self.lock:
            batches = list(self.batches)
        for b in batches:
            if request_id not in b.request_ids:
                continue
            ri = list(b.request_ids).index(request_id)
            arr = decode_batch(b)
            for t, (r, pos) in enumerate(zip(b.token_request_index, b.positions, strict=True)):
                if r != ri:
                    continue
                for li, layer in enumerate(b.layers):
                    out[layer].setdefault(int(pos), arr[li, t].copy())
        return out

    def token_ids(self, request_id: str) -> dict[int, int]:
        """position -> the token id the plugin sent with it (batches without ids add nothing)."""
        out: dict[int, int] = {}
        with self.lock:
            batches = list(self.batches)
        for b in batches:
            if request_id not in b.request_ids or not len(b.token_ids):
                continue
            ri = list(b.request_ids).index(request_id)
            for r, pos, tid in zip(b.token_request_index, b.positions, b.token_ids, strict=True):
                if r == ri:
                    out.setdefault(int(pos), int(tid))
        return out

    def flags(self, request_id: str) -> dict[int, bool]:
        out: dict[int, bool] = {}
        with self.lock:
            batches = list(self.batches)
        for b in batches:
            if request_id not in b.request_ids:
                continue
            ri = list(b.request_ids).index(request_id)
            for r, pos, g in zip(b.token_request_index, b.positions, b.is_generated,
                                 strict=True):
                if r == ri:
                    out[int(pos)] = bool(g)
        return out

    # -- the servicer

    def Stream(self, request_iterator, context):  # noqa: N802 - gRPC method name
        out: queue.Queue = queue.Queue()
        with self.lock:
            self.streams.append(out)

        def reader() -> None:
            try:
                for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "hello":
                        with self.lock:
                            self.hellos.append(msg.hello)
                        out.put(pb.SidecarMessage(plan=self.plan))
                    elif kind == "batch":
                        with self.lock:
                            self.batches.append(msg.batch)
                    elif kind == "request_start":
                        with self.lock:
                            self.starts[msg.request_start.request_id] = msg.request_start
                        if self.on_start is not None:
                            for d in self.on_start(msg.request_start) or []:
                                out.put(pb.SidecarMessage(directive=d))
                    elif kind == "request_finish":
                        with self.lock:
                            self.finishes[msg.request_finish.request_id] = msg.request_finish
                    elif kind == "stats":
                        with self.lock:
                            self.stats.append(msg.stats)
            except grpc.RpcError:
                pass
            finally:
                out.put(None)

        threading.Thread(target=reader, daemon=True).start()
        try:
            while context.is_active():
                try:
                    m = out.get(timeout=0.1)
                except queue.Empty:
                    continue
                if m is None:
                    break
                yield m
        finally:
            with self.lock:
                if out in self.streams:
                    self.streams.remove(out)
