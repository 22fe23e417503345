"""`kubectl kustomize deploy/k8s` renders offline, and the rendered objects have the key properties."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from tests.deploy.deploy_helpers import REPO, need_binary, run
from monitor.config import SidecarConfig
from monitor.evaluate.rules import parse_rules

K8S = REPO / "deploy" / "k8s"


def render(path) -> list[dict]:
    kubectl = need_binary("kubectl")
    result = run([kubectl, "kustomize", str(path)], timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name_prefix: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(matches) == 1, f"{kind} {name_prefix}: {[o['metadata']['name'] for o in matches]}"
    return matches[0]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S)


@pytest.fixture(scope="module")
def fail_closed() -> list[dict]:
    return render(K8S / "overlays" / "fail-closed")


def pod(objects: list[dict]) -> dict:
    return find(objects, "Deployment", "vllm")["spec"]["template"]


def sidecar_config(objects: list[dict]) -> SidecarConfig:
    cm = find(objects, "ConfigMap", "featurewatch-config")
    # The rendered config is what `featurewatch serve` validates at start.
    return SidecarConfig.model_validate(yaml.safe_load(cm["data"]["featurewatch.yaml"]))


def test_renders_expected_objects(base):
    # Generated ConfigMaps/Secrets carry a content-hash suffix.
    kinds = sorted((o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])) for o in base)
    assert kinds == sorted([
        ("ConfigMap", "featurewatch-config"), ("ConfigMap", "featurewatch-rules"), ("Secret", "featurewatch-admin"),
        ("Deployment", "vllm"), ("Service", "vllm"), ("Deployment", "featurewatch-redis"), ("Service", "featurewatch-redis"),
        ("NetworkPolicy", "vllm-featurewatch"), ("NetworkPolicy", "featurewatch-redis"),
        ("PersistentVolumeClaim", "featurewatch-dictionaries"),
    ])
    # The rules ConfigMap keeps its name so edits reach running pods (hot reload).
    assert find(base, "ConfigMap", "featurewatch-rules")["metadata"]["name"] == "featurewatch-rules"


def test_native_sidecar_with_grpc_probes_fail_open(base):
    spec = pod(base)["spec"]
    (sidecar,) = [c for c in spec["initContainers"] if c["name"] == "featurewatch"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["args"] == ["serve", "--config", "/etc/featurewatch/featurewatch.yaml"]
    config = sidecar_config(base)
    assert config.grpc_host == "0.0.0.0"  # the kubelet probes the pod IP
    assert sidecar["livenessProbe"]["grpc"] == {"port": config.grpc_port}
    # Fail-open: nothing about the sidecar gates the pod's start or readiness.
    assert "readinessProbe" not in sidecar and "startupProbe" not in sidecar
    assert "readinessGates" not in spec
    assert config.steering.failure_mode == "open"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"grpc": config.grpc_port, "metrics": config.metrics_port}


def test_socket_on_shared_emptydir(base):
    spec = pod(base)["spec"]
    (sidecar,) = spec["initContainers"]
    (vllm,) = spec["containers"]
    config = sidecar_config(base)
    volumes = {v["name"]: v for v in spec["volumes"]}

    def mount_of(container, path) -> str:
        (m,) = [m for m in container["volumeMounts"] if str(path).startswith(m["mountPath"].rstrip("/") + "/")]
        return m["name"]

    shared = mount_of(sidecar, config.socket)
    assert mount_of(vllm, config.socket) == shared and "emptyDir" in volumes[shared]
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["FEATUREWATCH_ADDRESS"] == f"unix://{config.socket}"
    # Socket mode 0600: both containers run as the same uid.
    assert spec["securityContext"]["runAsUser"] == 1000
    assert "runAsUser" not in sidecar.get("securityContext", {}) and "runAsUser" not in vllm.get("securityContext", {})
    # The plugin is allowed by vLLM's allowlist under its entry-point names.
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    names = set(entry_points["vllm.general_plugins"]) | set(entry_points["vllm.endpoint_plugins"])
    assert set(env["VLLM_PLUGINS"].split(",")) == names
    # One model name everywhere: vLLM's served name = the sidecar's model_name label.
    assert f"--served-model-name={config.model_name}" in vllm["args"]
    assert env["FEATUREWATCH_MODEL_NAME"] == config.model_name
    # vLLM's own health decides readiness.
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"


def test_config_and_rules_mounted_and_valid(base):
    spec = pod(base)["spec"]
    (sidecar,) = spec["initContainers"]
    config = sidecar_config(base)
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["/etc/featurewatch/featurewatch.yaml"]["subPath"] == "featurewatch.yaml"
    rules_dir = str(config.rules_file.parent)
    assert "subPath" not in mounts[rules_dir], "a subPath mount never sees ConfigMap updates"
    assert volumes[mounts[rules_dir]["name"]]["configMap"]["name"] == "featurewatch-rules"
    rules_text = find(base, "ConfigMap", "featurewatch-rules")["data"][config.rules_file.name]
    parsed = parse_rules(rules_text, "rules.yaml")
    assert parsed.rules and {r.signal.source for r in parsed.rules} <= {s.name for s in config.sources}
    for source in config.sources:
        assert any(str(source.path).startswith(p) for p in mounts), f"{source.path} is not on a mounted volume"
    # Redis store for rule sync, pointing at the Service rendered here.
    assert config.store.kind == "redis"
    redis_svc = find(base, "Service", "featurewatch-redis")
    assert config.store.url == f"redis://{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}/0"
    secret = find(base, "Secret", "featurewatch-admin")
    env = {e["name"]: e for e in sidecar["env"]}
    assert env[config.admin_token_env]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_prometheus_annotations(base):
    template = pod(base)
    config = sidecar_config(base)
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    service = find(base, "Service", "vllm")
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    (vllm,) = template["spec"]["containers"]
    assert "--port=8000" in vllm["args"]
    assert not [o for o in base if o["kind"] == "ServiceMonitor"]
    # The Redis NetworkPolicy admits pods labelled part-of=featurewatch: the vLLM pods are.
    assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "featurewatch"
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()


def test_fail_closed_overlay(fail_closed):
    (sidecar,) = pod(fail_closed)["spec"]["initContainers"]
    config = sidecar_config(fail_closed)
    assert config.steering.failure_mode == "closed"
    assert sidecar["readinessProbe"]["grpc"]["port"] == config.grpc_port
    assert sidecar["startupProbe"]["grpc"]["port"] == config.grpc_port
    # Otherwise the same config as the base.
    base_text = (K8S / "base" / "featurewatch.yaml").read_text()
    closed_text = (K8S / "components" / "fail-closed" / "featurewatch.yaml").read_text()
    assert closed_text == base_text.replace("failure_mode: open", "failure_mode: closed")
