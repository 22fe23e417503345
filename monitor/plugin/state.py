"""Process-wide plugin state: the configuration (read once) and the worker's runtime, if any."""

from __future__ import annotations

from monitor.plugin.config import PluginConfig

# One model (and so one runtime) per worker process; a list so readers see replacements.
RUNTIME: list = [None]
# Why this worker's model runs without the plugin although it is enabled and vLLM passed the
# preflight (an architecture not in families.py, a failed self-test); None otherwise.
IDLE: list[str | None] = [None]
_CONFIG: list[PluginConfig | None] = [None]


def config() -> PluginConfig:
    if _CONFIG[0] is None:
        _CONFIG[0] = PluginConfig.from_env()
    return _CONFIG[0]


def reset_config() -> None:
    _CONFIG[0] = None


def set_runtime(rt):
    old, RUNTIME[0] = RUNTIME[0], rt
    return old


def get_runtime():
    return RUNTIME[0]
