"""Which rules are in force, and where they came from (issue 16): with a `rules_file` the file is
authoritative — `rules apply` writes it (or is refused when it cannot), an edit or a restart never
silently brings back other rules, a set from the store that differs is not applied — and `rules get`
and `featurewatch_rules_source` say where the rules in force came from."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from monitor.config import SidecarConfig
from monitor.sidecar import Sidecar
from tests.support.dictionaries import planted_rules
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, fixture_config, metric_value

ROOT = Path(__file__).resolve().parents[2]
D = 64
FILE_RULES = planted_rules()
APPLIED = planted_rules().replace("above: 2.0", "above: 3.0").replace("tenant_b_suppress", "applied_policy")


def cli(sidecar: SidecarProcess, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEATUREWATCH_ADMIN_TOKEN": ADMIN_TOKEN, "FEATUREWATCH_ADDRESS": sidecar.tcp_address,
           "USER": "alice"}
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def rules_get(sidecar: SidecarProcess) -> tuple[str, str]:
    """(the comment line `rules get` prints on stderr, the YAML on stdout)."""
    out = cli(sidecar, "rules", "get")
    assert out.returncode == 0, out.stderr
    return out.stderr.strip(), out.stdout


def test_rules_apply_writes_the_authoritative_file_and_edits_and_restarts_keep_it(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(FILE_RULES)
    proc = SidecarProcess(tmp_path, fixture_config(tmp_path, D, rules_file=str(rules)))
    with proc:
        header, text = rules_get(proc)
        assert text == FILE_RULES and f"from the rules file {rules} (store memory)" in header
        assert metric_value(proc.metrics(), "featurewatch_rules_source", source="file", origin=str(rules)) == 1

        (tmp_path / "new.yaml").write_text(APPLIED)
        out = cli(proc, "rules", "apply", str(tmp_path / "new.yaml"))
        assert out.returncode == 0, out.stderr
        assert f"written to {rules}" in out.stdout and "applied as version" in out.stdout
        assert rules.read_text() == APPLIED  # the file now holds what was applied
        header, text = rules_get(proc)
        assert text == APPLIED and f"the rules file {rules}, last written by rules apply from alice" in header

        # An unrelated edit of the file (a comment) keeps the applied rules: before, it put the
        # file's old rules back in force, steering included.
        rules.write_text(APPLIED + "# reviewed\n")
        wait_for(lambda: rules_get(proc)[1] == APPLIED + "# reviewed\n", "the edited file in force")
    assert "Traceback" not in proc.log()
    with SidecarProcess(tmp_path, proc.config) as again:  # a restart: the file, which has the applied rules
        header, text = rules_get(again)
        assert "applied_policy" in text and "above: 3.0" in text and f"the rules file {rules}" in header


def test_rules_apply_is_refused_when_the_file_cannot_be_written(tmp_path):
    managed = tmp_path / "configmap"
    managed.mkdir()
    (managed / "rules.yaml").write_text(FILE_RULES)
    rules = tmp_path / "rules.yaml"
    rules.symlink_to(managed / "rules.yaml")  # as a Kubernetes ConfigMap mounts it
    with SidecarProcess(tmp_path, fixture_config(tmp_path, D, rules_file=str(rules))) as proc:
        (tmp_path / "new.yaml").write_text(APPLIED)
        out = cli(proc, "rules", "apply", str(tmp_path / "new.yaml"))
        assert out.returncode == 1 and "Traceback" not in out.stderr
        message = " ".join(out.stderr.split())
        assert "FAILED_PRECONDITION" in message and f"the rules file {rules} is authoritative" in message
        assert "symlink" in message and "rules in force unchanged" in message
        assert rules_get(proc)[1] == FILE_RULES and (managed / "rules.yaml").read_text() == FILE_RULES


def test_without_a_rules_file_the_store_is_the_source_and_the_kill_switch_prints_on_off(tmp_path):
    with SidecarProcess(tmp_path, fixture_config(tmp_path, D)) as proc:
        assert "from no rules" in rules_get(proc)[0]
        (tmp_path / "new.yaml").write_text(APPLIED)
        out = cli(proc, "rules", "apply", str(tmp_path / "new.yaml"))
        assert out.returncode == 0 and "written to" not in out.stdout, out.stdout + out.stderr
        assert "from rules apply by alice (store memory)" in rules_get(proc)[0]
        assert metric_value(proc.metrics(), "featurewatch_rules_source", source="admin", origin="alice") == 1
        for state in ("off", "on"):
            assert cli(proc, "steering", state).returncode == 0
        tail = cli(proc, "alerts", "tail", "--last", "5").stdout
        lines = [line for line in tail.splitlines() if "kill switch" in line]
        assert len(lines) == 2 and "steering off" in lines[0] and "steering on" in lines[1], tail


def test_a_store_set_that_differs_from_the_rules_file_is_not_applied(tmp_path):
    """Another replica's `rules apply` reaches this sidecar through the store: its file stays in force."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(FILE_RULES)
    cfg = fixture_config(tmp_path, D, socket=None, grpc_port=None, metrics_port=None, rules_file=str(rules))
    sidecar = Sidecar(SidecarConfig.model_validate(cfg))
    try:
        assert sidecar.rules.yaml == FILE_RULES and sidecar.rules_origin.source == "file"
        version = sidecar.rules.version
        sidecar.rule_store.put(APPLIED, "bob")  # delivered to this sidecar's subscription, as Redis would
        assert sidecar.rules.yaml == FILE_RULES and sidecar.rules.version == version
        sidecar.rule_store.put(FILE_RULES, "carol")  # the file's own text, a new version: taken
        assert sidecar.rules.yaml == FILE_RULES and sidecar.rules.version == version + 2
    finally:
        sidecar.events.close()

