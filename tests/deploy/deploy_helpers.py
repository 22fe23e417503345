"""Helpers shared by the deployment tests (processes on 127.0.0.1, waiting, running tools)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.sidecar import free_port

REPO = Path(__file__).resolve().parents[2]


def need_binary(name: str) -> str:
    """The binary's path; skips the test only when the binary is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisProcess:
    """A redis-server on a fixed 127.0.0.1 port that a test can kill -9 and start again."""

    def __init__(self, binary: str, workdir: Path, persist: bool = False) -> None:
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "always",
            "--protected-mode", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=60, what=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


def run(args: list[str], cwd: Path = REPO, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def contract_metric_names() -> set[str]:
    """Metric names from the metrics table of docs/ARCHITECTURE.md (the sidecar's contract),
    with the _bucket/_sum/_count series of histograms."""
    import re

    names: set[str] = set()
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for line in text.splitlines():
        if not line.startswith("| `featurewatch_"):
            continue
        cells = line.split("|")
        kind = cells[2].strip() if len(cells) > 2 else ""
        for token in re.findall(r"`([^`]+)`", cells[1]):
            token = token.strip()
            if token.startswith(".."):
                # `..._plugin_enqueue_seconds_sum/_count`: a suffix of featurewatch_
                token = "featurewatch" + token.lstrip(".")
            if token.startswith("featurewatch_"):
                for part in _expand_slashes(token):
                    names.add(part)
                    if kind == "histogram":
                        names.update({part + "_bucket", part + "_sum", part + "_count"})
    return names


def _expand_slashes(token: str) -> list[str]:
    """`a_sum/_count` -> [a_sum, a_count]."""
    first, *rest = token.split("/")
    out = [first]
    stem = first.rsplit("_", 1)[0] if rest else first
    for suffix in rest:
        out.append(stem + suffix if suffix.startswith("_") else suffix)
    return out


class PrometheusProcess:
    """A real prometheus on 127.0.0.1 scraping the given jobs every second; HTTP API helpers."""

    def __init__(self, binary: str, workdir: Path, jobs: dict[str, tuple[str, dict[str, str]]],
                 rule_files: list[Path] | None = None) -> None:
        import yaml

        self.binary, self.dir = binary, workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(p) for p in rule_files or []],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target], "labels": labels}]}
                for job, (target, labels) in jobs.items()
            ],
        }
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PrometheusProcess":
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, timeout=30, interval=0.1, what="prometheus ready")
        return self

    def _ready(self) -> bool:
        import urllib.request

        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(self.dir / 'prometheus.log').read_text()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        import json
        import urllib.parse
        import urllib.request

        import urllib.error

        data = urllib.parse.urlencode(params, doseq=True).encode()
        try:
            with urllib.request.urlopen(self.url + "/api/v1/" + path, data=data, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: HTTP {exc.code}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
