"""The caller's W3C ``traceparent`` on vLLM versions whose OpenAI server drops it.

vLLM <= 0.31 passes trace headers to the engine only when its own OTLP tracing is configured
(``--otlp-traces-endpoint``); 0.32 always passes them (the ``AsyncLLM.add_request`` wrapper in
engine_core.py reads ``trace_headers``). This pure ASGI middleware keeps the header of each HTTP
request in a context variable; the request's handler — and the tasks it creates, which copy the
context — call ``AsyncLLM.add_request``, whose wrapper falls back to it when ``trace_headers``
carries none. Installed by the ``featurewatch_routes`` endpoint plugin, or on any vLLM with
``--middleware monitor.plugin.tracing.TraceparentMiddleware``.
"""

from __future__ import annotations

import contextvars
import re

# version-traceid-parentid-flags (W3C Trace Context); anything else is not passed on
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "featurewatch_traceparent", default=None)


def current() -> str | None:
    """The traceparent of the HTTP request this code runs for, if it sent a valid one."""
    return _CURRENT.get()


class TraceparentMiddleware:
    """ASGI middleware: the request's ``traceparent`` header, while the request is handled."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        value = None
        for name, raw in scope.get("headers") or ():
            if name == b"traceparent":
                text = raw.decode("latin-1").strip().lower()
                value = text if _TRACEPARENT.fullmatch(text) else None
                break
        token = _CURRENT.set(value)
        try:
            return await self.app(scope, receive, send)
        finally:
            _CURRENT.reset(token)


def install(app) -> bool:
    """Add the middleware to a FastAPI/Starlette app once (before it starts)."""
    for m in getattr(app, "user_middleware", ()):
        if getattr(m, "cls", None) is TraceparentMiddleware:
            return False
    app.add_middleware(TraceparentMiddleware)
    return True
