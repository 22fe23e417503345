"""What the worker RPC methods read and flip on the runtime.

``featurewatch_status`` returns ``status()`` and ``featurewatch_control`` calls
``set_local_steering``; the status routes reach them through ``collective_rpc`` (routes.py,
patches.py). A mixin of ``Runtime`` (runtime.py), whose ``__init__`` sets the state it reads.
"""

from __future__ import annotations

from monitor.protocol import pb

_SCOPES = {pb.TOKEN_SCOPE_ALL: "all", pb.TOKEN_SCOPE_PROMPT: "prompt",
           pb.TOKEN_SCOPE_GENERATED: "generated"}


class WorkerStatus:
    def status(self) -> dict:
        client = self.client
        return {
            "enabled": True,
            "address": self.cfg.address,
            "sends": self.sends,
            "connected": bool(client and client.connected),
            "last_error": client.last_error if client else "",
            # activations' path to the sidecar: "shm" (its shared-memory ring) or "grpc" (bytes)
            "transport": client.transport if client else None,
            "shm": client.shm.describe() if client else None,
            "tp_rank": self.tp_rank, "tp_size": self.tp_size, "pp_rank": self.pp_rank,
            "engine": self.engine,
            "runner": self.runner_kind,
            "graph_mode": self.graph_mode,
            "model_name": self.model_name,
            "d_model": self.d_model,
            "hooked_layers": self.hooked,
            "plan": None if self.plan is None else {
                "layers": self.plan_layers, "scope": _SCOPES.get(self.scope, "?"),
                "steering_enabled": self.plan.steering_enabled,
                "failure_mode": self.plan.steering_failure_mode or "open",
                "policies": [p.name for p in self.plan.policies],
                "rules_version": self.plan.rules_version},
            "max_tokens_per_step": self.tables.max_tokens,
            "buffer_bytes": self.tables.nbytes(),
            "queue": {"depth": client.queue_depth if client else 0,
                      "capacity": self.cfg.queue_batches},
            "counters": self.counters.as_dict(),
            "steering": self.steering.describe(),
            "live_requests": len(self.requests),
            "selftest": self.selftest,
            "vllm_internal": self.internal.as_dict(),
            "config": {k: v for k, v in self.cfg.as_dict().items() if k != "address"},
        }

    def set_local_steering(self, enabled: bool | None) -> None:
        """Local kill switch (status route); applied between steps on every rank."""
        self._apply_ops([("local", b"" if enabled is None else (b"1" if enabled else b"0"))])


def graph_mode(vllm_config) -> dict:
    cc = getattr(vllm_config, "compilation_config", None)
    mc = getattr(vllm_config, "model_config", None)
    return {
        "compilation_mode": _name(getattr(cc, "mode", "?")),
        "cudagraph_mode": _name(getattr(cc, "cudagraph_mode", "?")),
        "enforce_eager": bool(getattr(mc, "enforce_eager", False)),
    }


def _name(v) -> str:
    return getattr(v, "name", None) or str(v)
