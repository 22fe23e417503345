"""The per-worker plugin runtime: created when the model loads, started, closed with the worker.

One object per worker holds the state the gRPC thread and the forward thread share; what each
thread does with it lives with that thread: sidecar_callbacks.py (the gRPC thread's callbacks),
step_hooks.py (the forward thread's per-step hooks, driven by the runner adapters) and
worker_status.py (what the status routes read).
"""

from __future__ import annotations

import os
import threading
from collections import deque

import torch

from monitor.plugin import ops
from monitor.plugin.actions import ActionLimits
from monitor.plugin.client import Counters, SidecarClient
from monitor.plugin.config import PluginConfig
from monitor.plugin.guard import NonfiniteGuard
from monitor.plugin.internal import InternalRequests
from monitor.plugin.sidecar_callbacks import SidecarCallbacks
from monitor.plugin.steering import PolicyView, SteeringState
from monitor.plugin.step_hooks import RequestInfo, StepHooks, StepLabels
from monitor.plugin.table import SteeringTable
from monitor.plugin.worker_status import WorkerStatus, graph_mode
from monitor.protocol import pb


class Runtime(SidecarCallbacks, StepHooks, WorkerStatus):
    def __init__(self, cfg: PluginConfig, *, vllm_config, model_name: str, d_model: int,
                 num_layers: int, hooked: list[int], tables: ops.SteerTables,
                 tp_rank: int, tp_size: int, pp_rank: int, engine: str) -> None:
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.model_name = model_name
        self.d_model = d_model
        self.num_layers = num_layers
        self.hooked = hooked
        self.slot_of_layer = {layer: i for i, layer in enumerate(hooked)}
        self.tables = tables
        self.tp_rank, self.tp_size, self.pp_rank = tp_rank, tp_size, pp_rank
        self.engine = engine
        self.sends = tp_rank == 0  # TP rank 0 of each pipeline stage talks to the sidecar
        self.counters = Counters()
        self.steering = SteeringState(SteeringTable(tables, hooked), d_model, self.counters,
                                      ActionLimits.for_dtype(tables.dtype, tables.max_norm))
        self.guard = NonfiniteGuard(tables)
        self._live = False  # this step runs steered rows (the guard reads its flags after it)
        self.requests: dict[str, RequestInfo] = {}
        self.ops: deque = deque()
        self.plan: pb.TapPlan | None = None  # applied on the forward thread
        self.view = PolicyView(False, ())  # read by the engine core (request creation)
        self.plan_layers: list[int] = []
        self.plan_slots: list[int] = []
        self._plan_rows: slice | torch.Tensor = slice(0, 0)  # plan_slots as a tap-buffer index
        self.scope = pb.TOKEN_SCOPE_ALL
        self.step = 0
        self.runner_kind = "?"
        self.selftest: dict = {"status": "pending"}
        self.internal = InternalRequests()  # vLLM warm-ups and self-test requests (internal.py)
        self.graph_mode = graph_mode(vllm_config)
        self._idx_dirty = 0  # leading steer_idx entries that may be non-zero
        self._staging: list[torch.Tensor] = []
        self._staging_events: list = []
        self._staging_i = 0
        self._labels: StepLabels | None = None
        self._last_labels: StepLabels | None = None
        self._lock = threading.Lock()
        self.client: SidecarClient | None = None
        self._view_file = None
        if self.sends:
            self.client = SidecarClient(cfg, self.counters, self._hello, self._on_connect,
                                        self._on_message, self._on_disconnect, self._stats)
            # a GPU tap buffer sends bytes from the sender thread: those cannot share a lane
            self.client.shm.lane_allowed = cfg.shm_lane and not tables.on_device
            if _separate_engine_core(vllm_config):
                self._view_file = os.path.join(cfg.runtime_dir,
                                               f"featurewatch-{os.getppid()}.policies.json")

    def start(self) -> None:
        if self.client is not None:
            self._publish_view(PolicyView(False, ()))  # replace a stale view of an earlier run
            self.client.start()

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
        if self._view_file:
            try:
                os.unlink(self._view_file)
            except OSError:
                pass


def _separate_engine_core(vllm_config) -> bool:
    """True when this worker is not in the engine core's process (multiprocess executor)."""
    pc = getattr(vllm_config, "parallel_config", None)
    return getattr(pc, "distributed_executor_backend", "uni") not in ("uni", None)
