"""Loaders: every SAE file format users bring, into the canonical SAE classes of sae.py.

| format      | files                                        | notes                                  |
|-------------|----------------------------------------------|----------------------------------------|
| saelens     | cfg.json + sae_weights.safetensors           | v6 and pre-6.0 configs                 |
| gemmascope  | params.npz (W_enc, W_dec, b_enc, b_dec, threshold) | JumpReLU on raw x                |
| gemmascope2 | params.safetensors (lowercase keys)          | same math                              |
| sparsify    | cfg.json + sae.safetensors (encoder.weight…) | TopK after ReLU, x − b_dec             |
| goodfire    | *.pt/*.pth state dict (encoder_linear…)      | ReLU on raw x; weights_only load only  |

Nothing is ever unpickled beyond ``torch.load(weights_only=True)``; every refusal is a
SAEFormatError naming the file and the problem. Files are read by readers.py (regular files
only, configs size-bounded, every tensor checked for NaN/inf and absurd magnitudes under the
name the file gives it); the SAELens loader lives in saelens_format.py. Transcoders (which read
one stream and write another) are refused wherever the file says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .architectures import ARCHITECTURES
from .checks import check_tensors, config_int
from .errors import SAEFormatError, short
from .readers import read_json, read_npz, read_safetensors, read_torch
from .sae import SAE
from .saelens_format import SAELENS_CFG, SAELENS_WEIGHTS, load_saelens

FORMATS = ("saelens", "gemmascope", "gemmascope2", "sparsify", "goodfire")

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
    if not (p.is_file() or p.is_dir()):
        raise SAEFormatError(p, "not a regular file or directory")
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
        "saelens": load_saelens,
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
    # Files were checked as read; this catches what a fold or conversion made of them.
    s = metadata.get("folded_norm_scaling_factor")
    check_tensors(path, t, context=f" after folding the norm scaling factor {s:g}" if s else "")
    cls = ARCHITECTURES[architecture]
    try:
        return cls(**t, metadata=metadata, device=device, dtype=dtype, **options)
    except ValueError as e:
        raise SAEFormatError(path, str(e)) from None


# ---- Gemma Scope -----------------------------------------------------------------------------
def _gemmascope_spec(path: Path, raw: dict[str, torch.Tensor]) -> dict[str, Any]:
    canonical = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
    t = {canonical.get(k.lower(), k): v for k, v in raw.items()}  # v1 has W_enc, v2 w_enc
    if "affine_skip_connection" in t:
        raise SAEFormatError(
            path, "tensor affine_skip_connection: a skip transcoder (reads one stream, writes another), "
            "not an SAE of one activation stream; transcoders are not served"
        )
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
    return _gemmascope_spec(path, read_npz(path))


def _gemmascope2_transcoder(cfg: dict[str, Any]) -> str | None:
    """Which field of a Gemma Scope 2 config.json shows a transcoder, or None. A transcoder
    without a skip connection has an SAE's tensors and shapes (Gemma 3's MLP reads and writes
    d_model), so only the config tells: ``type`` ("sae" for SAEs), an output hook point other
    than the input one, or ``affine_connection: true``."""
    kind = cfg.get("type")
    if kind is not None and kind != "sae":
        return f"field type is {short(kind)}, not 'sae'"
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    if hook_out is not None and hook_out != hook_in:
        return f"field hf_hook_point_out {short(hook_out)} differs from hf_hook_point_in {short(hook_in)}"
    if cfg.get("affine_connection") is True:
        return "field affine_connection is true (a skip connection)"
    return None


def _load_gemmascope2(path: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    del norm_scaling_factor
    cfg_path = path.parent / "config.json"
    if cfg_path.exists():
        cfg = read_json(cfg_path)
        arch = cfg.get("architecture", "jump_relu")
        if arch not in ("jump_relu", "jumprelu"):
            raise SAEFormatError(cfg_path, f"unknown Gemma Scope 2 architecture {short(arch)}")
        why = _gemmascope2_transcoder(cfg)
        if why:
            raise SAEFormatError(
                cfg_path, f"a transcoder, not an SAE ({why}); transcoders read one stream and write "
                "another, and are not served"
            )
    return _gemmascope_spec(path, read_safetensors(path))


# ---- EleutherAI sparsify ---------------------------------------------------------------------
def _load_sparsify(root: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    del norm_scaling_factor
    cfg_path, w_path = root / SAELENS_CFG, root / SPARSIFY_WEIGHTS
    cfg = read_json(cfg_path)
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(cfg_path, f"sparsify activation {short(cfg.get('activation'))} is not supported (topk only)")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise SAEFormatError(cfg_path, "a sparsify transcoder / skip-connection coder, not an SAE of one stream")
    if cfg.get("signed"):
        raise SAEFormatError(cfg_path, "signed sparsify coders are not supported")
    if "k" not in cfg:
        raise SAEFormatError(cfg_path, "missing k")
    topk = config_int(cfg["k"], cfg_path, "k")
    d_in = config_int(cfg["d_in"], cfg_path, "d_in") if cfg.get("d_in") is not None else None
    if cfg.get("num_latents"):
        d_sae = config_int(cfg["num_latents"], cfg_path, "num_latents")
    elif d_in and cfg.get("expansion_factor"):
        d_sae = d_in * config_int(cfg["expansion_factor"], cfg_path, "expansion_factor", maximum=2**16)
    else:
        d_sae = None
    raw = read_safetensors(w_path)
    t: dict[str, torch.Tensor] = {}
    renames = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
    for k, v in raw.items():
        if k not in renames:
            raise SAEFormatError(w_path, f"unexpected tensor {k} in a sparsify SAE")
        t[renames[k]] = v
    if "W_enc" in t:
        t["W_enc"] = t["W_enc"].T  # nn.Linear weight [n, d_in] -> [d_in, n]
    return {
        "path": w_path,
        "architecture": "topk",
        "tensors": t,
        "metadata": {"hookpoint": root.name},
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": True,  # sparsify encodes x − b_dec
        "normalize": "none",
        "k": topk,
    }


# ---- Goodfire --------------------------------------------------------------------------------
def _load_goodfire(path: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    del norm_scaling_factor
    raw = read_torch(path)
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
            raise SAEFormatError(path, f"unexpected entry {short(k)} in a Goodfire state dict")
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
