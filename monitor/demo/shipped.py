"""Loading the shipped demo assets and per-token datasets for measuring them (bench/quality.py, tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from monitor.demo.corpus_labels import Example, token_labels
from monitor.demo.corpus_templates import CONCEPTS
from monitor.demo.build_config import ASSETS
from monitor.demo.tokenizer import encode_docs
from monitor.demo.lm import collect_residuals
from monitor.demo.sae_training import load_demo_sae
from monitor.demo.scoring import load_demo_probes


def load_assets(root: str | Path = ASSETS):
    """(model, tokenizer.Tokenizer, sae, probes, manifest) from an assets directory."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    model = LlamaForCausalLM.from_pretrained(str(root / manifest["model"]["path"]),
                                             dtype=torch.float32)
    model.eval()
    tok = Tokenizer.from_file(str(root / manifest["model"]["path"] / "tokenizer.json"))
    sae = load_demo_sae(root / manifest["sae"]["path"])
    probes = load_demo_probes(root / manifest["probes"]["path"])
    return model, tok, sae, probes, manifest


def token_dataset(tok, model, docs: Sequence[Example], layer: int):
    """Residuals [N, d] of every token of ``docs`` plus per-concept token labels and doc index."""
    enc = encode_docs(tok, docs)
    res = collect_residuals(model, [e[0] for e in enc], layer)
    x = torch.cat(res)
    labels = {c: np.concatenate([token_labels(d, e[1], c) for d, e in zip(docs, enc)])
              for c in CONCEPTS}
    doc_idx = np.concatenate([np.full(len(e[0]), i) for i, e in enumerate(enc)])
    return x, labels, doc_idx


def doc_max(scores: np.ndarray, doc_idx: np.ndarray, n_docs: int) -> np.ndarray:
    out = np.full(n_docs, -np.inf)
    np.maximum.at(out, doc_idx, scores)
    return out


