"""Safe readers for the files SAE loaders open: JSON configs, safetensors, .npz, torch state dicts.

Every reader refuses what is not a regular file (a FIFO would block the loader forever),
bounds what it parses (configs are small; weights may be many GB and are memory-mapped or
streamed by their libraries), checks every tensor's values (checks.py) under the name the
file gives it, and turns every failure into a SAEFormatError naming the file and saying in
plain words what is wrong. Nothing is unpickled beyond ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from monitor.files import read_regular_file

from .checks import check_tensors
from .errors import SAEFormatError, clean

MAX_CONFIG_BYTES = 1 << 20  # cfg.json, config.json, activation_scaler.json: a few KB in practice


def regular_file(path: Path, what: str) -> None:
    """Refuse a missing path or one that is not a regular file (after following links)."""
    if not path.exists():
        raise SAEFormatError(path, f"missing {what}")
    if not path.is_file():
        raise SAEFormatError(path, f"{what} is not a regular file")


def read_json(path: Path, what: str = "config file") -> dict[str, Any]:
    """A JSON object from a small config file."""
    regular_file(path, what)
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)  # bounded, and never blocks on a swapped-in FIFO
    except ValueError as e:
        raise SAEFormatError(path, f"{what} refused ({e})") from None
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(path, f"unreadable JSON {what} ({e})") from None
    except RecursionError:
        raise SAEFormatError(path, f"unreadable JSON {what} (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(path, f"{what} is not a JSON object")
    return cfg


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    regular_file(path, "weights file")
    try:
        t = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEFormatError(path, f"not a readable safetensors file ({e})") from None
    check_tensors(path, t)
    return t


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    regular_file(path, "weights file")
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = {k: torch.from_numpy(np.array(data[k], dtype=np.float32)) for k in data.files}
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, EOFError) as e:
        raise SAEFormatError(path, f"not a readable .npz archive of arrays ({e})") from None
    check_tensors(path, raw)
    return raw


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"  # protocol ≥ 2 pickles (torch's legacy format) start with PROTO
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_torch(path: Path) -> Any:
    """A torch file's content through ``torch.load(weights_only=True)``, with our own refusals:
    an empty or truncated file says so; a pickle needing globals names the first one and never
    repeats torch's advice to load it with ``weights_only=False``."""
    regular_file(path, "weights file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise SAEFormatError(path, "empty file (0 bytes): an interrupted save or download?")
    if _ZIP_MAGIC.startswith(head) and not zipfile.is_zipfile(path):  # head: up to 4 bytes
        raise SAEFormatError(
            path, "truncated or corrupt torch file: a zip archive without its central directory "
            f"({path.stat().st_size} bytes; an interrupted save or download?)"
        )
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise SAEFormatError(path, "not a torch file (neither a torch zip archive nor a legacy torch pickle)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files we refuse anyway
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, OSError …: our own message
        raise SAEFormatError(path, _torch_refusal(path, e)) from None
    if isinstance(raw, dict):
        check_tensors(path, raw)
    return raw


def _torch_refusal(path: Path, e: Exception) -> str:
    text = str(e)
    found, ends_early = _pickled_globals(path)
    if found:
        return (
            f"refused: not a weights-only torch file: it pickles {', '.join(found)}; featurewatch "
            "never runs a pickle (re-save the tensors with safetensors or a plain torch.save(state_dict))"
        )
    if ends_early or isinstance(e, EOFError) or "EOF" in text:
        return (
            f"truncated torch file: it ends inside its data ({path.stat().st_size} bytes; "
            "an interrupted save or download?)"
        )
    if isinstance(e, pickle.UnpicklingError) or _GLOBAL.search(text):
        return f"refused: not a weights-only torch file ({_detail(text)})"
    return f"corrupt torch file ({type(e).__name__}: {_detail(text)})"


_TENSOR_MODULES = ("torch", "collections", "_codecs")  # what a plain state dict pickles
_MAX_PICKLE_OPS = 1_000_000
_LEGACY_PICKLES = 4  # torch's legacy format: magic number, protocol, sys info, the object (+ keys)


def _pickled_globals(path: Path, limit: int = 3) -> tuple[list[str], bool]:
    """(the first few non-tensor globals a torch file's pickles name, whether a pickle ends
    early), read with pickletools, which only parses opcodes and never imports or calls."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                if names:
                    with z.open(names[0]) as f:
                        _scan_globals(f, found, limit)
            return found, False
        with open(path, "rb") as f:
            for _ in range(_LEGACY_PICKLES):
                try:
                    _scan_globals(f, found, limit)
                except Exception:
                    return found, f.read(1) == b""  # ran out of bytes: truncated
                if len(found) >= limit or not f.peek(1):
                    break
    except Exception:  # unreadable: the caller falls back to torch's own detail
        pass
    return found, False


def _scan_globals(f: Any, found: list[str], limit: int) -> None:
    """One pickle, up to its STOP: append the globals it names outside torch's own modules."""
    strings: list[str] = []  # the last two string pushes: STACK_GLOBAL's module and name
    for i, (op, arg, _) in enumerate(pickletools.genops(f)):
        if i > _MAX_PICKLE_OPS:
            return
        name = None
        if op.name in ("GLOBAL", "INST"):
            name = str(arg).replace(" ", ".")
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            name = f"{strings[-2]}.{strings[-1]}"
        elif isinstance(arg, str):
            strings = [*strings[-1:], arg]
        if name and not name.startswith(_TENSOR_MODULES) and clean(name, 80) not in found:
            found.append(clean(name, 80))
            if len(found) >= limit:
                return


_BOILERPLATE = ("weights_only", "Weights only load failed", "torch.load", "file an issue")


def _detail(text: str) -> str:
    """The informative part of a torch message, cleaned and short: the unpickler's own error
    where torch wraps one, else the first line that is not torch's advice or boilerplate."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
    lines = (m.group(1) if m else text).splitlines()
    lines = [c for c in (clean(x, 160) for x in lines) if c and not any(b in c for b in _BOILERPLATE)]
    return lines[0] if lines else "no detail"
