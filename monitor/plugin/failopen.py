"""Fail open: a wrapper on vLLM's paths that fails counts it here and falls back to vLLM's own
behaviour, so a changed vLLM internal (a renamed request field, a moved attribute) costs
monitoring, never serving. The counts are in ``/featurewatch/status`` as ``wrapper_errors``."""

from __future__ import annotations

import logging
import threading
from collections import Counter

logger = logging.getLogger("vllm.featurewatch")

_ERRORS: Counter = Counter()
_LOCK = threading.Lock()


def failed(name: str, rt=None) -> None:
    """Call from an ``except`` block: count the failure of wrapper ``name`` (logged with its
    traceback the first time only) and, given the worker runtime, leave this step unsteered."""
    with _LOCK:
        _ERRORS[name] += 1
        first = _ERRORS[name] == 1
    if first:
        logger.exception("featurewatch: %s wrapper failed; vLLM's own behaviour used (counted "
                         "in wrapper_errors, logged once)", name)
    if rt is not None:
        unsteer(rt)


def unsteer(rt) -> None:
    """No steering and no harvest for the current step, whatever state the failure left."""
    try:
        rt.abort_forward()
        tables = getattr(rt, "tables", None)
        if tables is not None:
            tables.steer_idx.zero_()
            rt._idx_dirty = 0
    except Exception:  # noqa: BLE001 - best effort; the forward still runs
        logger.debug("featurewatch: could not reset the step", exc_info=True)


def errors() -> dict[str, int]:
    with _LOCK:
        return dict(_ERRORS)


def reset() -> None:
    with _LOCK:
        _ERRORS.clear()


def arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    """A wrapped call's argument by position (``args`` without ``self``) or keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)
