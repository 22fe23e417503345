"""After each step: copy the planned layers and tokens of the tap buffer (and those tokens' input
ids) to host memory and hand them to the sender (TP rank 0 only; dropped and counted when the sidecar is away or the queue is
full). On a GPU the copy is asynchronous; the sender waits for its event, never the forward.
With the sidecar's shared-memory ring attached (CPU tap buffer), the one copy goes straight into a
ring slot and only a descriptor is sent (monitor/plugin/shm_writer.py; on the ring's lane, by this
thread, once it is open: monitor/plugin/lane.py); a step larger than a slot is written into as many
slots as it needs; a full ring drops the step."""

from __future__ import annotations

import time

import numpy as np
import torch

from monitor.plugin.client import BatchItem
from monitor.plugin.shm_writer import write_step
from monitor.protocol import pb


def harvest(rt, labels) -> None:
    """``rt`` is the worker's Runtime (with a client and a plan), ``labels`` the step's
    StepLabels."""
    n = min(labels.num_tokens, rt.tables.max_tokens)
    if n <= 0:
        return
    if not rt.client.connected:
        rt.counters.batches_dropped_disconnected += 1
        return
    tok_req = labels.tok_req[:n]
    positions = labels.positions[:n]
    reqs = rt.requests
    prompt_len = np.array([info.prompt_len if (info := reqs.get(r)) is not None else 0
                           for r in labels.req_ids], dtype=np.int64)
    is_gen = positions >= prompt_len[tok_req]
    if rt.scope == pb.TOKEN_SCOPE_PROMPT:
        keep = ~is_gen
    elif rt.scope == pb.TOKEN_SCOPE_GENERATED:
        keep = is_gen
    else:
        keep = None
    if keep is not None:
        if not keep.any():
            return
        if keep.all():
            keep = None
    n_sel = n if keep is None else int(keep.sum())
    per_token = len(rt.plan_slots) * rt.d_model * rt.tables.tap.element_size()
    nbytes = n_sel * per_token
    shm = getattr(rt.client, "shm", None)
    ring = None if rt.tables.on_device or shm is None else shm.writer
    if ring is not None and per_token > ring.slot_bytes:  # not even one token fits a slot
        rt.counters.shm_steps_as_bytes += 1
        ring = None
    if not rt.client.has_room(0 if ring is not None else nbytes):
        rt.counters.batches_dropped_queue_full += 1
        return
    src = rt.tables.tap
    ids = labels.input_ids
    ids = ids[:n] if ids is not None and ids.shape[0] >= n else None
    tok_idx = sel_dev = None
    if keep is not None:
        tok_idx = np.nonzero(keep)[0]
        sel_dev = torch.from_numpy(tok_idx).to(src.device)
        if ids is not None:
            ids = ids.index_select(0, sel_dev.to(ids.device))
    if ring is not None:
        if ids is not None:
            ids = ids.to("cpu", copy=True)
        _into_ring(rt, ring, labels, n, tok_idx, ids, tok_req, positions, is_gen, ring.slot_bytes // per_token)
        return
    event = None
    if isinstance(rt._plan_rows, slice):
        view = src[rt._plan_rows, :n]
    else:
        view = src[:, :n].index_select(0, rt._plan_rows)
    if sel_dev is not None:
        view = view.index_select(1, sel_dev)
    if rt.tables.on_device:
        host = torch.empty(view.shape, dtype=view.dtype, pin_memory=True)
        host.copy_(view, non_blocking=True)
        if ids is not None:  # rides on the same event as the activations
            ids_host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            ids = ids_host.copy_(ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:  # index_select already made a copy: clone only a view of the tap buffer
        gathered = sel_dev is not None or not isinstance(rt._plan_rows, slice)
        host = view if gathered else view.clone()
        if ids is not None:  # vLLM refills its input buffer next step
            ids = ids.to("cpu", copy=True)
    sel = slice(None) if tok_idx is None else tok_idx
    item = BatchItem(
        step=rt.step, layers=list(rt.plan_layers), host=host, event=event,
        request_ids=list(labels.req_ids), token_request_index=tok_req[sel],
        positions=positions[sel], is_generated=is_gen[sel], captured_unix_s=time.time(),
        token_ids=ids)
    if rt.client.offer(item):
        rt.counters.tokens_tapped += n_sel


def _into_ring(rt, ring, labels, n: int, tok_idx, ids, tok_req, positions, is_gen, per_slot: int) -> None:
    """The step's rows gathered straight into ring slots (the step's one copy), ``per_slot``
    tokens a slot, each slot's descriptor offered as its own batch (the sidecar takes a step in
    parts as it does on the bytes path). No free slot: the rest of the step is dropped."""
    n_sel = n if tok_idx is None else len(tok_idx)
    if n_sel > per_slot:
        rt.counters.shm_steps_split += 1
        if tok_idx is None:
            tok_idx = np.arange(n)
    for a in range(0, n_sel, per_slot):
        b = min(n_sel, a + per_slot)
        part = tok_idx if tok_idx is None or (a == 0 and b == n_sel) else tok_idx[a:b]
        slot = write_step(ring, rt.tables.tap, rt._plan_rows, n, part, rt.step)
        if slot is None:  # every slot still in use: the sidecar is behind (or hung)
            rt.counters.batches_dropped_queue_full += 1
            rt.counters.shm_ring_full += 1
            return
        sel = slice(None) if part is None else part
        item = BatchItem(
            step=rt.step, layers=list(rt.plan_layers), host=slot.rows, event=None,
            request_ids=list(labels.req_ids), token_request_index=tok_req[sel],
            positions=positions[sel], is_generated=is_gen[sel], captured_unix_s=time.time(),
            token_ids=None if ids is None else ids[a:b], shm=slot)
        if rt.client.offer(item):
            rt.counters.tokens_tapped += b - a
