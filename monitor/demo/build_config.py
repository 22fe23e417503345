"""The demo build's settings and shared plumbing (seeds, threads, log): one place every build step reads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch



ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_NAME = "featurewatch-demo-llama"

# seeds derived from the build seed: disjoint corpus streams for every purpose
TRAIN_SEED_OFFSET = 0        # LM + SAE + probe training documents
VALID_SEED_OFFSET = 1000     # feature ranking, probe early checks
CALIB_SEED_OFFSET = 2000     # benign calibration (probe thresholds at 1 % FPR)
STEER_SEED_OFFSET = 3000     # build-time eliciting prompts for steering-feature selection
# bench/quality.py uses seed + 10_000 and up: never seen by the build


@dataclass
class BuildConfig:
    seed: int = 0
    threads: int = 2
    layer: int = 2
    vocab_size: int = 1024
    hidden: int = 128
    heads: int = 4
    n_layers: int = 4
    intermediate: int = 384
    max_positions: int = 256
    lm_docs: int = 24000
    lm_steps: int = 800
    lm_batch: int = 32
    lm_lr: float = 3e-3
    lm_aux_weight: float = 0.0  # next-token loss through the final norm + head at layer L too
    # the planted concepts (see plant_directions): per concept a "mention" direction (the token
    # is part of a mention) and a "next" direction (the next token starts one) in layer L's
    # residual, trained to read concept_scale on those tokens and 0 elsewhere; counterfactual
    # rows (concept context, neutral continuation) are trained with the directions ablated
    concept_scale: float = 12.0
    concept_weight: float = 1.0
    counterfactual_docs: int = 8000
    # ablated rows keep a random fraction (up to this) of each projection: the later layers
    # learn to emit a mention only above it, so a clamp that removes most of it is enough
    ablate_keep: float = 0.5
    sae_docs: int = 4000
    d_sae: int = 1024
    sae_k: int = 16
    sae_steps: int = 1500
    sae_batch: int = 4096
    sae_lr: float = 2e-3
    # Matryoshka groups (nested prefixes that must each reconstruct on their own: general
    # features such as "competitor brand" land in the first groups instead of being absorbed
    # into many specific ones); empty = plain BatchTopK
    sae_groups: str = "32,128"
    probe_docs: int = 3000
    valid_docs: int = 1500
    calib_docs: int = 1500
    fpr: float = 0.01
    steer_prompts: int = 64
    steer_max_features: int = 8
    steer_candidates: int = 24   # by lift at the end of eliciting prompts (+ 4 top detectors)
    steer_pool: int = 10         # candidates kept after the first greedy round
    steer_tokens: int = 16
    steer_ppl_guard: float = 0.01
    lm_aux_layer: int = -1       # layer of the deep-supervision loss (-1: the SAE layer)
    tie_embeddings: bool = False
    steer_target: float = 0.98  # stop adding features once emission drops by this fraction
    from_model: str | None = None  # development: reuse a built model/tokenizer, redo the rest


def log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


