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

Authentication: vLLM's API-key middleware guards only ``/v1``, ``/v2``, ``/inference`` and
``/cohere``, so these routes check the key themselves, the same way: the keys of ``--api-key``,
else ``VLLM_API_KEY``; ``Authorization: Bearer <key>``; SHA-256 digests compared in constant time
against every key. With a key set, ``POST /featurewatch/steering`` without it answers 401 and
``GET /featurewatch/status`` answers only booleans (enabled, connected, self-test status) — no
addresses, request ids, policy names or counters.
"""

import hashlib
import json
import os
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

MAX_BODY = 4096  # the control body is {"enabled": ...}


def api_keys(args) -> list[bytes]:
    """SHA-256 digests of the keys vLLM's own middleware accepts (``--api-key`` wins over
    ``VLLM_API_KEY``; vLLM 0.32 takes several ``--api-key``s, older versions one string)."""
    cli = getattr(args, "api_key", None)
    if isinstance(cli, str):
        cli = [cli]
    keys = [k for k in (cli or [os.environ.get("VLLM_API_KEY")]) if k]
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def authorized(keys: list[bytes], header: str | None) -> bool:
    if not keys:
        return True
    scheme, _, param = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(param.encode()).digest()
    ok = False
    for k in keys:  # every key compared: the time does not say which matched
        ok |= secrets.compare_digest(digest, k)
    return ok


def _unauthorized() -> JSONResponse:
    return JSONResponse({"error": "Unauthorized"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


class FeaturewatchRoutes:
    name = "featurewatch_routes"
    required_tasks = None

    def __init__(self) -> None:
        self._engine = None
        self._keys: list[bytes] | None = None  # None until init_state: nothing is served

    def attach_router(self, app) -> None:
        router = APIRouter()
        plugin = self

        async def _rpc(method: str, *args: Any) -> Any:
            return await plugin._engine.collective_rpc(method, timeout=10, args=args)

        @router.get("/featurewatch/status")
        async def featurewatch_status(request: Request) -> JSONResponse:
            if plugin._keys is None or plugin._engine is None:
                return _error(503, "featurewatch routes not initialised (no engine)")
            try:
                workers = await _rpc("featurewatch_status")
            except Exception as e:  # noqa: BLE001
                return _error(503, f"{type(e).__name__}: {str(e)[:200]}")
            summary = _summary(workers)
            if not authorized(plugin._keys, request.headers.get("Authorization")):
                return JSONResponse(_public(summary))
            return JSONResponse({**summary, "authenticated": True})

        @router.post("/featurewatch/steering")
        async def featurewatch_steering(request: Request) -> JSONResponse:
            if plugin._keys is None or plugin._engine is None:
                return _error(503, "featurewatch routes not initialised (no engine)")
            if not authorized(plugin._keys, request.headers.get("Authorization")):
                return _unauthorized()
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    return _error(413, f"body over {MAX_BODY} bytes")
            try:
                doc = json.loads(body)
            except ValueError:
                return _error(400, 'body must be JSON: {"enabled": true|false|null}')
            if not isinstance(doc, dict) or "enabled" not in doc:
                return _error(400, 'body must be {"enabled": true|false|null}')
            enabled = doc["enabled"]
            if enabled is not None and not isinstance(enabled, bool):
                return _error(400, "enabled must be true/false/null")
            try:
                workers = await _rpc("featurewatch_control", enabled)
            except Exception as e:  # noqa: BLE001
                return _error(503, f"{type(e).__name__}: {str(e)[:200]}")
            return JSONResponse({**_summary(workers), "authenticated": True})

        app.include_router(router)
        from monitor.plugin.tracing import install

        install(app)  # the caller's traceparent where vLLM drops it (tracing.py)

    async def init_state(self, engine_client, state, args) -> None:
        self._engine = engine_client
        self._keys = api_keys(args)


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
        # why the plugin is idle (preflight: vLLM version or internals differ), and the
        # failures wrappers fell back from: vLLM kept serving either way
        "idle_reason": next((w["idle_reason"] for w in workers if w.get("idle_reason")), None),
        "wrapper_errors": _sum_counts(w.get("wrapper_errors") for w in workers),
        "workers": workers,
    }


def _sum_counts(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _public(summary: dict) -> dict:
    """What anyone who reaches the port may read when a key is set: booleans for probes."""
    return {"ok": summary["ok"], "authenticated": False, "enabled": summary["enabled"],
            "connected": summary["connected"], "selftest": summary["selftest"]}


def register_routes() -> FeaturewatchRoutes:
    """The entry point's zero-argument factory."""
    return FeaturewatchRoutes()
