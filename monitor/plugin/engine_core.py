"""The plugin's patches outside the worker: the engine core (request creation, scheduler) and the
API server (traceparent). Installed by ``monitor.plugin.register`` (see patches.py for the map of
every patch point).

Request creation decides the always-on policies of a request from the worker's policy view (in
process, or the file a multiprocess executor's rank-0 worker publishes), salts the prefix cache
of steered requests, and hands the decision to the worker in ``extra_args["_featurewatch"]``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monitor.plugin import failopen
from monitor.plugin.config import ENV_ADDRESS
from monitor.plugin.patches import _PATCHED, _wrap

logger = logging.getLogger("vllm.featurewatch")


# ---------------------------------------------------------------- scheduler: finish reasons


_FINISHED: dict[str, tuple[str, int]] = {}  # engine core: finish reason, output tokens


def _wrap_free_request(orig):
    def _free_request(self, *args, **kwargs):
        try:
            request = failopen.arg(args, kwargs, 0, "request")
            reason = request.get_finished_reason()
            _FINISHED[request.request_id] = ("" if reason is None else str(reason),
                                             int(request.num_output_tokens))
            while len(_FINISHED) > 65536:
                _FINISHED.pop(next(iter(_FINISHED)))
        except Exception:  # noqa: BLE001
            failopen.failed("_free_request")
        return orig(self, *args, **kwargs)

    return _free_request


def _wrap_schedule(orig):
    def schedule(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        # The worker learns that a request finished from the next SchedulerOutput; hand it the
        # reason and output length too (the output is pickled to workers with its __dict__).
        try:
            fin = {rid: _FINISHED.pop(rid) for rid in getattr(out, "finished_req_ids", ())
                   if rid in _FINISHED}
            if fin:
                out.featurewatch_finished = fin
        except Exception:  # noqa: BLE001
            failopen.failed("schedule")
        return out

    return schedule


# ---------------------------------------------------------------- engine core: request creation


_VIEW_CACHE: dict = {"path": None, "stamp": None, "view": None}


def _policy_view():
    """The policy view of this engine: the in-process runtime's (worker shares the engine core
    process) or the file the rank-0 worker of a multiprocess executor publishes. The file is
    replaced atomically (a new inode each time), so one ``stat`` per request tells whether the
    cached view is current: a request created after a publish is decided with it."""
    from monitor.plugin import state
    from monitor.plugin.steering import PolicyView

    rt = state.RUNTIME[0]
    if rt is not None and rt.sends:
        return rt.view
    cfg = state.config()
    c = _VIEW_CACHE
    path = os.path.join(cfg.runtime_dir, f"featurewatch-{os.getpid()}.policies.json")
    try:
        st = os.stat(path)
    except OSError:
        c["view"] = None
        return None
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    if c["path"] != path or stamp != c["stamp"] or c["view"] is None:
        try:
            c["view"] = PolicyView.from_json(Path(path).read_text())
            c["path"], c["stamp"] = path, stamp
        except (OSError, ValueError, KeyError):
            c["view"] = None
    return c["view"]


def decide_request(ecr) -> None:
    """Mutates an EngineCoreRequest before its Request (and block hashes) exist."""
    from monitor.plugin.steering import PRIVATE_KEY, flat_metadata

    sp = getattr(ecr, "sampling_params", None)
    if sp is None:
        return
    extra = dict(sp.extra_args or {})
    decision: dict = dict(extra.get(PRIVATE_KEY) or {})  # the frontend may have put a traceparent
    ext = getattr(ecr, "external_req_id", None)
    if ext:
        decision["external_request_id"] = ext
    th = getattr(ecr, "trace_headers", None) or {}
    if th.get("traceparent"):
        decision["traceparent"] = th["traceparent"]
    view = _policy_view()
    if view is None:
        # No policy view in this process: steer no policy rather than steer without a salt.
        decision["policies"] = []
        decision["view_missing"] = True
    else:
        names, salt = view.decide(flat_metadata(extra))
        decision["policies"] = names
        if names:
            hashes = {n: h for n, _, h in view.policies if n in names}
            decision["hashes"] = hashes
            ecr.cache_salt = f"{ecr.cache_salt or ''}|featurewatch:{salt}"
            decision["salt"] = salt
    extra[PRIVATE_KEY] = decision
    sp.extra_args = extra


def _wrap_from_ecr(orig):
    def from_engine_core_request(cls, *args, **kwargs):
        try:
            if os.environ.get(ENV_ADDRESS):
                decide_request(failopen.arg(args, kwargs, 0, "request"))
        except Exception:  # noqa: BLE001 - never fail a request for monitoring
            failopen.failed("from_engine_core_request")
        return orig(cls, *args, **kwargs)

    return from_engine_core_request


def _wrap_add_request(orig):
    async def add_request(self, *args, **kwargs):
        # vLLM drops trace headers unless OTLP tracing is configured; keep the traceparent for
        # the sidecar (its spans are siblings of vLLM's under the same parent).
        try:
            params = failopen.arg(args, kwargs, 2, "params")
            th = kwargs.get("trace_headers")
            tp = th.get("traceparent") if th else None
            if not tp:  # vLLM <= 0.31 passes none without OTLP tracing: the HTTP request's own
                from monitor.plugin.tracing import current

                tp = current()
            if tp and getattr(params, "extra_args", "missing") != "missing" and \
                    type(params).__name__ == "SamplingParams":
                from monitor.plugin.steering import PRIVATE_KEY

                extra = dict(params.extra_args or {})
                extra[PRIVATE_KEY] = {**(extra.get(PRIVATE_KEY) or {}), "traceparent": tp}
                params.extra_args = extra
        except Exception:  # noqa: BLE001
            failopen.failed("add_request")
        return await orig(self, *args, **kwargs)

    return add_request


def patch_frontend() -> None:
    if "frontend" in _PATCHED:
        return
    _PATCHED.add("frontend")
    try:
        from vllm.v1.engine.async_llm import AsyncLLM

        _wrap(AsyncLLM, "add_request", _wrap_add_request)
    except Exception:  # noqa: BLE001
        logger.debug("featurewatch: AsyncLLM not patched", exc_info=True)


def patch_engine_core() -> None:
    if "engine_core" in _PATCHED:
        return
    _PATCHED.add("engine_core")
    from vllm.v1.request import Request

    _wrap(Request, "from_engine_core_request", _wrap_from_ecr)
    try:
        from vllm.v1.core.sched.scheduler import Scheduler

        _wrap(Scheduler, "_free_request", _wrap_free_request)
        _wrap(Scheduler, "schedule", _wrap_schedule)
    except Exception:  # noqa: BLE001
        logger.debug("featurewatch: scheduler not patched", exc_info=True)
