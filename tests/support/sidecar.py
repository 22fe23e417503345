"""Start a real `featurewatch serve` process for tests, on a temp Unix socket and free TCP ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.dictionaries import write_probe_bank, write_saelens_jumprelu

ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of one metric (exact name) whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.split("#")[0].split()[-1])
    return total


def fixture_config(tmp: Path, d_model: int = 64, **overrides) -> dict:
    """A sidecar config over the planted SAE (layer 1, source `sae`) and probe bank (`probes`)."""
    sae = write_saelens_jumprelu(tmp / "sae", d_model)
    probes = write_probe_bank(tmp / "probes.safetensors", d_model)
    config = {
        "model_name": "test-model", "socket": str(tmp / "fw.sock"), "grpc_port": free_port(),
        "metrics_port": free_port(), "metrics_host": "127.0.0.1",
        "sources": [{"name": "sae", "kind": "sae", "layer": 1, "path": str(sae)},
                    {"name": "probes", "kind": "probes", "layer": 1, "path": str(probes)}],
        "rules_poll_interval_s": 0.2,
    }
    config.update(overrides)
    return config


class SidecarProcess:
    """`python -m monitor.cli serve` in a subprocess; waits until grpc.health says SERVING."""

    def __init__(self, tmp: Path, config: dict, env: dict | None = None) -> None:
        self.tmp, self.config = tmp, config
        self.config_path = tmp / "featurewatch.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "sidecar.log"
        self.env = {**os.environ, "FEATUREWATCH_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def socket_address(self) -> str:
        return f"unix://{self.config['socket']}"

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.config['grpc_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config['metrics_port']}/metrics"

    def start(self, timeout: float = 60.0) -> "SidecarProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "serve", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            if self.healthy():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"sidecar not healthy in {timeout}s:\n{self.log()}")

    def healthy(self) -> bool:
        try:
            with grpc.insecure_channel(self.tcp_address) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "SidecarProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
