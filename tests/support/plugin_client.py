"""The plugin's side of the featurewatch.v1 stream, driven by tests and benchmarks over real sockets."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np

from monitor.plugin.client import serialize_message, encode_batch
from monitor.protocol import pb

MAX_MESSAGE = 256 * 1024 * 1024


class PluginClient:
    """Opens Ingest.Stream, sends Hello, and collects what the sidecar sends back."""

    def __init__(self, address: str, d_model: int, layers=(1,), model_name: str = "test-model", engine: str = "0",
                 dtype: int = pb.FLOAT32, shm_capable: bool = False, instance: str = "") -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                                              ("grpc.max_receive_message_length", MAX_MESSAGE)])
        self.d_model, self.dtype = d_model, dtype
        self._out: queue.Queue = queue.Queue(maxsize=256)
        self.received: list[pb.SidecarMessage] = []
        self.arrived_at: list[float] = []  # perf_counter() when each received message arrived
        self._cond = threading.Condition()
        self._out.put(pb.PluginMessage(hello=pb.Hello(model_name=model_name, d_model=d_model, available_layers=list(layers),
                                                      dtype=dtype, plugin_version="test", engine=engine, max_tokens_per_step=8192,
                                                      shm_capable=shm_capable, instance=instance)))
        # bytes pass through as they are: batches pre-encoded the way the real plugin sends them
        stream = self.channel.stream_stream("/featurewatch.v1.Ingest/Stream", request_serializer=serialize_message,
                                            response_deserializer=pb.SidecarMessage.FromString)
        self._call = stream(self._requests())
        self.error: Exception | None = None  # before the reader starts: a stream refused at once sets it
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self):
        while True:
            msg = self._out.get()
            if msg is None:
                return
            yield msg

    def _read(self) -> None:
        try:
            for msg in self._call:
                with self._cond:
                    self.received.append(msg)
                    self.arrived_at.append(time.perf_counter())
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            self.error = exc

    def send(self, msg: pb.PluginMessage | bytes) -> None:
        self._out.put(msg)

    def start_request(self, request_id: str, api_request_id: str = "", metadata=None, traceparent: str = "") -> None:
        self.send(self.start_message(request_id, api_request_id, metadata, traceparent))

    @staticmethod
    def start_message(request_id: str, api_request_id: str = "", metadata=None, traceparent: str = "") -> pb.PluginMessage:
        return pb.PluginMessage(request_start=pb.RequestStart(request_id=request_id, api_request_id=api_request_id,
                                                              metadata=metadata or {}, traceparent=traceparent))

    def finish_request(self, request_id: str) -> None:
        self.send(pb.PluginMessage(request_finish=pb.RequestFinish(request_id=request_id)))

    @staticmethod
    def batch(step: int, layers, activations: np.ndarray, request_ids, token_request, positions, generated,
              dtype: int = pb.FLOAT32) -> pb.PluginMessage:
        return pb.PluginMessage(batch=pb.ActivationBatch(
            step=step, layers=list(layers),
            activations=pb.Tensor(dtype=dtype, shape=list(activations.shape), data=activations.tobytes()),
            request_ids=list(request_ids), token_request_index=list(token_request), positions=list(positions),
            is_generated=list(generated), captured_unix_s=time.time()))

    @staticmethod
    def encoded_batch(step: int, layers, activations: np.ndarray, request_ids, token_request, positions, generated,
                      dtype: int = pb.FLOAT32) -> bytes:
        """The same batch as ``batch()``, wire-encoded by the real plugin's encoder (one copy of the data)."""
        meta = pb.ActivationBatch(step=step, layers=list(layers), request_ids=list(request_ids),
                                  token_request_index=list(token_request), positions=list(positions),
                                  is_generated=list(generated), captured_unix_s=time.time()).SerializeToString()
        head = pb.Tensor(dtype=dtype, shape=list(activations.shape)).SerializeToString()
        return encode_batch(meta, head, memoryview(np.ascontiguousarray(activations)).cast("B"))

    def wait_for(self, predicate, timeout: float = 10.0) -> pb.SidecarMessage:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.received:
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching message in {timeout}s; got {[m.WhichOneof('kind') for m in self.received]}")
                self._cond.wait(remaining)

    def plan(self, timeout: float = 10.0) -> pb.TapPlan:
        return self.wait_for(lambda m: m.HasField("plan"), timeout).plan

    def directives(self) -> list[pb.SteeringDirective]:
        with self._cond:
            return [m.directive for m in self.received if m.HasField("directive")]

    def arrivals(self) -> list[tuple[pb.SidecarMessage, float]]:
        with self._cond:
            return list(zip(self.received, self.arrived_at))

    def half_close(self) -> None:
        """End the request stream (as a plugin shutting down); responses can still arrive."""
        self._out.put(None)

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
        self.channel.close()
