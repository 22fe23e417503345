"""Small SAE and probe files with a planted feature, written in the real on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PLANTED_FEATURE = 3


def planted_direction(d_model: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d_model).astype(np.float32)
    return u / np.linalg.norm(u)


def write_saelens_jumprelu(path: Path, d_model: int = 64, d_sae: int = 32, seed: int = 0) -> Path:
    """A SAELens v6 JumpReLU SAE whose feature PLANTED_FEATURE reads `planted_direction`:
    pre = x.u - 1, threshold 0.5, so x = 10u gives f = 9 and noise of std 0.05 gives 0."""
    rng = np.random.default_rng(seed + 1)
    u = planted_direction(d_model, seed)
    w_enc = (rng.standard_normal((d_model, d_sae)) * 0.01).astype(np.float32)
    w_enc[:, PLANTED_FEATURE] = u
    w_dec = (rng.standard_normal((d_sae, d_model)) * 0.1).astype(np.float32)
    w_dec[PLANTED_FEATURE] = u
    path.mkdir(parents=True, exist_ok=True)
    save_file({
        "W_enc": w_enc, "W_dec": w_dec, "b_enc": np.full(d_sae, -1.0, np.float32),
        "b_dec": np.zeros(d_model, np.float32), "threshold": np.full(d_sae, 0.5, np.float32),
    }, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": d_model, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": "blocks.1.hook_resid_post"},
    }))
    return path


def write_probe_bank(path: Path, d_model: int = 64, seed: int = 0) -> Path:
    """Two probes: `planted` reads the planted direction (p > 0.99 at x = 10u), `other` is random."""
    rng = np.random.default_rng(seed + 2)
    u = planted_direction(d_model, seed)
    other = rng.standard_normal(d_model).astype(np.float32) * 0.01
    save_file({
        "weight": np.stack([u, other]).astype(np.float32), "bias": np.array([-5.0, -5.0], np.float32),
    }, str(path), metadata={"names": json.dumps(["planted", "other"]), "layer": "1"})
    return path


def planted_rules(probe_rule_extra: str = "") -> str:
    """The rules most sidecar tests run: an alert + clamp rule on the planted feature (generated
    tokens), a rule on the planted probe, and an always-on clamp policy for tenant b.
    ``probe_rule_extra``: YAML lines (indented 4 spaces) added to the probe rule."""
    return f"""
rules:
  - name: planted_feature
    signal: {{source: sae, feature: {PLANTED_FEATURE}}}
    above: 2.0
    scope: generated
    severity: critical
    labels: {{owner: trust-safety}}
    actions:
      - alert: {{}}
      - steer: {{clamp: {{source: sae, feature: {PLANTED_FEATURE}, value: 0}}}}
  - name: planted_probe
    signal: {{source: probes, probe: planted}}
    above: 0.9
{probe_rule_extra}    severity: warning
policies:
  - name: tenant_b_suppress
    selector: {{tenant: b}}
    steer: [{{clamp: {{source: sae, feature: {PLANTED_FEATURE}, value: 0}}}}]
"""
