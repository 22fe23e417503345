"""Pieces of the fault suite: the real vLLM OpenAI server with the plugin, the real sidecar process
(killed, stopped, restarted), a fixed greedy workload and its plugin-free reference.

Nothing here waits on the clock to decide anything: every step waits for an event (a metric or
a status field reaching a value, a process exiting, a request finishing). The timeouts only end
waits for events that never come, and are generous for a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.support.sidecar import SidecarProcess, free_port, metric_value

WAIT_S = 180.0

# Alert-only rules (they fire often, so the sidecar evaluates and exports under the traffic); no
# steering: the served tokens must not depend on the sidecar at all.
ALERT_RULES = """
rules:
  - name: other_probe_any
    signal: {source: probes, probe: other}
    above: 0.0
    severity: info
  - name: feature_any
    signal: {source: sae, feature: 3}
    above: -1.0
    severity: warning
"""


def wait_until(pred, what: str, timeout: float = WAIT_S, interval: float = 0.05):
    """Poll ``pred`` until it returns a truthy value (returned); fail naming ``what``."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def http_json(url: str, body: dict | None = None, timeout: float = 120.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------- the sidecar


class FaultySidecar(SidecarProcess):
    """The real `featurewatch serve`, plus the faults: SIGKILL, SIGSTOP/SIGCONT, SIGTERM."""

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def terminate(self) -> int:
        """SIGTERM: the sidecar drains and exits."""
        return self.stop(timeout=WAIT_S)

    def batches(self) -> float:
        """Batches this process received (0 for a fresh one)."""
        try:
            return metric_value(self.metrics(), "featurewatch_batches_received_total")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0.0


# ---------------------------------------------------------------- vLLM


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` with the plugin and its routes."""

    def __init__(self, model: str, root: Path, address: str, model_name: str,
                 extra_env: dict | None = None) -> None:
        self.root, self.port = root, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME",
                    "TMPDIR"):
            path = root / var.lower()
            path.mkdir(parents=True, exist_ok=True)
            env[var] = str(path)
        env.update(FEATUREWATCH_ADDRESS=address, FEATUREWATCH_RUNTIME_DIR=str(root),
                   FEATUREWATCH_BACKOFF_MAX_S="0.5", FEATUREWATCH_STATS_INTERVAL_S="0.5",
                   FEATUREWATCH_MODEL_NAME=model_name,  # the sidecar's model_name
                   VLLM_PLUGINS="featurewatch,featurewatch_routes", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CPU_KVCACHE_SPACE="1")
        env.update(extra_env or {})
        env.pop("VLLM_API_KEY", None)
        self.log_path = root / "vllm.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
             "--max-model-len", "256", "--max-num-batched-tokens", "256", "--max-num-seqs", "8",
             "--kv-cache-memory-bytes", str(32 << 20), "--block-size", "32", "--seed", "0",
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.log()
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2)
                return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_until(up, "the vLLM server to answer /health", interval=0.5)

    def worker(self) -> dict:
        return http_json(self.base + "/featurewatch/status")["workers"][0]

    def counters(self) -> dict:
        return self.worker()["counters"]

    def connected(self) -> bool:
        return bool(self.worker()["connected"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------- the workload


MAX_TOKENS = 24


@dataclass(frozen=True)
class Request:
    name: str
    prompt: tuple[int, ...]


def workload(n: int, seed: int) -> list[Request]:
    """A fixed list of distinct prompts (8 to 40 tokens), greedy, MAX_TOKENS each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 41, size=n)
    return [Request(f"r{seed}-{i}", tuple(rng.integers(3, 300, size=int(k)).tolist()))
            for i, k in enumerate(lengths)]


def reference(model_path: str, requests: list[Request]) -> dict[str, list[int]]:
    """Greedy continuations from HF transformers: the model with no plugin anywhere (vLLM with
    the plugin idle matches it token for token, tests/plugin/test_e2e_eager.py)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for r in requests:  # greedy with a KV cache; EOS neither stops nor is masked (ignore_eos)
            step = model(torch.tensor([list(r.prompt)]), use_cache=True)
            gen: list[int] = []
            for _ in range(MAX_TOKENS):
                gen.append(int(step.logits[0, -1].argmax()))
                step = model(torch.tensor([[gen[-1]]]), past_key_values=step.past_key_values,
                             use_cache=True)
            out[r.name] = gen
    return out


class Traffic:
    """Greedy completions through the OpenAI endpoint from a few concurrent clients."""

    def __init__(self, base: str, clients: int = 4) -> None:
        self.base = base
        self.pool = ThreadPoolExecutor(clients)
        self.futures: dict[str, Future] = {}

    def _one(self, r: Request) -> list[int]:
        body = {"model": "tiny", "prompt": list(r.prompt), "max_tokens": MAX_TOKENS,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
        out = http_json(self.base + "/v1/completions", body)
        return list(out["choices"][0]["token_ids"])

    def submit(self, requests: list[Request]) -> list[Future]:
        fs = []
        for r in requests:
            f = self.pool.submit(self._one, r)
            self.futures[r.name] = f
            fs.append(f)
        return fs

    def results(self) -> tuple[dict[str, list[int]], dict[str, str]]:
        """(outputs, failures) of every request submitted, once all have finished."""
        outputs, failures = {}, {}
        for name, f in self.futures.items():
            try:
                outputs[name] = f.result(timeout=WAIT_S)
            except Exception as e:  # noqa: BLE001 - a failed request is what the suite counts
                failures[name] = f"{type(e).__name__}: {e}"[:300]
        return outputs, failures

    def close(self) -> None:
        self.pool.shutdown(wait=True)
