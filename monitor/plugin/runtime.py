"""The per-worker plugin runtime: created when the model loads, driven by the runner adapters.

Per step, on the forward thread (``pre_step`` → ``before_forward`` → forward → ``after_forward``):

1. apply the ops queued by the gRPC thread (plans, directives, disconnects) — with tensor
   parallelism, TP rank 0 broadcasts them so every rank changes its tables at the same step;
2. register new requests (RequestStart; policies decided at request creation), finish old ones;
3. build the per-token steering rows and copy them into ``steer_idx``;
4. after the forward, read the steering guard's flags (guard.py: rows kept unsteered because
   steering made them non-finite or oversized; their actions are dropped from the next step on),
   and copy the planned layers/tokens of the tap buffer to the sender (harvest.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.plugin import ops
from monitor.plugin.actions import ActionLimits
from monitor.plugin.client import Counters, SidecarClient
from monitor.plugin.config import PluginConfig
from monitor.plugin.guard import NonfiniteGuard
from monitor.plugin.harvest import harvest
from monitor.plugin.internal import InternalRequests
from monitor.plugin.steering import (
    PRIVATE_KEY,
    PolicyView,
    SteeringState,
    api_request_id,
    flat_metadata,
    view_from_plan,
)
from monitor.plugin.table import SteeringTable
from monitor.protocol import pb

logger = logging.getLogger("vllm.featurewatch")

_MAX_PENDING_OPS = 4096
_SCOPES = {pb.TOKEN_SCOPE_ALL: "all", pb.TOKEN_SCOPE_PROMPT: "prompt",
           pb.TOKEN_SCOPE_GENERATED: "generated"}


@dataclass
class RequestInfo:
    req_id: str
    api_id: str
    metadata: dict[str, str]
    traceparent: str
    prompt_len: int
    cached: int
    started: float
    policies: list[str] = field(default_factory=list)

    def start_message(self) -> pb.PluginMessage:
        return pb.PluginMessage(request_start=pb.RequestStart(
            request_id=self.req_id, api_request_id=self.api_id, metadata=self.metadata,
            traceparent=self.traceparent, prompt_tokens=self.prompt_len,
            cached_prompt_tokens=self.cached, started_unix_s=self.started,
            steering_policy=",".join(self.policies)))


@dataclass
class StepLabels:
    req_ids: list[str]
    qsl: np.ndarray  # [num_reqs + 1]
    start_pos: np.ndarray  # [num_reqs] tokens already computed
    num_tokens: int
    # the forward's input ids ([>= num_tokens], on the model's device; None when the forward
    # takes embeddings instead): harvest copies the tapped tokens' ids with their activations
    input_ids: torch.Tensor | None = None
    _tok_req: np.ndarray | None = None
    _positions: np.ndarray | None = None

    @property
    def tok_req(self) -> np.ndarray:
        if self._tok_req is None:
            counts = np.diff(self.qsl[: len(self.req_ids) + 1]).astype(np.int64)
            self._tok_req = np.repeat(np.arange(len(self.req_ids)), counts)[: self.num_tokens]
        return self._tok_req

    @property
    def positions(self) -> np.ndarray:
        if self._positions is None:
            tr = self.tok_req
            local = np.arange(len(tr), dtype=np.int64) - self.qsl[tr].astype(np.int64)
            self._positions = self.start_pos[tr].astype(np.int64) + local
        return self._positions


class Runtime:
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
        self.graph_mode = _graph_mode(vllm_config)
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
            if _separate_engine_core(vllm_config):
                self._view_file = os.path.join(cfg.runtime_dir,
                                               f"featurewatch-{os.getppid()}.policies.json")

    def start(self) -> None:
        if self.client is not None:
            self._publish_view(PolicyView(False, ()))  # replace a stale view of an earlier run
            self.client.start()

    # ------------------------------------------------------------ gRPC thread callbacks

    def _hello(self) -> pb.Hello:
        dt = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16,
              torch.bfloat16: pb.BFLOAT16}.get(self.tables.dtype, pb.DTYPE_UNSPECIFIED)
        from monitor.plugin import __version__
        return pb.Hello(model_name=self.model_name, d_model=self.d_model,
                        available_layers=self.hooked, dtype=dt, plugin_version=__version__,
                        engine=self.engine, tp_rank=self.tp_rank,
                        instance=f"{socket.gethostname()}:{os.getpid()}",
                        max_tokens_per_step=self.tables.max_tokens)

    def _on_connect(self) -> list[pb.PluginMessage]:
        return [info.start_message() for info in list(self.requests.values())]

    def _on_message(self, msg: pb.SidecarMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "plan":
            self.ops.append(("plan", msg.plan.SerializeToString()))
            # The engine core decides policies from this view; the op above is queued first, so
            # any request decided with it is scheduled after the plan is applied. Policies the
            # worker will refuse are left out (no salt, no decision for them).
            self._publish_view(view_from_plan(msg.plan, self.steering.valid_policy))
            self.counters.plans_received += 1  # after the view: a reader of it sees the view
        elif kind == "directive":
            self.counters.directives_received += 1
            if len(self.ops) >= _MAX_PENDING_OPS:  # an idle engine applies nothing: bound it
                self.counters.directives_rejected += 1
                return
            self.ops.append(("directive", msg.directive.SerializeToString()))

    def _on_disconnect(self) -> None:
        self.ops.append(("disconnect", b""))
        if self.steering.failure_mode != "closed":
            self._publish_view(PolicyView(False, ()))

    def _publish_view(self, view: PolicyView | None = None,
                      without: set[str] = frozenset()) -> None:
        """Publish ``view``, or the current one less the policies ``without`` (both threads)."""
        with self._lock:
            if view is None:
                view = self.view.without(set(without))
            self.view = view
            self._write_view(view)

    def _write_view(self, view: PolicyView) -> None:
        if self._view_file:
            tmp = self._view_file + ".tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(view.to_json())
                os.replace(tmp, self._view_file)
            except OSError:
                logger.exception("featurewatch: cannot write %s", self._view_file)

    def _stats(self) -> pb.PluginStats:
        c = self.counters
        return pb.PluginStats(
            batches_enqueued=c.batches_enqueued,
            batches_dropped_queue_full=c.batches_dropped_queue_full,
            batches_sent=c.batches_sent, tokens_tapped=c.tokens_tapped,
            enqueue_seconds_sum=c.enqueue_seconds_sum, enqueue_count=c.enqueue_count,
            reconnects=c.reconnects, cached_prompt_tokens_untapped=c.cached_prompt_tokens_untapped,
            steering_rows_applied=c.steering_rows_applied,
            directives_rejected=c.directives_rejected,
            queue_depth=self.client.queue_depth if self.client else 0,
            queue_capacity=self.cfg.queue_batches,
            policy_tokens_steered=self.steering.steered.policies.copy(),
            rule_tokens_steered=self.steering.steered.rules.copy())

    # ------------------------------------------------------------ forward thread

    def _drain_ops(self) -> list[tuple[str, bytes]]:
        out = []
        while self.ops:
            out.append(self.ops.popleft())
        return out

    def _apply_ops(self, ops_list: list[tuple[str, bytes]]) -> None:
        for kind, data in ops_list:
            if kind == "plan":
                plan = pb.TapPlan.FromString(data)
                self.plan = plan
                self.steering.apply_plan(plan)
                self.plan_layers = [x for x in plan.layers if x in self.slot_of_layer]
                self.plan_slots = [self.slot_of_layer[x] for x in self.plan_layers]
                self._plan_rows = _rows_of(self.plan_slots, self.tables.device)
                self.scope = plan.scope
            elif kind == "directive":
                d = pb.SteeringDirective.FromString(data)
                err = self.steering.apply_directive(d, self.requests)
                if err is None:
                    self.counters.directives_applied += 1
                    if not d.cancel and self._computed(d.request_id) > d.from_position:
                        self.counters.directives_late += 1
                else:
                    self.counters.directives_rejected += 1
                    logger.debug("featurewatch: directive %s rejected: %s", d.directive_id, err)
            elif kind == "disconnect":
                self.steering.on_disconnect()
                if self.steering.failure_mode != "closed":
                    self.plan = None
                    self.plan_layers, self.plan_slots = [], []
            elif kind == "local":
                self.steering.local_override = None if data == b"" else data == b"1"
            elif kind == "nonfinite":
                self._drop_nonfinite(set(data.decode().split("\n")))

    def _collect_nonfinite(self) -> None:
        """Read the guard's flags; on TP rank 0, queue the drop for every rank (next step)."""
        rows, keys, steered = self.guard.collect()
        if steered:
            self.steering.steered.add(steered)
        if not rows or not self.sends:
            return
        self.counters.steering_nonfinite_rows += rows
        self.ops.append(("nonfinite", "\n".join(sorted(keys)).encode()))

    def _drop_nonfinite(self, keys: set[str]) -> None:
        dropped, names = self.steering.drop_nonfinite(keys)
        n = dropped + len(names)
        self.counters.steering_nonfinite_dropped += n
        self.counters.directives_rejected += n  # what PluginStats carries to the sidecar
        if names and self.sends:
            self._publish_view(without=set(names))
        logger.warning("featurewatch: steering made residual rows non-finite; kept them "
                       "unsteered and dropped %d steering source(s), policies %s", dropped, names)

    def _computed(self, req_id: str) -> int:
        """Tokens of ``req_id`` computed by the last step that ran it (0 if unknown)."""
        lab = self._last_labels
        if lab is None or req_id not in lab.req_ids:
            return 0
        i = lab.req_ids.index(req_id)
        return int(lab.start_pos[i] + lab.qsl[i + 1] - lab.qsl[i])

    def pre_step(self, scheduler_output) -> None:
        """Before the runner updates its state for a step (both runners' ``execute_model``)."""
        t0 = time.perf_counter()
        try:
            self._pre_step(scheduler_output)
        finally:
            self.counters.host_seconds += time.perf_counter() - t0

    def _pre_step(self, scheduler_output) -> None:
        ops_list = self._drain_ops() if self.sends else []
        if self.tp_size > 1:
            from vllm.distributed.parallel_state import get_tp_group
            ops_list = get_tp_group().broadcast_object(ops_list if self.tp_rank == 0 else None,
                                                       src=0)
        if ops_list:
            self._apply_ops(ops_list)
        finished = getattr(scheduler_output, "featurewatch_finished", None) or {}
        for rid in getattr(scheduler_output, "finished_req_ids", ()) or ():
            self._finish(rid, finished.get(rid))
        for nr in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            if nr.req_id not in self.requests and not self.internal.new_request(nr.req_id):
                self._start(nr)

    def _start(self, nr) -> None:
        sp = nr.sampling_params
        extra = (sp.extra_args if sp is not None else None) or {}
        decision = extra.get(PRIVATE_KEY) or {}
        metadata = flat_metadata(extra)
        prompt_len = (len(nr.prompt_token_ids) if nr.prompt_token_ids is not None
                      else (nr.prompt_embeds.shape[0] if nr.prompt_embeds is not None else 0))
        if "policies" in decision:
            if decision.get("view_missing"):
                self.counters.policy_view_missing += 1
            names = self.steering.start_request(nr.req_id, decision["policies"],
                                                decision.get("hashes"), metadata)
        else:
            names = self.steering.start_request(nr.req_id, None, None, metadata)
            if names:
                self.counters.salt_missing += 1
        info = RequestInfo(
            req_id=nr.req_id,
            api_id=api_request_id(nr.req_id, decision.get("external_request_id")),
            metadata=metadata,
            traceparent=decision.get("traceparent", ""),
            prompt_len=prompt_len,
            cached=int(nr.num_computed_tokens or 0),
            started=time.time(),
            policies=names,
        )
        self.requests[nr.req_id] = info
        self.counters.requests_started += 1
        self.counters.cached_prompt_tokens_untapped += info.cached
        if self.client is not None:
            self.client.offer(info.start_message())

    def _finish(self, rid: str, finished: tuple[str, int] | None) -> None:
        info = self.requests.pop(rid, None)
        self.steering.finish_request(rid)
        if info is None:
            return
        self.counters.requests_finished += 1
        # reason and length come from the engine core's scheduler (engine_core._wrap_schedule)
        reason, n_out = finished or ("", 0)
        if self.client is not None:
            self.client.offer(pb.PluginMessage(request_finish=pb.RequestFinish(
                request_id=rid, generated_tokens=n_out, finish_reason=reason)))

    def before_forward(self, labels: StepLabels) -> None:
        """Fill ``steer_idx`` for this step's tokens (host work, before the forward)."""
        t0 = time.perf_counter()
        try:
            self._before_forward(labels)
        finally:
            self.counters.host_seconds += time.perf_counter() - t0

    def _before_forward(self, labels: StepLabels) -> None:
        if self.internal.in_step(labels):  # vLLM warm-up or self-test: never harvested
            self._internal_step(labels)
            return
        self.step += 1
        self.counters.steps += 1
        self._labels = labels
        if self.tables.on_device:
            self._collect_nonfinite()  # the last read-back, if the device has finished it
        self.steering.table.flush()
        n = labels.num_tokens
        rows = None
        sources: dict[int, dict[str, int]] = {}  # row -> {policy/directive: tokens}
        if self.steering.active and n:
            n = min(n, self.tables.max_tokens)
            req_index = {rid: i for i, rid in enumerate(labels.req_ids)}
            rows = self.steering.rows_for_step(req_index, labels.qsl, labels.positions, n,
                                               sources)
        if rows is not None:
            self.counters.steering_rows_applied += int(np.count_nonzero(rows))
            self._write_idx(rows, max(n, self._idx_dirty))
            self._idx_dirty = n
            self.guard.note_step(rows, self.steering.table.row_keys, sources)
            self._live = True
            ops.set_step_live(True)
        else:
            if self._idx_dirty:
                self.tables.steer_idx[: self._idx_dirty].zero_()
                self._idx_dirty = 0
            ops.set_step_live(False)
        self._last_labels = labels

    def _internal_step(self, labels: StepLabels) -> None:
        """Steer only the self-test's probe tokens, without the guard's bookkeeping (the
        self-test reads the guard's counts itself); nothing is harvested."""
        self._labels = None
        rows = self.internal.probe_rows(labels, self.tables.max_tokens)
        if rows is None:
            if self._idx_dirty:
                self.tables.steer_idx[: self._idx_dirty].zero_()
                self._idx_dirty = 0
            ops.set_step_live(False)
            return
        self._write_idx(rows, max(len(rows), self._idx_dirty))
        self._idx_dirty = len(rows)
        ops.set_step_live(True)

    def _write_idx(self, rows: np.ndarray, span: int) -> None:
        buf = np.zeros(span, dtype=np.int64)
        buf[: len(rows)] = rows
        src = torch.from_numpy(buf)
        if not self.tables.on_device:
            self.tables.steer_idx[:span].copy_(src)
            return
        # pinned double buffer; wait until the copy that last used this slot has run
        if not self._staging:
            for _ in range(2):
                self._staging.append(torch.empty(self.tables.max_tokens, dtype=torch.int64,
                                                 pin_memory=True))
                self._staging_events.append(None)
        i = self._staging_i
        self._staging_i ^= 1
        if self._staging_events[i] is not None:
            self._staging_events[i].synchronize()
        self._staging[i][:span].copy_(src)
        self.tables.steer_idx[:span].copy_(self._staging[i][:span], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._staging_events[i] = ev

    def abort_forward(self) -> None:
        self._labels = None
        self._live = False
        self.guard.abort_step()
        ops.set_step_live(False)

    def after_forward(self) -> None:
        t0 = time.perf_counter()
        try:
            self._after_forward()
        finally:
            self.counters.host_seconds += time.perf_counter() - t0

    def _after_forward(self) -> None:
        labels, self._labels = self._labels, None
        ops.set_step_live(False)
        if self._live:
            self._live = False
            self.guard.after_step()
            if not self.tables.on_device:
                self._collect_nonfinite()
        if labels is None or self.client is None or not self.plan_slots or not self.tables.do_tap:
            return
        harvest(self, labels)

    # ------------------------------------------------------------ status / control

    def status(self) -> dict:
        client = self.client
        return {
            "enabled": True,
            "address": self.cfg.address,
            "sends": self.sends,
            "connected": bool(client and client.connected),
            "last_error": client.last_error if client else "",
            # activations' path to the sidecar: "shm" (its shared-memory ring) or "grpc" (bytes)
            "transport": client.transport if client else None,
            "shm": client.shm.describe() if client else None,
            "tp_rank": self.tp_rank, "tp_size": self.tp_size, "pp_rank": self.pp_rank,
            "engine": self.engine,
            "runner": self.runner_kind,
            "graph_mode": self.graph_mode,
            "model_name": self.model_name,
            "d_model": self.d_model,
            "hooked_layers": self.hooked,
            "plan": None if self.plan is None else {
                "layers": self.plan_layers, "scope": _SCOPES.get(self.scope, "?"),
                "steering_enabled": self.plan.steering_enabled,
                "failure_mode": self.plan.steering_failure_mode or "open",
                "policies": [p.name for p in self.plan.policies],
                "rules_version": self.plan.rules_version},
            "max_tokens_per_step": self.tables.max_tokens,
            "buffer_bytes": self.tables.nbytes(),
            "queue": {"depth": client.queue_depth if client else 0,
                      "capacity": self.cfg.queue_batches},
            "counters": self.counters.as_dict(),
            "steering": self.steering.describe(),
            "live_requests": len(self.requests),
            "selftest": self.selftest,
            "vllm_internal": self.internal.as_dict(),
            "config": {k: v for k, v in self.cfg.as_dict().items() if k != "address"},
        }

    def set_local_steering(self, enabled: bool | None) -> None:
        """Local kill switch (status route); applied between steps on every rank."""
        self._apply_ops([("local", b"" if enabled is None else (b"1" if enabled else b"0"))])

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
        if self._view_file:
            try:
                os.unlink(self._view_file)
            except OSError:
                pass


def _graph_mode(vllm_config) -> dict:
    cc = getattr(vllm_config, "compilation_config", None)
    mc = getattr(vllm_config, "model_config", None)
    return {
        "compilation_mode": _name(getattr(cc, "mode", "?")),
        "cudagraph_mode": _name(getattr(cc, "cudagraph_mode", "?")),
        "enforce_eager": bool(getattr(mc, "enforce_eager", False)),
    }


def _rows_of(slots: list[int], device) -> slice | torch.Tensor:
    """A contiguous run of tap-buffer slots as a slice (a view), else an index tensor."""
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, dtype=torch.long, device=device)


def _name(v) -> str:
    return getattr(v, "name", None) or str(v)


def _separate_engine_core(vllm_config) -> bool:
    """True when this worker is not in the engine core's process (multiprocess executor)."""
    pc = getattr(vllm_config, "parallel_config", None)
    return getattr(pc, "distributed_executor_backend", "uni") not in ("uni", None)
