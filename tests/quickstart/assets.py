"""The quick start's "your own" files, made the way a user would: a small model (trained here), two
SAEs written by sae-lens itself (a standard one whose feature 5 reads "dog", a TopK one whose
feature 5 is the direction the quick start's policy adds) and a probe written by `save_probes`.

Feature 5 of the standard SAE and the probe read the linear discriminant of "dog" tokens against
every other token in the layer-1 residual stream (HF ``hidden_states[2]``), scaled so the doc's
thresholds sit in the middle of the gap between the two classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tests.quickstart.story_model import build_story_model, corpus

LAYER = 1
FEATURE = 5  # the feature index the quick start's rules use
TOPK_ROW_NORM = 1.89  # the raw decoder-row norm of the report


@dataclass
class Assets:
    root: Path
    model_dir: Path
    model: object  # transformers LlamaForCausalLM (the reference)
    tokenizer: object
    direction: np.ndarray  # unit "dog" direction read by feature 5 / the probe
    add_direction: np.ndarray  # unit decoder direction of the TopK SAE's feature 5

    def layer_acts(self, ids: list[int]) -> torch.Tensor:
        """What `layer: 1` sees for a prompt: HF hidden_states[LAYER + 1], [T, d]."""
        with torch.no_grad():
            return self.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]

    def nll(self, prompt_ids: list[int], generated: list[int]) -> float:
        """Mean negative log-likelihood of ``generated`` after ``prompt_ids`` under the unsteered model."""
        ids = torch.tensor([prompt_ids + generated])
        with torch.no_grad():
            logp = self.model(ids).logits[0, :-1].log_softmax(-1)
        target = ids[0, 1:]
        per_token = -logp[torch.arange(len(target)), target]
        return float(per_token[len(prompt_ids) - 1:].mean())


def build_assets(root: Path) -> Assets:
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from transformers import AutoTokenizer, LlamaForCausalLM

    from monitor.encode import save_probes

    torch.manual_seed(0)
    model_dir = build_story_model(root / "my-model")
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    acts, tokens = [], []
    with torch.no_grad():
        for doc in corpus(60, seed=1):
            ids = tok(doc).input_ids
            acts.append(model(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0].double())
            tokens += tok.convert_ids_to_tokens(ids)
    x, dog = torch.cat(acts), torch.tensor([t == "Ġdog" for t in tokens])
    mu1, mu0 = x[dog].mean(0), x[~dog].mean(0)
    centred = x - torch.where(dog[:, None], mu1, mu0)
    cov = torch.cov(centred.T) + 1e-3 * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(cov, mu1 - mu0)
    w = w / w.norm()
    proj = x @ w
    low, high = float(proj[~dog].max()), float(proj[dog].min())
    assert high > low, f"no linear gap between dog and other tokens ({low} >= {high})"
    mid, half_gap = (low + high) / 2, (high - low) / 2
    d = x.shape[1]
    w32 = w.float()

    # standard SAE: feature 5 = relu(gain (x.w - mid)) >= 2 on every dog token, 0 elsewhere
    gain = 2.0 / half_gap
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=16, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.01)
        sae.b_enc.zero_()
        sae.W_enc[:, FEATURE] = gain * w32
        sae.b_enc[FEATURE] = -gain * mid
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(16, d), dim=1))
        sae.W_dec[FEATURE] = w32
        sae.b_dec.zero_()
    sae.save_model(root / "my-sae")

    # TopK SAE: feature 5's decoder row is a fixed random direction, not a unit vector
    rng = np.random.default_rng(5)
    add = rng.standard_normal(d).astype(np.float32)
    add /= np.linalg.norm(add)
    topk = TopKSAE(TopKSAEConfig(d_in=d, d_sae=16, k=4))
    with torch.no_grad():
        topk.W_dec[FEATURE] = torch.from_numpy(TOPK_ROW_NORM * add)
    topk.save_model(root / "my-topk-sae")

    # probe "dog": logit = gain (x.w - mid) >= 6 on dog tokens, <= -6 elsewhere
    pgain = 6.0 / half_gap
    save_probes(root / "my-probes.safetensors", (pgain * w32)[None], torch.tensor([-pgain * mid]),
                names=["dog"], layer=LAYER)
    return Assets(root, model_dir, model, tok, w32.numpy(), add)
