"""Start-up self-test: prove that tapping and steering are live on the path requests take, in
the graph mode that serves. A failed self-test leaves the plugin idle for the model (no tap, no
steering, no connection to the sidecar: vLLM serves it unmonitored) and the status says why.

Runs after vLLM compiled the model and captured its CUDA graphs (wrapped around the worker's
``compile_or_warm_up_model``). Three cases:

* ``served``: one real step through the worker's ``execute_model`` — the path user requests
  take, through the plugin's wrappers — with two hand-built self-test requests of the same
  prompt (internal.py: never announced or harvested), the second on a probe row. A wrapper that
  vLLM no longer calls (a method moved or overridden in a subclass) leaves ``wrapper_called``
  false and the probe unsteered.
* ``decode`` / ``mixed``: the runner's own ``_dummy_run`` twice — steering row 0, then a probe
  row — for a decode-shaped batch (served by FULL CUDA graphs where vLLM uses them) and a
  mixed/prefill-shaped one (PIECEWISE or eager).

Each case checks:

* the tap buffer was overwritten (it is filled with NaN first): tapping is live;
* on the first hooked layer, the probe clamp (encoder = decoder = e_j, threshold -inf, value V)
  made dimension j exactly V and the probe direction (S * e_k) shifted dimension k by S, all other
  dimensions unchanged: steering is live and ordered before the tap;
* the model's final hidden states changed: the steered residual reaches the output;
* the finiteness guard is live: the last token runs a row whose add vector is NaN, and its row
  of the first hooked layer is left as it was (finite, unsteered) and counted in ``nonfinite``.

The number of steps is fixed whatever happens, so tensor/data-parallel ranks stay in step, and
with tensor parallelism the ranks agree on the outcome (one failed rank idles them all).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time

import numpy as np
import torch

from monitor.plugin import ops
from monitor.plugin.actions import AddAction, ClampAction
from monitor.plugin.internal import SELFTEST_PREFIX

logger = logging.getLogger("vllm.featurewatch")

PROBE_VALUE = 7.5
PROBE_SHIFT = 3.0


def _probe_actions(layer: int, d: int) -> tuple:
    j, k = 0, 1 if d > 1 else 0
    e_j = np.zeros(d, dtype=np.float32)
    e_j[j] = 1.0
    e_k = np.zeros(d, dtype=np.float32)
    e_k[k] = PROBE_SHIFT
    clamp = ClampAction(layer, e_j, 0.0, -3.0e38, e_j.copy(), PROBE_VALUE, None, 0.0,
                        key="selftest-clamp")
    add = AddAction(layer, e_k, key="selftest-add")
    return (clamp, add), j, k


def _poison_action(layer: int, d: int) -> tuple:
    """Built directly (parse_action refuses it): an add whose vector is NaN."""
    return (AddAction(layer, np.full(d, np.nan, dtype=np.float32), key="selftest-nan"),)


def _dummy(runner, n: int, decode: bool):
    kwargs = {"uniform_decode": decode}
    # V1 builds attention metadata for dummy runs only when asked (or for FULL graphs); without it
    # attention outputs are uninitialised memory and two runs are not comparable.
    if "force_attention" in inspect.signature(runner._dummy_run).parameters:
        kwargs["force_attention"] = True
    out = runner._dummy_run(n, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    return None if hidden is None else hidden[:n].detach().float().cpu().clone()


def _tol(tables, scale: float) -> float:
    return (2e-2 if tables.dtype != torch.float32 else 1e-5) * scale


def _checks(rt, tap0, tap1, j: int, k: int, guarded: bool, refused: int) -> dict[str, bool]:
    """``tap0``/``tap1``: ``[hooked layers, tokens, d]`` of the same tokens unsteered / on the
    probe row (the last one on the NaN row when ``guarded``)."""
    tables, d = rt.tables, rt.d_model
    checks: dict[str, bool] = {}
    checks["tap_written"] = bool(torch.isfinite(tap0).all() and torch.isfinite(tap1).all())
    m = tap0.shape[1] - 1 if guarded else tap0.shape[1]  # tokens on the probe row
    first0, first1 = tap0[0, :m], tap1[0, :m]
    tol = _tol(tables, max(1.0, PROBE_VALUE, float(first0.abs().max())))
    checks["clamp_applied"] = bool(torch.allclose(
        first1[:, j], torch.full_like(first1[:, j], PROBE_VALUE), atol=tol, rtol=0))
    if k != j:
        checks["add_applied"] = bool(torch.allclose(
            first1[:, k], first0[:, k] + PROBE_SHIFT, atol=tol, rtol=0))
    others = [c for c in range(d) if c not in (j, k)]
    if others:
        checks["other_dims_unchanged"] = bool(torch.allclose(
            first1[:, others], first0[:, others], atol=tol, rtol=0))
    if len(rt.hooked) > 1:
        checks["downstream_changed"] = not torch.equal(tap1[1:, :m], tap0[1:, :m])
    if guarded:
        tol = _tol(tables, max(1.0, float(tap0[0, m].abs().max())))
        checks["nonfinite_guarded"] = refused >= 1 and bool(
            torch.allclose(tap1[0, m], tap0[0, m], atol=tol, rtol=0))
    return checks


def _new_request(cls, **values):
    """A ``NewRequestData`` from the fields this vLLM's version has (the rest default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _served_case(rt, worker, row: int, bad_row: int, j: int, k: int) -> dict:
    """One step through ``worker.execute_model``: two requests of the same prompt, the second
    on the probe row (its last token on the NaN row), then a step that finishes both."""
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput

    tables = rt.tables
    runner = worker.model_runner
    n = max(2, min(8, tables.max_tokens // 2))
    vocab = int(rt.vllm_config.model_config.get_vocab_size())
    prompt = [(7 * i + 3) % vocab for i in range(n)]
    ids = [SELFTEST_PREFIX + "plain_", SELFTEST_PREFIX + "probe_"]
    specs = [g.kv_cache_spec for g in runner.kv_cache_config.kv_cache_groups]
    per_req = [math.ceil(n / s.block_size) for s in specs]
    if 1 + 2 * sum(per_req) > runner.kv_cache_config.num_blocks:
        return {"passed": False, "error": "not enough KV blocks for the self-test step"}
    nxt = 1  # block 0 is vLLM's null block; before serving every other block is free
    reqs = []
    params = SamplingParams(max_tokens=1, temperature=0.0)
    for rid in ids:
        blocks = []
        for c in per_req:
            blocks.append(list(range(nxt, nxt + c)))
            nxt += c
        reqs.append(_new_request(
            NewRequestData, req_id=rid, prompt_token_ids=list(prompt), mm_features=[],
            mm_inputs=[], mm_hashes=[], mm_positions=[], sampling_params=params,
            pooling_params=None, block_ids=tuple(blocks), num_computed_tokens=0,
            lora_request=None, prefill_token_ids=list(prompt)))
    step = SchedulerOutput.make_empty()
    step.scheduled_new_reqs = reqs
    step.num_scheduled_tokens = {rid: n for rid in ids}
    step.total_num_scheduled_tokens = 2 * n
    done = SchedulerOutput.make_empty()
    done.finished_req_ids = set(ids)
    info: dict = {"tokens": 2 * n}
    rt.internal.probe = {ids[1]: (row, bad_row)}
    rt.internal.seen.clear()
    try:
        if tables.do_tap:
            tables.tap[:, : 2 * n].fill_(float("nan"))
        tables.nonfinite.zero_()
        out = worker.execute_model(step)
        if out is None and hasattr(worker, "sample_tokens"):
            worker.sample_tokens(None)  # vLLM >= 0.29 samples in a second call
        tap = tables.tap[:, : 2 * n].float().cpu().clone() if tables.do_tap else None
        refused = int(tables.nonfinite[0, bad_row].item()) if bad_row else 0
    finally:
        rt.internal.probe = None
        tables.nonfinite.zero_()
        ops.set_step_live(False)
        worker.execute_model(done)
    seen = [lab for lab in rt.internal.seen if set(ids) <= set(lab.req_ids)]
    checks = {"wrapper_called": bool(seen)}
    if seen and tap is not None:
        lab = seen[-1]
        spans = []
        for rid in ids:
            i = lab.req_ids.index(rid)
            spans.append(slice(int(lab.qsl[i]), int(lab.qsl[i + 1])))
        if all(s.stop - s.start == n for s in spans):
            checks.update(_checks(rt, tap[:, spans[0]], tap[:, spans[1]], j, k,
                                  bad_row > 0, refused))
        else:
            checks["tokens_as_scheduled"] = False
    info["checks"] = checks
    info["passed"] = all(checks.values())
    return info


def run_selftest(rt, worker) -> dict:
    t0 = time.time()
    runner = worker.model_runner
    tables = rt.tables
    d = rt.d_model
    result: dict = {"status": "pending", "cases": {}, "graph_mode": rt.graph_mode}
    actions, j, k = _probe_actions(rt.hooked[0], d)
    table = rt.steering.table
    poison = _poison_action(rt.hooked[0], d)
    row = bad_row = 0
    try:
        row = table.acquire(actions)
        bad_row = table.acquire(poison)
        table.flush()
    except Exception as e:  # noqa: BLE001
        result.update(status="failed", error=f"probe row: {e}")
    try:
        result["cases"]["served"] = _served_case(rt, worker, row, bad_row, j, k)
    except Exception as e:  # noqa: BLE001 - a failed self-test must not kill serving
        logger.debug("featurewatch: self-test case served raised", exc_info=True)
        result["cases"]["served"] = {"passed": False, "error": f"{type(e).__name__}: {e}"}
    q = int(getattr(runner, "uniform_decode_query_len", 0)
            or getattr(runner, "decode_query_len", 0) or 1)
    n_decode = q * max(1, min(4, tables.max_tokens // q))
    n_mixed = max(1, min(16, tables.max_tokens))
    for case, n, decode in (("decode", n_decode, True), ("mixed", n_mixed, False)):
        info: dict = {"tokens": n}
        try:
            if tables.do_tap:
                tables.tap[:, :n].fill_(float("nan"))
            tables.steer_idx[:n].zero_()
            ops.set_step_live(False)
            h0 = _dummy(runner, n, decode)
            tap0 = tables.tap[:, :n].float().cpu().clone() if tables.do_tap else None
            tables.steer_idx[:n].fill_(row)
            guarded = n > 1 and bad_row > 0  # the last token runs the NaN row
            if guarded:
                tables.steer_idx[n - 1] = bad_row
            tables.nonfinite.zero_()
            ops.set_step_live(True)
            h1 = _dummy(runner, n, decode)
            tap1 = tables.tap[:, :n].float().cpu().clone() if tables.do_tap else None
            refused = int(tables.nonfinite[0, bad_row].item()) if guarded else 0
            tables.nonfinite.zero_()
            checks: dict[str, bool] = {}
            if tap0 is not None:
                checks.update(_checks(rt, tap0, tap1, j, k, guarded, refused))
            if h0 is not None and h1 is not None:
                checks["output_changed"] = not torch.equal(h0, h1)
            info["checks"] = checks
            info["passed"] = bool(checks) and all(checks.values())
        except Exception as e:  # noqa: BLE001 - a failed self-test must not kill serving
            logger.debug("featurewatch: self-test case %s raised", case, exc_info=True)
            info.update(passed=False, error=f"{type(e).__name__}: {e}")
        finally:
            tables.steer_idx[:n].zero_()
            ops.set_step_live(False)
        result["cases"][case] = info
    try:
        if row:
            table.release(actions)
        if bad_row:
            table.release(poison)
        table.flush()
    except Exception:  # noqa: BLE001
        logger.exception("featurewatch: self-test cleanup")
    if result["status"] == "pending":
        ok = all(c.get("passed") for c in result["cases"].values())
        result["status"] = "passed" if ok else "failed"
    result["seconds"] = round(time.time() - t0, 3)
    return result


def failures(result: dict) -> str:
    """What failed, in one line: ``served: wrapper_called, clamp_applied; decode: error ...``."""
    parts = []
    if result.get("error"):
        parts.append(str(result["error"])[:200])
    for case, info in (result.get("cases") or {}).items():
        if info.get("passed"):
            continue
        bad = [c for c, ok in (info.get("checks") or {}).items() if not ok]
        if info.get("error"):
            bad.append(str(info["error"])[:200])
        parts.append(f"{case}: {', '.join(bad) or 'no check ran'}")
    return "; ".join(parts) or "unknown"


def _agree(rt, ok: bool) -> bool:
    """With tensor parallelism every rank must take the same path (rank 0 broadcasts at each
    step): passed only if every rank passed."""
    if rt.tp_size <= 1:
        return ok
    from vllm.distributed.parallel_state import get_tp_group

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN,
                                 group=get_tp_group().cpu_group)
    return bool(flag.item())


def after_selftest(rt) -> None:
    """Passed: connect to the sidecar. Failed: idle for this model — hooks off, no runtime (the
    wrappers run vLLM's own code), no connection — one log line saying why."""
    ok = rt.selftest.get("status") == "passed"
    try:
        agreed = _agree(rt, ok)
    except Exception as e:  # noqa: BLE001
        agreed = False
        rt.selftest.setdefault("error", f"ranks could not agree: {type(e).__name__}: {e}")
    if ok and agreed:
        logger.info("featurewatch: self-test passed (%s, %.2f s): %s", rt.graph_mode,
                    rt.selftest.get("seconds", 0.0), sorted(rt.selftest.get("cases", {})))
        rt.start()
        return
    if ok:
        rt.selftest["status"] = "failed"
        reason = "self-test failed on another tensor-parallel rank"
    else:
        reason = f"self-test failed: {failures(rt.selftest)}"
    disable(rt, reason)
    logger.error("featurewatch: idle for this model, vLLM serves it unmonitored: %s (%s)",
                 reason, rt.graph_mode)


def disable(rt, reason: str) -> None:
    """Stop tapping and steering for this model: hooks off and removed (a compiled graph keeps
    the op, which then runs unsteered and untouched), no runtime, no sidecar connection."""
    from monitor.plugin import state

    for hook, handle in getattr(rt, "layer_hooks", ()):
        hook.enabled = False
        handle.remove()
    ops.set_step_live(False)
    rt.tables.steer_idx.zero_()
    state.IDLE[0] = reason
    state.set_runtime(None)
    rt.close()
