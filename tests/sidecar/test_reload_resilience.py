"""The watched rules file: no bad write, of any kind, stops the watcher or the sidecar.

Each failed reload is counted (featurewatch_rule_reloads_total{result="error"}; a bad file is retried,
and each failed retry counts too), logged once on one line with its reason, the last good rules stay
in force, and the next good edit is applied. Files
are replaced atomically (as editors and Kubernetes ConfigMaps do) so that the watcher never reads a
half-written file; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np

from monitor.config import SidecarConfig
from monitor.sidecar import Sidecar
from tests.support.dictionaries import planted_rules
from tests.support.sidecar import SidecarProcess, fixture_config, metric_value

D = 64
RULES = planted_rules()
RULES_B = RULES.replace("above: 0.9", "above: 0.8")
NOT_UTF8 = b"rules:\n  - name: caf\xe9\n"
DEEP = "rules: " + "[" * 5000 + "]" * 5000 + "\n"


def with_direction(path: Path) -> str:
    """RULES plus a rule that adds a direction read from `path`."""
    rule = ("  - name: push\n    signal: {source: sae, feature: 1}\n    above: 5.0\n    actions:\n"
            f"      - steer: {{add: {{scale: 1.0, direction_file: {path}, layer: 1}}}}\n")
    return RULES.replace("policies:", rule + "policies:")


def replace(path: Path, data: str | bytes) -> None:
    """Write a file atomically: a reader sees the old or the new content, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def wait_until(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


class Watched:
    """A real `featurewatch serve` whose rules file the test rewrites."""

    def __init__(self, tmp: Path, initial: str | bytes) -> None:
        self.rules = tmp / "rules.yaml"
        replace(self.rules, initial)
        self.proc = SidecarProcess(tmp, fixture_config(tmp, D, rules_file=str(self.rules)))

    def errors(self) -> float:
        return metric_value(self.proc.metrics(), "featurewatch_rule_reloads_total", result="error")

    def version(self) -> float:
        return metric_value(self.proc.metrics(), "featurewatch_rules_version")

    def rule_names(self) -> set[str]:
        return {line.split('rule="')[1].split('"')[0] for line in self.proc.metrics().splitlines()
                if line.startswith("featurewatch_rule_info{")}

    def rejected(self, data: str | bytes) -> None:
        """Write a bad file: the failure is counted and logged (once), and the rules in force stay."""
        version, names, errors, logged = self.version(), self.rule_names(), self.errors(), len(self.error_lines())
        replace(self.rules, data)
        wait_until(lambda: len(self.error_lines()) >= logged + 1, f"failure #{logged + 1} to be logged")
        assert len(self.error_lines()) == logged + 1, self.error_lines()[logged:]
        assert self.errors() > errors
        assert self.version() == version and self.rule_names() == names
        assert self.proc.proc.poll() is None

    def error_lines(self) -> list[str]:
        return [line for line in self.proc.log().splitlines() if "ERROR" in line and "rules file" in line]


def test_watcher_survives_every_bad_write_and_applies_the_next_good_one(tmp_path):
    w = Watched(tmp_path, RULES)
    with w.proc:
        wait_until(lambda: w.version() == 1, "the initial rules")
        assert w.errors() == 0
        empty_npy, corrupt_st = tmp_path / "empty.npy", tmp_path / "corrupt.safetensors"
        empty_npy.write_bytes(b"")
        corrupt_st.write_bytes(b"\xff" * 40)
        bad = [NOT_UTF8, DEEP, with_direction(empty_npy), with_direction(corrupt_st),
               with_direction(tmp_path / "missing.npy")]
        for data in bad:
            w.rejected(data)

        # A later valid edit is applied: the watcher is still alive.
        replace(w.rules, RULES_B)
        wait_until(lambda: w.version() == 2, "the good edit after five bad ones")
        errors = w.errors()
        assert errors >= len(bad)
        assert 'featurewatch_rule_reloads_total{result="ok"}' in w.proc.metrics()

        # A bad direction file fixed in place (the rules file untouched) is picked up by the retry.
        direction = tmp_path / "direction.npy"
        direction.write_bytes(b"")
        w.rejected(with_direction(direction))
        np.save(tmp_path / "good.npy", np.ones(D, np.float32))
        os.replace(tmp_path / "good.npy", direction)
        wait_until(lambda: "push" in w.rule_names(), "the fixed direction file to be picked up")
        assert w.version() == 3 and w.errors() > errors

    log = w.proc.log()
    assert "Traceback" not in log, log[-3000:]
    lines = w.error_lines()
    assert len(lines) == len(bad) + 1, lines  # each failure once: the retries of a failure stay quiet
    assert any("UTF-8" in line for line in lines) and any("nest" in line.lower() or "Recursion" in line for line in lines)
    for path in (empty_npy, corrupt_st, "missing.npy", direction):
        assert sum(str(path) in line for line in lines) == 1, (path, lines)
    assert all(len(line) < 1000 for line in lines)


def test_serve_starts_with_a_bad_rules_file_and_applies_the_fix(tmp_path):
    """A bad rules file at start: the sidecar serves with no rules, reports it, and takes the fix."""
    w = Watched(tmp_path, NOT_UTF8)
    with w.proc:  # waits for grpc.health SERVING: it did not exit
        assert w.errors() >= 1 and w.version() == 0 and w.rule_names() == set()
        assert len(w.error_lines()) == 1 and str(w.rules) in w.error_lines()[0]
        replace(w.rules, RULES)
        wait_until(lambda: w.version() == 1, "the fixed rules file")
        assert w.rule_names() == {"planted_feature", "planted_probe"}
    assert "Traceback" not in w.proc.log()


def test_an_exception_of_any_type_in_a_reload_is_counted_and_the_watcher_goes_on(tmp_path):
    rules = tmp_path / "rules.yaml"
    replace(rules, RULES)
    raw = fixture_config(tmp_path, D, socket=None, grpc_port=None, metrics_port=None, rules_file=str(rules))
    sidecar = Sidecar(SidecarConfig.model_validate(raw))
    compile_ok = sidecar.compile

    class Surprise(Exception):
        """Nothing the reload path knows about."""

    def compile(text, file, version=0):
        if "surprise" in text:
            raise Surprise("an exception no one planned for")
        return compile_ok(text, file, version)

    sidecar.compile = compile
    sample = sidecar.metrics.registry.get_sample_value

    async def until(predicate, what: str) -> None:
        deadline = time.monotonic() + 60
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        await sidecar.start()
        try:
            assert sidecar.rules.version == 1
            replace(rules, RULES + "# surprise\n")
            await until(lambda: (sample("featurewatch_rule_reloads_total", {"result": "error"}) or 0) >= 1, "the error count")
            assert sidecar.rules.version == 1
            replace(rules, RULES_B)
            await until(lambda: sidecar.rules.version == 2, "the next good edit")
            assert sidecar.rules.yaml == RULES_B
            assert all(not t.done() for t in sidecar._tasks), "a background task died"
        finally:
            await sidecar.stop()

    asyncio.run(scenario())
