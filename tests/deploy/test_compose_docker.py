"""docker-compose.yml and the Dockerfile, checked structurally (no Docker engine on CI machines)."""

from __future__ import annotations

import re
import shutil
import tomllib

import pytest
import yaml

from tests.deploy.deploy_helpers import REPO, run
from monitor.config import SidecarConfig
from monitor.evaluate.rules import parse_rules

COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def config() -> SidecarConfig:
    return SidecarConfig.model_validate(yaml.safe_load((COMPOSE_DIR / "featurewatch.yaml").read_text()))


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """stage name -> [(INSTRUCTION, arguments)], continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = [("FROM", match.group(1))]
        elif current is not None:
            stages[current].append((instruction, args.strip()))
    return stages


def volume_target(entry) -> tuple[str, str]:
    if isinstance(entry, dict):
        return entry["source"], entry["target"]
    source, target = entry.split(":")[:2]
    return source, target


def test_services_and_images(compose):
    services = compose["services"]
    assert set(services) == {"vllm", "featurewatch", "redis", "prometheus", "alertmanager", "grafana"}
    assert services["grafana"]["profiles"] == ["grafana"]  # optional
    stages = dockerfile_stages()
    for name, target in (("featurewatch", "sidecar"), ("vllm", "vllm")):
        build = services[name]["build"]
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages
        assert build["target"] == target


def test_socket_shared_and_config_consistent(compose, config):
    services = compose["services"]
    fw_volumes = dict(volume_target(v) for v in services["featurewatch"]["volumes"])
    vllm_volumes = dict(volume_target(v) for v in services["vllm"]["volumes"])
    socket_dir = str(config.socket.parent)
    shared = [s for s, t in fw_volumes.items() if t == socket_dir]
    assert shared and vllm_volumes.get(shared[0]) == socket_dir, "the socket directory must be one shared volume"
    assert shared[0] in compose["volumes"]
    env = services["vllm"]["environment"]
    assert env["FEATUREWATCH_ADDRESS"] == f"unix://{config.socket}"
    names = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert set(env["VLLM_PLUGINS"].split(",")) == set(names["vllm.general_plugins"]) | set(names["vllm.endpoint_plugins"])
    assert f"--served-model-name=${{SERVED_MODEL_NAME:-{config.model_name}}}" in services["vllm"]["command"]
    # Fail-open: vLLM does not wait for the sidecar to be healthy.
    assert services["vllm"]["depends_on"]["featurewatch"]["condition"] == "service_started"
    # Store: the compose redis service.
    assert config.store.kind == "redis" and config.store.url == "redis://redis:6379/0"
    assert services["featurewatch"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert config.grpc_host == "0.0.0.0" and config.steering.failure_mode == "open"
    # The rules file and dictionaries are where the config says.
    assert fw_volumes["./rules.yaml"] == str(config.rules_file)
    assert parse_rules((COMPOSE_DIR / "rules.yaml").read_text(), "rules.yaml").rules
    for source in config.sources:
        assert any(str(source.path).startswith(t) for t in fw_volumes.values()), source.path


def test_bind_mounts_exist(compose):
    for name, service in compose["services"].items():
        for entry in service.get("volumes", []):
            source, _ = volume_target(entry)
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"


def test_prometheus_targets_are_compose_services(compose, config):
    services = compose["services"]
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    ports = {"featurewatch": config.metrics_port, "vllm": 8000, "alertmanager": 9093}
    for job in prom["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host, port = target.split(":")
            assert host in services and int(port) == ports[host], target
    (am,) = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am.split(":")[0] in services
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    assert "--port=8000" in services["vllm"]["command"]


def test_grafana_provisioning_points_at_the_dashboards(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(volume_target(v) for v in grafana["volumes"])
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/featurewatch.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    (source,) = [s for s, t in mounts.items() if t == path]
    assert (COMPOSE_DIR / source / "featurewatch.json").exists()
    datasource = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def test_docker_compose_config_if_available():
    docker = shutil.which("docker")
    if docker is None or run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("docker compose CLI is not installed (the structural checks above still run)")
    result = run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


def test_dockerfile():
    stages = dockerfile_stages()
    assert list(stages) == ["build", "vllm", "sidecar"]  # the sidecar is the default (last) target
    sidecar = dict(stages["sidecar"][::-1])  # last occurrence wins
    assert sidecar["ENTRYPOINT"] == '["featurewatch"]'
    assert sidecar["CMD"] == '["serve", "--config", "/etc/featurewatch/featurewatch.yaml"]'
    assert sidecar["USER"].split(":")[0] == "1000"  # = runAsUser in deploy/k8s (socket mode 0600)
    assert set(sidecar["EXPOSE"].split()) == {"50051", "9400"}
    assert "grpc_health" in sidecar["HEALTHCHECK"]
    # the `tokenizer` extra, so `tokenizer:` in the sidecar config works in the container
    installs = " ".join(a for i, a in stages["sidecar"] if i == "RUN" and "/wheels/" in a)
    assert re.search(r'pip install [^&]*/wheels/featurewatch-\*\.whl\)\[tokenizer\]"', installs), installs
    # The vllm stage installs the wheel pinned to the image's torch/vLLM and enables the plugin.
    vllm = stages["vllm"]
    run_steps = " ".join(a for i, a in vllm if i == "RUN")
    assert "-c /tmp/pins" in run_steps and "torch|vllm" in run_steps
    env = " ".join(a for i, a in vllm if i == "ENV")
    assert "FEATUREWATCH_ADDRESS=unix:///run/featurewatch/featurewatch.sock" in env
    assert "VLLM_PLUGINS=featurewatch,featurewatch_routes" in env
    # Everything the build stage copies exists.
    for instruction, args in stages["build"]:
        if instruction == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), source
