"""The plugin's side of TCP ingest authentication: with ``FEATUREWATCH_INGEST_TOKEN`` set in vLLM's
environment the plugin sends ``authorization: Bearer <token>`` on the Ingest stream; the real
sidecar (same variable) refuses a stream without it. The token never appears in the status."""

from __future__ import annotations

import pytest

from monitor.plugin.client import Counters, SidecarClient
from monitor.plugin.config import PluginConfig
from monitor.protocol import pb
from tests.faults.support import wait_until
from tests.support.sidecar import SidecarProcess, fixture_config

TOKEN = "ingest-secret-42"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest_token")
    proc = SidecarProcess(tmp, fixture_config(tmp, 64), env={"FEATUREWATCH_INGEST_TOKEN": TOKEN})
    with proc:
        yield proc


def _client(address: str, token: str | None):
    cfg = PluginConfig(address=address, ingest_token=token, backoff_initial_s=0.05,
                       backoff_max_s=0.2)
    counters = Counters()
    client = SidecarClient(cfg, counters,
                           hello=lambda: pb.Hello(model_name="m", d_model=64,
                                                  available_layers=[1], dtype=pb.FLOAT32),
                           on_connect=lambda: [], on_message=lambda m: None,
                           on_disconnect=lambda: None, stats=lambda: pb.PluginStats())
    return client, counters


def test_the_plugin_sends_the_ingest_token_on_tcp(sidecar):
    good, _ = _client(sidecar.tcp_address, TOKEN)
    good.start()
    try:
        wait_until(lambda: good.connected, "the plugin with the token to get a plan")
    finally:
        good.stop()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_without_the_right_token_the_sidecar_refuses_the_stream(sidecar, token):
    bad, counters = _client(sidecar.tcp_address, token)
    bad.start()
    try:  # an event: the attempt failed with the sidecar's reason, and a retry began
        wait_until(lambda: "Ingest over TCP needs" in bad.last_error and counters.reconnects >= 1,
                   "the refusal")
        assert not bad.connected and counters.connects == 0
    finally:
        bad.stop()


def test_the_token_is_not_in_the_status_config():
    cfg = PluginConfig(address="x", ingest_token=TOKEN)
    assert TOKEN not in repr(cfg) and cfg.as_dict()["ingest_token"] == "set"
