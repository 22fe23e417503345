"""featurewatch's vLLM plugin: taps residual-stream activations and steers single requests.

Entry points (pyproject.toml):

* ``vllm.general_plugins: featurewatch = monitor.plugin:register`` — runs in every vLLM process.
  With ``FEATUREWATCH_ADDRESS`` unset the plugin stays *loaded-idle*: no hooks, no wrappers on the
  forward path, only the ``featurewatch_status`` worker method (so the status route can say so).
* ``vllm.endpoint_plugins: featurewatch_routes = monitor.plugin.routes:register_routes`` — the
  ``/featurewatch/*`` HTTP routes of the API server (opt-in through ``VLLM_PLUGINS``).

See docs/plugin.md.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logger = logging.getLogger("vllm.featurewatch")


def register() -> None:
    """``vllm.general_plugins`` entry point. Safe to call more than once."""
    from monitor.plugin import compat, patches, state

    try:
        patches.patch_worker_methods()
    except Exception:  # noqa: BLE001 - never break vLLM start-up
        logger.exception("featurewatch: worker methods not installed")
    cfg = state.config()
    if not cfg.enabled:
        logger.debug("featurewatch: FEATUREWATCH_ADDRESS unset; plugin loaded-idle")
        return
    if compat.idle_reason() is not None:
        return
    problem = None if compat.PASSED[0] else compat.preflight()  # before anything is patched
    compat.PASSED[0] = problem is None
    if problem is not None:
        compat.IDLE_REASON[0] = f"vLLM {compat.vllm_version()} not supported: {problem}"
        logger.warning("featurewatch: idle, nothing patched: %s", compat.IDLE_REASON[0])
        return
    try:
        patches.patch_loaders()
        patches.patch_engine_core()
        patches.patch_frontend()
    except Exception:  # noqa: BLE001
        logger.exception("featurewatch: patches not installed; serving without the plugin")


def get_runtime():
    from monitor.plugin import state

    return state.get_runtime()


__all__ = ["__version__", "get_runtime", "register"]
