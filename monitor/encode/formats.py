"""Loaders: every SAE file format users bring, into the canonical SAE classes of sae.py.

| format      | files                                        | notes                                  |
|-------------|----------------------------------------------|----------------------------------------|
| saelens     | cfg.json + sae_weights.safetensors           | v6 and pre-6.0 configs                 |
| gemmascope  | params.npz (W_enc, W_dec, b_enc, b_dec, threshold) | JumpReLU on raw x                |
| gemmascope2 | params.safetensors (lowercase keys)          | same math                              |
| sparsify    | cfg.json + sae.safetensors (encoder.weight…) | TopK after ReLU, x − b_dec             |
| goodfire    | *.pt/*.pth state dict (encoder_linear…)      | ReLU on raw x; weights_only load only  |

Nothing is ever unpickled beyond ``torch.load(weights_only=True)``; every refusal is a
SAEFormatError naming the file and the problem.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import SAEFormatError
from .sae import ARCHITECTURES, NORMALISATIONS, SAE

FORMATS = ("saelens", "gemmascope", "gemmascope2", "sparsify", "goodfire")

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMASCOPE_NPZ = "params.npz"
GEMMASCOPE2_WEIGHTS = "params.safetensors"
TORCH_SUFFIXES = (".pt", ".pth")

_FILE_FORMATS = {
    SAELENS_WEIGHTS: "saelens",
    SPARSIFY_WEIGHTS: "sparsify",
    GEMMASCOPE_NPZ: "gemmascope",
    GEMMASCOPE2_WEIGHTS: "gemmascope2",
}

_REQUIRED = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"),
}
_PER_FEATURE = ("b_enc", "threshold", "b_gate", "b_mag", "r_mag")


# ---- detection -------------------------------------------------------------------------------
def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format, location): a directory for saelens/sparsify, the weights file otherwise."""
    p = Path(path)
    if not p.exists():
        raise SAEFormatError(p, "no such file or directory")
    if p.is_file():
        if p.name == SAELENS_CFG:
            return detect_format(p.parent)
        fmt = _FILE_FORMATS.get(p.name)
        if fmt in ("saelens", "sparsify"):
            return fmt, p.parent
        if fmt is not None:
            return fmt, p
        if p.suffix in TORCH_SUFFIXES:
            return "goodfire", p
        raise SAEFormatError(
            p,
            f"not a recognised SAE file (expected {SAELENS_WEIGHTS}, {SPARSIFY_WEIGHTS}, "
            f"{GEMMASCOPE_NPZ}, {GEMMASCOPE2_WEIGHTS} or a .pt/.pth state dict)",
        )
    if (p / SAELENS_WEIGHTS).exists():
        return "saelens", p
    if (p / SPARSIFY_WEIGHTS).exists():
        return "sparsify", p
    if (p / GEMMASCOPE_NPZ).exists():
        return "gemmascope", p / GEMMASCOPE_NPZ
    if (p / GEMMASCOPE2_WEIGHTS).exists():
        return "gemmascope2", p / GEMMASCOPE2_WEIGHTS
    pts = sorted(q for q in p.iterdir() if q.suffix in TORCH_SUFFIXES)
    if len(pts) == 1:
        return "goodfire", pts[0]
    raise SAEFormatError(
        p,
        f"no SAE weights found (looked for {SAELENS_WEIGHTS}, {SPARSIFY_WEIGHTS}, {GEMMASCOPE_NPZ}, "
        f"{GEMMASCOPE2_WEIGHTS}, one .pt/.pth file)",
    )


def _locate(fmt: str, p: Path) -> Path:
    """Where the loader of an explicitly named format reads from."""
    names = {"gemmascope": GEMMASCOPE_NPZ, "gemmascope2": GEMMASCOPE2_WEIGHTS}
    if fmt in ("saelens", "sparsify"):
        return p.parent if p.is_file() else p
    if fmt in names:
        return p / names[fmt] if p.is_dir() else p
    if p.is_dir():
        pts = sorted(q for q in p.iterdir() if q.suffix in TORCH_SUFFIXES)
        if len(pts) != 1:
            raise SAEFormatError(p, f"expected exactly one .pt/.pth file, found {len(pts)}")
        return pts[0]
    return p


