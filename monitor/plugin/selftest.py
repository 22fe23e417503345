"""Start-up self-test: prove that tapping and steering are live in the graph mode that serves.

Runs after vLLM compiled the model and captured its CUDA graphs (wrapped around the worker's
``compile_or_warm_up_model``). For a decode-shaped batch (served by FULL CUDA graphs where vLLM
uses them) and a mixed/prefill-shaped one (PIECEWISE or eager), it calls the runner's own
``_dummy_run`` twice — steering row 0, then a probe row — and checks:

* the tap buffer was overwritten (it is filled with NaN first): tapping is live;
* on the first hooked layer, the probe clamp (encoder = decoder = e_j, threshold -inf, value V)
  made dimension j exactly V and the probe direction (S * e_k) shifted dimension k by S, all other
  dimensions unchanged: steering is live and ordered before the tap;
* the model's final hidden states changed: the steered residual reaches the output;
* the finiteness guard is live: the last token runs a row whose add vector is NaN, and its row
  of the first hooked layer is left as it was (finite, unsteered) and counted in ``nonfinite``.

The number of dummy runs is fixed whatever happens, so data-parallel ranks stay in step.
"""

from __future__ import annotations

import inspect
import logging
import time

import numpy as np
import torch

from monitor.plugin import ops
from monitor.plugin.actions import AddAction, ClampAction

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


def run_selftest(rt, runner) -> dict:
    t0 = time.time()
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
                checks["tap_written"] = bool(torch.isfinite(tap0).all()
                                             and torch.isfinite(tap1).all())
                m = n - 1 if guarded else n  # tokens on the probe row
                first0, first1 = tap0[0, :m], tap1[0, :m]
                scale = max(1.0, PROBE_VALUE, float(first0.abs().max()))
                tol = (2e-2 if tables.dtype != torch.float32 else 1e-5) * scale
                checks["clamp_applied"] = bool(
                    torch.allclose(first1[:, j], torch.full_like(first1[:, j], PROBE_VALUE),
                                   atol=tol, rtol=0))
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
                    scale = max(1.0, float(tap0[0, m].abs().max()))
                    tol = (2e-2 if tables.dtype != torch.float32 else 1e-5) * scale
                    checks["nonfinite_guarded"] = refused >= 1 and bool(
                        torch.allclose(tap1[0, m], tap0[0, m], atol=tol, rtol=0))
            if h0 is not None and h1 is not None:
                checks["output_changed"] = not torch.equal(h0, h1)
            info["checks"] = checks
            info["passed"] = bool(checks) and all(checks.values())
        except Exception as e:  # noqa: BLE001 - a failed self-test must not kill serving
            logger.exception("featurewatch: self-test case %s raised", case)
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
    log = logger.info if result["status"] == "passed" else logger.error
    log("featurewatch: self-test %s (%s): %s", result["status"], rt.graph_mode,
        {c: v.get("checks", v.get("error")) for c, v in result["cases"].items()})
    return result
