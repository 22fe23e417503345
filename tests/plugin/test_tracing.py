"""The caller's traceparent reaches the plugin on vLLM <= 0.31, whose OpenAI server passes no
trace headers to ``AsyncLLM.add_request`` unless OTLP tracing is configured: the routes plugin's
ASGI middleware keeps the HTTP request's header, and the ``add_request`` wrapper falls back to
it. Simulated with the real middleware, installed the way vLLM installs endpoint plugins
(``attach_router(app)``), and an engine client whose ``add_request`` is wrapped like AsyncLLM's."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from monitor.plugin import failopen, patches
from monitor.plugin.engine_core import _wrap_add_request
from monitor.plugin.routes import register_routes
from monitor.plugin.steering import PRIVATE_KEY

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OTHER = "00-11111111111111111111111111111111-2222222222222222-01"


class Params:  # what the wrapper checks: a SamplingParams with extra_args
    def __init__(self) -> None:
        self.extra_args = None


Params.__name__ = "SamplingParams"


class EngineClient:
    """AsyncLLM.add_request's signature; vLLM <= 0.31's server passes trace_headers=None."""

    def __init__(self) -> None:
        self.seen: list = []

    async def add_request(self, request_id, prompt, params, arrival_time=None,
                          lora_request=None, tokenization_kwargs=None, trace_headers=None):
        self.seen.append((request_id, ((params.extra_args or {}).get(PRIVATE_KEY) or {})
                          .get("traceparent")))


patches._wrap(EngineClient, "add_request", _wrap_add_request)


@pytest.fixture
def app():
    failopen.reset()
    engine = EngineClient()
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(stream: bool = False, headers_from_vllm: str = ""):
        th = {"traceparent": headers_from_vllm} if headers_from_vllm else None
        if not stream:
            await engine.add_request("r1", "p", Params(), trace_headers=th)
            return {"ok": True}

        async def body():
            # vLLM's merge_async_iterators runs each generator in a task of its own
            await asyncio.create_task(engine.add_request("r2", "p", Params(), trace_headers=th))
            yield b"data: done\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    register_routes().attach_router(app)  # as vLLM's attach_endpoint_plugins does
    app.state.engine = engine
    yield app
    assert failopen.errors() == {}


def test_traceparent_reaches_add_request_when_vllm_drops_it(app):
    with TestClient(app) as client:
        assert client.post("/v1/completions", headers={"traceparent": TP}).status_code == 200
        r = client.post("/v1/completions?stream=true", headers={"traceparent": TP})
        assert r.status_code == 200 and "done" in r.text
        client.post("/v1/completions")  # no header: none
        client.post("/v1/completions", headers={"traceparent": "not-a-traceparent"})
    assert app.state.engine.seen == [("r1", TP), ("r2", TP), ("r1", None), ("r1", None)]


def test_vllms_own_trace_headers_win(app):
    with TestClient(app) as client:
        client.post(f"/v1/completions?headers_from_vllm={OTHER}", headers={"traceparent": TP})
    assert app.state.engine.seen == [("r1", OTHER)]


def test_the_middleware_is_installed_once(app):
    from monitor.plugin.tracing import TraceparentMiddleware, install

    assert install(app) is False
    assert [m.cls for m in app.user_middleware].count(TraceparentMiddleware) == 1
