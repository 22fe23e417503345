"""The runtime's per-step hooks, on the forward thread, and the records they keep.

The runner adapters (patches.py) call them around every forward. The gRPC thread only queues
ops (sidecar_callbacks.py); these hooks apply them between steps, so a plan or directive never
changes the steering tables during a forward. A mixin of ``Runtime`` (runtime.py), whose
``__init__`` sets the state these methods use.

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
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.plugin import ops
from monitor.plugin.harvest import harvest
from monitor.plugin.steering import PRIVATE_KEY, api_request_id, flat_metadata
from monitor.protocol import pb

logger = logging.getLogger("vllm.featurewatch")


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
            # a plain subtraction, not np.diff: each numpy call costs a few us on the forward
            # thread, whose caches the forward has just flushed
            k = len(self.req_ids)
            qsl = self.qsl.astype(np.int64, copy=False)
            self._tok_req = np.repeat(np.arange(k), qsl[1: k + 1] - qsl[:k])[: self.num_tokens]
        return self._tok_req

    @property
    def positions(self) -> np.ndarray:
        if self._positions is None:
            # token t of request i sits at start_pos[i] + (t - qsl[i])
            tr = self.tok_req
            k = len(self.req_ids)
            first = (self.start_pos[:k].astype(np.int64, copy=False)
                     - self.qsl[:k].astype(np.int64, copy=False))
            self._positions = first[tr] + np.arange(len(tr), dtype=np.int64)
        return self._positions


class StepHooks:
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


def _rows_of(slots: list[int], device) -> slice | torch.Tensor:
    """A contiguous run of tap-buffer slots as a slice (a view), else an index tensor."""
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, dtype=torch.long, device=device)

