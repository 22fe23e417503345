"""SAELens directories (cfg.json + sae_weights.safetensors) into a canonical SAE spec.

Covers v6 and pre-6.0 configs, the four inference architectures, and training checkpoints
(BatchTopK as JumpReLU, ``log_threshold``, pre-6 fine-tuning scales). The scalar input scaling
``expected_average_only_in`` is folded exactly as SAELens's trainer folds it before saving the
inference model: first ``fold_activation_norm_scaling_factor`` (which for BatchTopK with
decoder-norm rescaling also divides ``topk_threshold`` by the factor), then the conversion to
JumpReLU, so a mid-training checkpoint serves the activations SAELens would.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .architectures import ARCHITECTURES
from .checks import config_int, positive_factor
from .errors import SAEFormatError, short
from .readers import read_json, read_safetensors
from .sae import NORMALISATIONS

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"


def _saelens_major(cfg: dict[str, Any]) -> int:
    meta = cfg.get("metadata")
    version = cfg.get("sae_lens_version") or (meta.get("sae_lens_version") if isinstance(meta, dict) else None)
    m = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(m.group(1)) if m else 0


def upgrade_saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 SAELens cfg in v6 terms (renamed keys, topk from activation_fn kwargs,
    boolean normalize_activations), as SAELens's own handle_pre_6_0_config reads it."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in cfg.items()}
    new.setdefault("architecture", "standard")
    new.setdefault("apply_b_dec_to_input", True)
    kwargs = new.get("activation_fn_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
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
    old_meta = new.get("metadata")
    new["metadata"] = {**meta, **(old_meta if isinstance(old_meta, dict) else {})}
    return new


def _flag(cfg: dict[str, Any], key: str, default: bool, where: Path) -> bool:
    """A boolean cfg field; null means the default (a string "false" must not read as true)."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise SAEFormatError(where, f"{key} {short(v)} is not true or false")
    return v


def _norm_scaling_factor(root: Path, cfg: dict[str, Any], given: float | None) -> float | None:
    """The expected_average_only_in factor and, for a bad one, an error naming where it came
    from: the ``norm_scaling_factor=`` argument, activation_scaler.json, or cfg.json."""
    if given is not None:
        return positive_factor(given, root, "norm_scaling_factor= argument:")
    scaler = root / SAELENS_SCALER
    if scaler.exists():
        value = read_json(scaler, "activation scaler file").get("scaling_factor")
        if value is not None:  # SAELens writes null before the factor is estimated
            return positive_factor(value, scaler, "scaling_factor")
    if cfg.get("norm_scaling_factor") is not None:
        return positive_factor(cfg["norm_scaling_factor"], root / SAELENS_CFG, "norm_scaling_factor")
    return None


def _fold_scalar_scaling(t: dict[str, torch.Tensor], s: float) -> None:
    """Fold SAELens's expected_average_only_in (input · s) into the weights, like
    ``SAE.fold_activation_norm_scaling_factor``: W_enc·s, W_dec/s, b_dec/s."""
    t["W_enc"] = t["W_enc"] * s
    t["W_dec"] = t["W_dec"] / s
    t["b_dec"] = t["b_dec"] / s


def load_saelens(root: Path, *, norm_scaling_factor: float | None) -> dict[str, Any]:
    cfg_path, w_path = root / SAELENS_CFG, root / SAELENS_WEIGHTS
    cfg = read_json(cfg_path)
    if _saelens_major(cfg) < 6:
        cfg = upgrade_saelens_config(cfg)
    arch = cfg.get("architecture", "standard")
    if not isinstance(arch, str) or (arch not in ARCHITECTURES and arch != "batchtopk"):
        raise SAEFormatError(
            cfg_path, f"unknown SAE architecture {short(arch)} (supported: {', '.join(ARCHITECTURES)}, batchtopk)"
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm == "covariance_whitening":
        raise SAEFormatError(cfg_path, "covariance_whitening not folded into the weights; fold it before serving")
    if norm not in (*NORMALISATIONS, "expected_average_only_in"):
        raise SAEFormatError(cfg_path, f"unknown normalize_activations {short(norm)}")
    reshape = cfg.get("reshape_activations") or "none"
    if reshape not in ("none", "hook_z"):
        raise SAEFormatError(cfg_path, f"unknown reshape_activations {short(reshape)}")
    apply_b_dec = _flag(cfg, "apply_b_dec_to_input", True, cfg_path)
    d_in = config_int(cfg["d_in"], cfg_path, "d_in") if cfg.get("d_in") is not None else None
    d_sae = config_int(cfg["d_sae"], cfg_path, "d_sae") if cfg.get("d_sae") is not None else None
    options: dict[str, Any] = {}
    if arch == "topk":
        if cfg.get("k") is None:
            raise SAEFormatError(cfg_path, "topk SAE without k")
        options["k"] = config_int(cfg["k"], cfg_path, "k")
        options["rescale_acts_by_decoder_norm"] = _flag(cfg, "rescale_acts_by_decoder_norm", False, cfg_path)
    metadata = dict(cfg["metadata"]) if isinstance(cfg.get("metadata"), dict) else {}
    factor = _norm_scaling_factor(root, cfg, norm_scaling_factor) if norm == "expected_average_only_in" else None

    t = read_safetensors(w_path)
    if "log_threshold" in t and "threshold" not in t:  # older JumpReLU training checkpoints
        t["threshold"] = t.pop("log_threshold").float().exp()
    for key in ("scaling_factor", "finetuning_scaling_factor"):  # pre-6 fine-tuning scale on acts
        if key in t:
            s = t.pop(key).float()
            if not torch.allclose(s, torch.ones_like(s)) and "W_dec" in t:
                t["W_dec"] = t["W_dec"].float() * s.reshape(-1, 1)  # (f·s)·W_dec == f·(s⊙W_dec)
    if norm == "expected_average_only_in":
        if factor is not None:  # folded first, as SAELens's trainer does before saving
            if any(n not in t for n in ("W_enc", "W_dec", "b_dec")):
                raise SAEFormatError(w_path, "missing W_enc/W_dec/b_dec")
            _fold_scalar_scaling(t, factor)
        metadata["folded_norm_scaling_factor"] = factor  # None: taken as already folded, as load_from_disk does
        norm = "none"
    if arch == "batchtopk":  # a BatchTopK training checkpoint serves as JumpReLU
        arch = "jumprelu"
        if "topk_threshold" not in t:
            raise SAEFormatError(w_path, "missing tensor topk_threshold for a batchtopk SAE")
        thr = t.pop("topk_threshold").double()
        rescale = _flag(cfg, "rescale_acts_by_decoder_norm", True, cfg_path)
        if rescale and factor is not None:
            # BatchTopKTrainingSAE.fold_activation_norm_scaling_factor: the threshold is in units
            # of hidden_pre·‖W_dec‖, and the fold just divided W_dec by the factor.
            thr = thr / factor
        if rescale and "W_dec" in t and "W_enc" in t and "b_enc" in t:
            n = t["W_dec"].float().norm(dim=-1).clamp(min=1e-8)
            t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
        t["threshold"] = thr.float().reshape(1)
    return {
        "path": w_path,
        "architecture": arch,
        "tensors": t,
        "metadata": metadata,
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": apply_b_dec,
        "normalize": norm,
        "hook_z": reshape == "hook_z",
        **options,
    }