def load_sae(
    path: str | Path,
    format: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    norm_scaling_factor: float | None = None,
) -> SAE:
    """Load any supported SAE file or directory; the format is detected unless named.

    ``dtype`` only matters on CUDA (default bf16); CPU always computes in float32.
    ``norm_scaling_factor`` folds an ``expected_average_only_in`` scaling that the file does not
    carry itself (SAELens keeps it in pretrained_saes.yaml).
    """
    p = Path(path)
    if format is None:
        fmt, where = detect_format(p)
    else:
        if format not in FORMATS:
            raise ValueError(f"unknown SAE format {format!r}; expected one of {FORMATS}")
        if not p.exists():
            raise SAEFormatError(p, "no such file or directory")
        fmt, where = format, _locate(format, p)
    loader = {
        "saelens": _load_saelens,
        "gemmascope": _load_gemmascope,
        "gemmascope2": _load_gemmascope2,
        "sparsify": _load_sparsify,
        "goodfire": _load_goodfire,
    }[fmt]
    spec = loader(where, norm_scaling_factor=norm_scaling_factor)
    spec["metadata"].setdefault("format", fmt)
    spec["metadata"].setdefault("path", str(where))
    return _build(device=device, dtype=dtype, **spec)


# ---- shared helpers --------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SAEFormatError(path, "missing config file")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(path, f"unreadable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(path, "config is not a JSON object")
    return cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise SAEFormatError(path, "missing weights file")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEFormatError(path, f"not a readable safetensors file ({e})") from None


def _fold_scalar_scaling(t: dict[str, torch.Tensor], s: float) -> None:
    """Fold SAELens's expected_average_only_in (input · s) into the weights, like
    ``SAE.fold_activation_norm_scaling_factor``: W_enc·s, W_dec/s, b_dec/s."""
    t["W_enc"] = t["W_enc"] * s
    t["W_dec"] = t["W_dec"] / s
    t["b_dec"] = t["b_dec"] / s


