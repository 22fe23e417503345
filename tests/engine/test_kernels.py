"""Runs the Triton kernel checks (test_kernels_interpreted.py) under Triton's CPU interpreter in a
child process, since TRITON_INTERPRET must be set before triton is first imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monitor.encode import kernels

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not kernels.triton_available(), reason="triton not installed")
def test_kernel_under_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_kernels_interpreted.py")],
        cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout, tail


def test_kernel_off_by_default_on_cpu(monkeypatch):
    monkeypatch.delenv("FEATUREWATCH_TRITON", raising=False)
    assert not kernels.use_triton(torch.zeros(2, 2))
    monkeypatch.setenv("FEATUREWATCH_TRITON", "0")
    assert not kernels.use_triton(torch.zeros(2, 2))
