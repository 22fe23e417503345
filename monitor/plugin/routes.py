"""``vllm.endpoint_plugins`` entry: small control routes on vLLM's OpenAI-compatible API server.

vLLM 0.32 resolves the entry point to a zero-argument factory returning an object with ``name``,
``required_tasks``, ``attach_router(app)`` and ``async init_state(engine_client, state, args)``
(vllm/plugins/endpoint_plugins/interface.py). Endpoint plugins load only when named in
``VLLM_PLUGINS`` (``VLLM_PLUGINS=featurewatch,featurewatch_routes``).

Routes (they reach the workers with ``engine_client.collective_rpc``, the sanctioned path):

* ``GET  /featurewatch/status``   — per worker: connection, plan, counters, steered requests,
  self-test result, hooked layers, buffer sizes.
* ``POST /featurewatch/steering`` — local kill switch ``{"enabled": false}``; ``{"enabled": null}``
  returns control to the sidecar's plan.
"""

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger("vllm.featurewatch")


class FeaturewatchRoutes:
    name = "featurewatch_routes"
    required_tasks = None

    def __init__(self) -> None:
        self._engine = None

    def attach_router(self, app) -> None:
        router = APIRouter()
        plugin = self

        async def _rpc(method: str, *args: Any) -> Any:
            engine = plugin._engine
            if engine is None:
                raise RuntimeError("no engine (render-only server)")
            return await engine.collective_rpc(method, timeout=10, args=args)

        @router.get("/featurewatch/status")
        async def featurewatch_status() -> JSONResponse:
            try:
                workers = await _rpc("featurewatch_status")
            except Exception as e:  # noqa: BLE001
                return JSONResponse({"ok": False, "error": f"{type(e).__name__}: {e}"},
                                    status_code=503)
            return JSONResponse(_summary(workers))

        @router.post("/featurewatch/steering")
        async def featurewatch_steering(request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except Exception:  # noqa: BLE001
                body = {}
            enabled = body.get("enabled") if isinstance(body, dict) else None
            if enabled is not None and not isinstance(enabled, bool):
                return JSONResponse({"ok": False, "error": "enabled must be true/false/null"},
                                    status_code=400)
            try:
                workers = await _rpc("featurewatch_control", enabled)
            except Exception as e:  # noqa: BLE001
                return JSONResponse({"ok": False, "error": f"{type(e).__name__}: {e}"},
                                    status_code=503)
            return JSONResponse(_summary(workers))

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        self._engine = engine_client


def _summary(workers: list[dict]) -> dict:
    workers = [w for w in workers if isinstance(w, dict)]
    enabled = [w for w in workers if w.get("enabled")]
    senders = [w for w in enabled if w.get("sends")]
    return {
        "ok": True,
        "enabled": bool(enabled),
        "connected": bool(senders) and all(w.get("connected") for w in senders),
        "selftest": sorted({(w.get("selftest") or {}).get("status", "?") for w in enabled}),
        "steered_requests": sorted({rid for w in enabled
                                    for rid in (w.get("steering") or {}).get("requests", {})}),
        "workers": workers,
    }


def register_routes() -> FeaturewatchRoutes:
    """The entry point's zero-argument factory."""
    return FeaturewatchRoutes()
