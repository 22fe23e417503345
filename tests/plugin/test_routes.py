"""The control routes' authentication without a vLLM server: where the key comes from
(``--api-key`` first, then ``VLLM_API_KEY``, as vLLM's own middleware), and the refusals.
test_api_server.py checks the same against the real API server started with ``--api-key``."""

from __future__ import annotations

import asyncio
from argparse import Namespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from monitor.plugin.routes import FeaturewatchRoutes


class _Engine:
    """Answers ``collective_rpc`` like one worker would (records the calls)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def collective_rpc(self, method, timeout=None, args=()):
        self.calls.append((method, args))
        return [{"enabled": True, "sends": True, "connected": True, "address": "unix:///s",
                 "selftest": {"status": "passed"},
                 "steering": {"requests": {"cmpl-secret-0": {}}}}]


def _client(args: Namespace, monkeypatch, env_key: str | None):
    if env_key is None:
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
    else:
        monkeypatch.setenv("VLLM_API_KEY", env_key)
    plugin, app, engine = FeaturewatchRoutes(), FastAPI(), _Engine()
    plugin.attach_router(app)
    asyncio.run(plugin.init_state(engine, app.state, args))
    return TestClient(app), engine


@pytest.mark.parametrize("args,env_key,key", [
    (Namespace(api_key=None), "from-env", "from-env"),
    (Namespace(api_key=["cli-1", "cli-2"]), "from-env", "cli-2"),  # the CLI wins, any of its keys
    (Namespace(api_key="cli-str"), None, "cli-str"),  # older vLLM: a string
])
def test_the_key_comes_from_the_cli_then_the_environment(args, env_key, key, monkeypatch):
    client, engine = _client(args, monkeypatch, env_key)
    url = "/featurewatch/steering"
    assert client.post(url, json={"enabled": False}).status_code == 401
    assert client.post(url, json={"enabled": False},
                       headers={"Authorization": "Bearer from-env-x"}).status_code == 401
    if env_key and key != env_key:
        assert client.post(url, json={"enabled": False},
                           headers={"Authorization": f"Bearer {env_key}"}).status_code == 401
    assert engine.calls == []  # refused before anything reached the workers
    ok = client.post(url, json={"enabled": False}, headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and engine.calls == [("featurewatch_control", (False,))]
    public = client.get("/featurewatch/status").json()
    assert public["authenticated"] is False and "workers" not in public
    assert "cmpl-secret-0" not in str(public) and "unix://" not in str(public)
    full = client.get("/featurewatch/status", headers={"Authorization": f"bearer {key}"}).json()
    assert full["steered_requests"] == ["cmpl-secret-0"] and full["authenticated"] is True


def test_without_a_key_the_routes_are_open(monkeypatch):
    client, engine = _client(Namespace(api_key=None), monkeypatch, None)
    assert client.post("/featurewatch/steering", json={"enabled": None}).status_code == 200
    assert client.get("/featurewatch/status").json()["workers"]


def test_before_init_state_control_is_refused(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    plugin, app = FeaturewatchRoutes(), FastAPI()
    plugin.attach_router(app)
    client = TestClient(app)
    assert client.post("/featurewatch/steering", json={"enabled": False}).status_code == 503
    assert client.get("/featurewatch/status").status_code == 503
