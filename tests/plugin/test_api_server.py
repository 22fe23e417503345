"""The OpenAI server path: ``python -m vllm.entrypoints.openai.api_server --api-key ...`` as a
subprocess with both featurewatch entry points allowlisted, the fake sidecar over TCP. Request ids
(``X-Request-Id``), ``vllm_xargs`` metadata and the W3C traceparent must reach the sidecar; the
control routes answer, and only with vLLM's API key (vLLM's own middleware guards only /v1...)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.plugin.fake_sidecar import FakeSidecar
from tests.plugin.helpers import engine_env, make_plan

pytestmark = pytest.mark.vllm

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
API_KEY = "sk-test-featurewatch"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 60,
          auth: dict | None = AUTH, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json", **(auth or {}),
                                          **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _refused(url: str, body: dict | None = None, **kw) -> tuple[int, dict]:
    with pytest.raises(urllib.error.HTTPError) as e:
        _http(url, body, **kw)
    return e.value.code, json.loads(e.value.read() or b"null")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fw_api"))
    sidecar = FakeSidecar("127.0.0.1:0", make_plan()).start()
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        engine_env(mp, root, sidecar.address)
        mp.setenv("VLLM_PLUGINS", "featurewatch,featurewatch_routes")
        env = dict(os.environ)
    log = open(os.path.join(root, "server.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
         "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "256", "--max-num-batched-tokens", "256", "--max-num-seqs", "8",
         "--kv-cache-memory-bytes", str(32 << 20), "--block-size", "32", "--seed", "0",
         "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, open(os.path.join(root, "server.log")).read()[-4000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        assert sidecar.wait_for(sidecar.connected)
        yield base, sidecar
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        sidecar.stop()


def test_request_id_metadata_and_traceparent_reach_the_sidecar(server):
    base, sidecar = server
    body = {"model": "tiny", "prompt": "the cat and the dog run to the river", "max_tokens": 5,
            "temperature": 0.0, "ignore_eos": True,
            "vllm_xargs": {"tenant": "acme", "n_users": 3, "tags": ["a", "b"]}}
    out = _http(base + "/v1/completions", body,
                {"X-Request-Id": "client-42", "traceparent": TRACEPARENT})
    assert out["id"] == "cmpl-client-42"
    assert sidecar.wait_for(lambda: any(s.api_request_id == "cmpl-client-42"
                                        for s in sidecar.starts.values()))
    rid, start = next((k, s) for k, s in sidecar.starts.items()
                      if s.api_request_id == "cmpl-client-42")
    assert rid.startswith("cmpl-client-42-")
    assert dict(start.metadata) == {"tenant": "acme", "n_users": "3", "tags": '["a", "b"]'}
    assert start.traceparent == TRACEPARENT
    assert start.prompt_tokens == out["usage"]["prompt_tokens"]
    assert sidecar.wait_for(lambda: rid in sidecar.finishes)
    assert sidecar.finishes[rid].finish_reason == "length"
    assert sidecar.finishes[rid].generated_tokens == 5
    acts = sidecar.activations(rid)
    n = out["usage"]["prompt_tokens"] + 5 - 1
    assert sorted(acts) == [0, 1, 2, 3] and sorted(acts[2]) == list(range(n))


def test_policy_from_vllm_xargs(server):
    base, sidecar = server
    body = {"model": "tiny", "prompt": "one two three four", "max_tokens": 3,
            "temperature": 0.0, "vllm_xargs": {"steer": "policy"}}
    _http(base + "/v1/completions", body, {"X-Request-Id": "steered-1"})
    start = next(s for s in sidecar.starts.values() if s.api_request_id == "cmpl-steered-1")
    assert start.steering_policy == "clamp_add"


def test_status_and_steering_routes(server):
    base, _ = server
    st = _http(base + "/featurewatch/status")
    assert st["ok"] and st["enabled"] and st["connected"]
    assert st["selftest"] == ["passed"]
    w = st["workers"][0]
    assert w["hooked_layers"] == [0, 1, 2, 3] and w["plan"]["layers"] == [0, 1, 2, 3]
    assert w["counters"]["requests_started"] >= 1
    off = _http(base + "/featurewatch/steering", {"enabled": False})
    assert off["workers"][0]["steering"]["local_override"] is False
    back = _http(base + "/featurewatch/steering", {"enabled": None})
    assert back["workers"][0]["steering"]["local_override"] is None
    assert _refused(base + "/featurewatch/steering", {"enabled": "no"})[0] == 400
    assert _refused(base + "/featurewatch/steering", {})[0] == 400  # not a silent reset
    assert _refused(base + "/featurewatch/steering", raw=b"{not json")[0] == 400
    assert _refused(base + "/featurewatch/steering", raw=b" " * 100_000)[0] == 413


def test_control_routes_require_the_api_key(server):
    base, _ = server
    url = base + "/featurewatch/steering"
    for auth in (None, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                 {"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"}):
        code, body = _refused(url, {"enabled": False}, auth=auth)
        assert code == 401 and body == {"error": "Unauthorized"}, auth
    st = _http(base + "/featurewatch/status")
    assert st["workers"][0]["steering"]["local_override"] is None  # nothing was switched off
    assert _refused(base + "/v1/models", auth=None)[0] == 401  # vLLM's own guard, for reference


def test_status_without_the_key_reveals_nothing_sensitive(server):
    base, _ = server
    _http(base + "/v1/completions", {"model": "tiny", "prompt": "red green blue", "max_tokens": 2,
                                     "vllm_xargs": {"steer": "policy"}},
          {"X-Request-Id": "secret-request"})
    full = _http(base + "/featurewatch/status")
    assert full["authenticated"] is True and full["workers"][0]["address"]
    for auth in (None, {"Authorization": "Bearer wrong"}):
        public = _http(base + "/featurewatch/status", auth=auth)
        assert public == {"ok": True, "authenticated": False, "enabled": True,
                          "connected": True, "selftest": ["passed"]}