def _build(
    *,
    path: Path,
    architecture: str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    device: torch.device | str,
    dtype: torch.dtype | None,
    d_in: int | None = None,
    d_sae: int | None = None,
    **options: Any,
) -> SAE:
    """Validate tensors (presence, dtype, shapes, finiteness) and construct the SAE class."""
    if architecture not in ARCHITECTURES:
        raise SAEFormatError(
            path, f"unknown SAE architecture {architecture!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    required = _REQUIRED[architecture]
    missing = [n for n in required if n not in tensors]
    if missing:
        raise SAEFormatError(path, f"missing tensor(s) {', '.join(missing)} for a {architecture} SAE")
    extra = sorted(set(tensors) - set(required))
    if extra:
        raise SAEFormatError(path, f"unexpected tensor(s) {', '.join(extra)} for a {architecture} SAE")
    t: dict[str, torch.Tensor] = {}
    for name in required:
        v = tensors[name]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise SAEFormatError(path, f"{name} is not a floating-point tensor")
        t[name] = v.detach().to("cpu", torch.float32)
    W_enc = t["W_enc"]
    if W_enc.dim() != 2:
        raise SAEFormatError(path, f"W_enc has shape {tuple(W_enc.shape)}, expected [d_in, d_sae]")
    n_in, n_sae = W_enc.shape
    if d_in is not None and int(d_in) != n_in:
        raise SAEFormatError(path, f"config says d_in={d_in} but W_enc is [{n_in}, {n_sae}]")
    if d_sae is not None and int(d_sae) != n_sae:
        raise SAEFormatError(path, f"config says d_sae={d_sae} but W_enc is [{n_in}, {n_sae}]")
    if "threshold" in t and t["threshold"].numel() == 1:  # BatchTopK: one global threshold
        t["threshold"] = t["threshold"].reshape(1).expand(n_sae).contiguous()
    expected = {"W_dec": (n_sae, n_in), "b_dec": (n_in,)}
    expected.update({n: (n_sae,) for n in _PER_FEATURE})
    for name, v in t.items():
        if name in expected and tuple(v.shape) != expected[name]:
            raise SAEFormatError(
                path,
                f"{name} has shape {list(v.shape)}, expected {list(expected[name])} "
                f"(W_enc is [d_in={n_in}, d_sae={n_sae}])",
            )
    for name, v in t.items():
        if torch.isnan(v).any():
            raise SAEFormatError(path, f"{name} contains NaN")
        if torch.isinf(v).any():
            raise SAEFormatError(path, f"{name} contains inf")
    cls = ARCHITECTURES[architecture]
    try:
        return cls(**t, metadata=metadata, device=device, dtype=dtype, **options)
    except ValueError as e:
        raise SAEFormatError(path, str(e)) from None


# ---- SAELens ---------------------------------------------------------------------------------
def _saelens_major(cfg: dict[str, Any]) -> int:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    m = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(m.group(1)) if m else 0


def upgrade_saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 SAELens cfg in v6 terms (renamed keys, topk from activation_fn kwargs,
    boolean normalize_activations), as SAELens's own handle_pre_6_0_config reads it."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in cfg.items()}
    new.setdefault("architecture", "standard")
    new.setdefault("apply_b_dec_to_input", True)
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        new["architecture"] = "topk"
        new["k"] = kwargs["k"]
    norm = new.get("normalize_activations")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    new["normalize_activations"] = norm or "none"
    if "hook_name" in new:
        new.setdefault("reshape_activations", "hook_z" if "hook_z" in str(new["hook_name"]) else "none")
    meta = {k: new[k] for k in ("hook_name", "hook_layer", "hook_head_index", "model_name") if k in new}
    new["metadata"] = {**meta, **(new.get("metadata") or {})}
    return new


def _load_saelens(root: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    cfg_path, w_path = root / SAELENS_CFG, root / SAELENS_WEIGHTS
    cfg = _read_json(cfg_path)
    if _saelens_major(cfg) < 6:
        cfg = upgrade_saelens_config(cfg)
    arch = cfg.get("architecture", "standard")
    if not isinstance(arch, str) or (arch not in ARCHITECTURES and arch != "batchtopk"):
        raise SAEFormatError(
            cfg_path, f"unknown SAE architecture {arch!r} (supported: {', '.join(ARCHITECTURES)}, batchtopk)"
        )
    t = _read_safetensors(w_path)
    options: dict[str, Any] = {}

    if "log_threshold" in t and "threshold" not in t:  # older JumpReLU training checkpoints
        t["threshold"] = t.pop("log_threshold").float().exp()
    for key in ("scaling_factor", "finetuning_scaling_factor"):  # pre-6 fine-tuning scale on acts
        if key in t:
            s = t.pop(key).float()
            if not torch.allclose(s, torch.ones_like(s)) and "W_dec" in t:
                t["W_dec"] = t["W_dec"].float() * s.reshape(-1, 1)  # (f·s)·W_dec == f·(s⊙W_dec)
    if arch == "batchtopk":  # a BatchTopK training checkpoint serves as JumpReLU
        if "topk_threshold" not in t:
            raise SAEFormatError(w_path, "missing tensor topk_threshold for a batchtopk SAE")
        thr = t.pop("topk_threshold").float()
        if cfg.get("rescale_acts_by_decoder_norm", True) and "W_dec" in t:
            n = t["W_dec"].float().norm(dim=-1).clamp(min=1e-8)
            t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
        t["threshold"] = thr.reshape(1)
        arch = "jumprelu"
    if arch == "topk":
        if cfg.get("k") is None:
            raise SAEFormatError(cfg_path, "topk SAE without k")
        options["k"] = int(cfg["k"])
        options["rescale_acts_by_decoder_norm"] = bool(cfg.get("rescale_acts_by_decoder_norm", False))

    norm = cfg.get("normalize_activations") or "none"
    metadata = dict(cfg.get("metadata") or {})
    if norm == "expected_average_only_in":
        factor = norm_scaling_factor
        if factor is None and (root / SAELENS_SCALER).exists():
            factor = _read_json(root / SAELENS_SCALER).get("scaling_factor")
        if factor is None:
            factor = cfg.get("norm_scaling_factor")
        if factor is not None:
            if not (isinstance(factor, (int, float)) and np.isfinite(factor) and factor > 0):
                raise SAEFormatError(cfg_path, f"norm scaling factor {factor!r} is not a positive number")
            if any(n not in t for n in ("W_enc", "W_dec", "b_dec")):
                raise SAEFormatError(w_path, "missing W_enc/W_dec/b_dec")
            _fold_scalar_scaling(t, float(factor))
            metadata["folded_norm_scaling_factor"] = float(factor)
        else:  # as SAELens's load_from_disk: the file is taken as already folded
            metadata["folded_norm_scaling_factor"] = None
        norm = "none"
    if norm == "covariance_whitening":
        raise SAEFormatError(cfg_path, "covariance_whitening not folded into the weights; fold it before serving")
    if norm not in NORMALISATIONS:
        raise SAEFormatError(cfg_path, f"unknown normalize_activations {norm!r}")
    reshape = cfg.get("reshape_activations") or "none"
    if reshape not in ("none", "hook_z"):
        raise SAEFormatError(cfg_path, f"unknown reshape_activations {reshape!r}")
    return {
        "path": w_path,
        "architecture": arch,
        "tensors": t,
        "metadata": metadata,
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "normalize": norm,
        "hook_z": reshape == "hook_z",
        **options,
    }


# ---- Gemma Scope -----------------------------------------------------------------------------
def _gemmascope_spec(path: Path, raw: dict[str, torch.Tensor]) -> dict[str, Any]:
    canonical = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
    t = {canonical.get(k.lower(), k): v for k, v in raw.items()}  # v1 has W_enc, v2 w_enc
    if "affine_skip_connection" in t:
        raise SAEFormatError(path, "a skip transcoder, not an SAE of one activation stream")
    return {
        "path": path,
        "architecture": "jumprelu",
        "tensors": t,
        "metadata": {},
        "apply_b_dec_to_input": False,  # Gemma Scope encodes raw x
        "normalize": "none",
    }


def _load_gemmascope(path: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    del norm_scaling_factor
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = {k: torch.from_numpy(np.array(data[k], dtype=np.float32)) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SAEFormatError(path, f"not a readable .npz archive of arrays ({e})") from None
    return _gemmascope_spec(path, raw)


def _load_gemmascope2(path: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    del norm_scaling_factor
    cfg_path = path.parent / "config.json"
    if cfg_path.exists():
        arch = _read_json(cfg_path).get("architecture", "jump_relu")
        if arch not in ("jump_relu", "jumprelu"):
            raise SAEFormatError(cfg_path, f"unknown Gemma Scope 2 architecture {arch!r}")
    return _gemmascope_spec(path, _read_safetensors(path))


# ---- EleutherAI sparsify ---------------------------------------------------------------------
def _load_sparsify(root: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    del norm_scaling_factor
    cfg_path, w_path = root / SAELENS_CFG, root / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_path)
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(cfg_path, f"sparsify activation {cfg.get('activation')!r} is not supported (topk only)")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise SAEFormatError(cfg_path, "a sparsify transcoder / skip-connection coder, not an SAE of one stream")
    if cfg.get("signed"):
        raise SAEFormatError(cfg_path, "signed sparsify coders are not supported")
    if "k" not in cfg:
        raise SAEFormatError(cfg_path, "missing k")
    raw = _read_safetensors(w_path)
    t: dict[str, torch.Tensor] = {}
    renames = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
    for k, v in raw.items():
        if k not in renames:
            raise SAEFormatError(w_path, f"unexpected tensor {k} in a sparsify SAE")
        t[renames[k]] = v
    if "W_enc" in t:
        t["W_enc"] = t["W_enc"].T  # nn.Linear weight [n, d_in] -> [d_in, n]
    d_in = cfg.get("d_in")
    d_sae = cfg.get("num_latents") or (d_in * cfg["expansion_factor"] if d_in and cfg.get("expansion_factor") else None)
    return {
        "path": w_path,
        "architecture": "topk",
        "tensors": t,
        "metadata": {"hookpoint": root.name},
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": True,  # sparsify encodes x − b_dec
        "normalize": "none",
        "k": int(cfg["k"]),
    }


# ---- Goodfire --------------------------------------------------------------------------------
def _load_goodfire(path: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    del norm_scaling_factor
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... : all the same refusal
        raise SAEFormatError(
            path, f"refused: not a weights-only torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(raw, dict):
        raise SAEFormatError(path, f"expected a state dict, found {type(raw).__name__}")
    keys = {
        "encoder_linear.weight": "W_enc",
        "encoder_linear.bias": "b_enc",
        "decoder_linear.weight": "W_dec",
        "decoder_linear.bias": "b_dec",
    }
    t: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if k not in keys:
            raise SAEFormatError(path, f"unexpected entry {k!r} in a Goodfire state dict")
        t[keys[k]] = v
    for name in ("W_enc", "W_dec"):  # nn.Linear weights are [out, in]
        if name in t and isinstance(t[name], torch.Tensor) and t[name].dim() == 2:
            t[name] = t[name].T
    return {
        "path": path,
        "architecture": "standard",
        "tensors": t,
        "metadata": {},
        "apply_b_dec_to_input": False,  # Goodfire encodes raw x
        "normalize": "none",
    }
