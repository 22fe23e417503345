"""Fixtures for the deployment tests: real redis-server / prometheus processes on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.deploy.deploy_helpers import RedisProcess, need_binary


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(need_binary("redis-server"), tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_factory(tmp_path):
    """Start more redis-servers (e.g. one with persistence) inside a test."""
    binary = need_binary("redis-server")
    started: list[RedisProcess] = []

    def make(name: str = "extra", persist: bool = False) -> RedisProcess:
        server = RedisProcess(binary, tmp_path / f"redis-{name}", persist=persist)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.kill()
