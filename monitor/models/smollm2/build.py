"""`featurewatch model build smollm2`: the SAE, the probes and a labelled recording for the real model.

Deterministic (greedy answers, seeded SAE training, fixed prompt set):

1. the model's greedy answers to the prompt set (monitor/models/smollm2/prompts.py) with vLLM;
2. ground truth per request and per token from the labelers (labelers.py) over the answers;
3. layer L's residuals over prompt + answer with transformers (residuals.py);
4. an SAE trained unsupervised on the *training* prompts' residuals with the planted demo's
   BatchTopK trainer (monitor/demo/sae_training.py; Matryoshka groups), inputs scaled to a mean norm of
   sqrt(d) during training and the scale folded into the weights, saved as SAELens JumpReLU;
   FVU, L0 and dead features on the held-out prompts, perplexity with the SAE spliced in;
5. a recording (monitor/record's writer, format v1) of every request with its labels in the
   metadata, plus JSONL label files, so the authoring commands run on it;
6. probes trained with the authoring code (monitor/author/train.py, as `featurewatch probes
   train`) on the training split's requests only.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from monitor.models.smollm2 import labelers as L
from monitor.models.smollm2 import prompts as P
from monitor.models.smollm2.residuals import LayerEdit, collect, load_model, nll

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_NAME = "smollm2-135m-instruct"


@dataclass
class Config:
    seed: int = 0
    threads: int = 1  # more threads than free cores make every small op wait at barriers
    layer: int = 15
    max_tokens: int = 96
    d_sae: int = 2048
    k: int = 32
    steps: int = 3000
    batch: int = 512
    lr: float = 2e-3
    groups: str = "32,128"  # Matryoshka prefixes (see monitor/demo/sae_training.py)


def log(msg: str) -> None:
    print(f"[smollm2 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def default_out() -> Path:
    from monitor.models.fetch import cache_root

    return cache_root() / "builds" / "smollm2"


@dataclass
class Request:
    prompt: P.Prompt
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    text: str
    labels: dict[str, bool]
    token_labels: np.ndarray  # [n_generated, concepts] bool

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def request_id(self) -> str:
        i = (P.prompts(self.prompt.kind, self.prompt.split).index(self.prompt))
        return f"smollm2-{self.prompt.split}-{self.prompt.kind}-{i:03d}"


def label_requests(tok, prompts: list[P.Prompt], items: list[dict]) -> list[Request]:
    out = []
    for p, it in zip(prompts, items):
        text, spans = L.token_char_spans(tok, it["output_ids"])
        lab = L.label(text)
        tl = np.stack([np.array(L.token_labels(spans, lab[c][1]), dtype=bool) for c in P.CONCEPTS], axis=1) \
            if spans else np.zeros((0, len(P.CONCEPTS)), bool)
        out.append(Request(p, list(it["prompt_ids"]), list(it["output_ids"]), it["finish_reason"], text,
                           {c: bool(lab[c][0]) for c in P.CONCEPTS}, tl))
    return out


def cached_residuals(model, reqs: list[Request], layer: int, path: Path) -> list[torch.Tensor]:
    """Layer ``layer``'s residuals of every request (prompt + answer), cached by the token ids."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([layer, [r.ids for r in reqs]]).encode()).hexdigest()[:16]
    if path.is_file():
        data = load_file(str(path))
        if bytes(data["key"].tolist()).decode() == key:
            return list(torch.split(data["x"], data["lengths"].tolist()))
    log(f"collecting layer {layer} residuals of {len(reqs)} requests")
    acts = collect(model, [r.ids for r in reqs], layer)
    save_file({"x": torch.cat(acts), "lengths": torch.tensor([len(a) for a in acts]),
               "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(path))
    return acts


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def sae_rows(reqs: list[Request], acts: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """Training rows: every token from the first differing one on, plus the shared prefix once
    (position 0, the attention sink with its outsized norm, left out)."""
    rows = [acts[0][1:prefix]] + [a[prefix:] for a in acts]
    return torch.cat(rows)


def fold_scale(w: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    """Weights trained on ``x * s`` as weights for ``x`` (SAELens's fold_activation_norm_scaling_factor)."""
    return {"W_enc": w["W_enc"] * s, "b_enc": w["b_enc"], "W_dec": w["W_dec"] / s, "b_dec": w["b_dec"] / s,
            "threshold": w["threshold"]}


@torch.no_grad()
def sae_quality(sae, x: torch.Tensor, all_rows: torch.Tensor) -> dict:
    f = sae.encode(x)
    rec = sae.decode(f)
    fvu = float((x - rec).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in range(0, len(all_rows), 4096):
        fired |= (sae.encode(all_rows[i:i + 4096]) > 0).any(0)
    return {"fvu_heldout": fvu, "l0_heldout": float((f > 0).sum(1).float().mean()),
            "dead_features": int((~fired).sum()), "dead_fraction": float((~fired).float().mean())}


def concept_free(tok, reqs: list[Request]) -> list[tuple[list[int], int]]:
    """Perplexity text: held-out neutral prompts with the model's answers (answers scored), and
    plain passages (all tokens after the first scored)."""
    seqs = [(r.ids, len(r.prompt_ids)) for r in reqs
            if r.prompt.split == "heldout" and r.prompt.kind == "neutral" and not any(r.labels.values())
            and r.output_ids]
    seqs += [(tok(t, add_special_tokens=False)["input_ids"], 1) for t in P.PLAIN_TEXT]
    return seqs


def spliced_perplexity(model, sae, layer: int, seqs) -> dict:
    clean, n = nll(model, seqs)
    with LayerEdit(model, layer, edit=lambda x, _p: sae.decode(sae.encode(x))):
        spliced, _ = nll(model, seqs)
    return {"tokens": n, "clean": math.exp(clean / n), "sae_spliced": math.exp(spliced / n)}


def write_recording(root: Path, reqs: list[Request], acts: list[torch.Tensor], layer: int, d_model: int) -> None:
    import shutil

    from monitor.record.format import Manifest
    from monitor.record.writer import RecordingDir, ShardBuilder, request_row

    if root.exists():
        shutil.rmtree(root)
    rd = RecordingDir(root).open()
    try:
        rd.ensure_manifest(Manifest(model_name=MODEL_NAME, d_model=d_model, layers=[layer], dtype="float32",
                                    created_unix_s=0.0))
        for split in P.SPLITS:
            b = ShardBuilder([layer])
            for r, a in zip(reqs, acts):
                if r.prompt.split != split:
                    continue
                n, n_p = len(r.ids), len(r.prompt_ids)
                spans = {c: _runs(n_p + np.flatnonzero(r.token_labels[:, j])) for j, c in enumerate(P.CONCEPTS)}
                meta = {"split": split, "kind": r.prompt.kind, "template": r.prompt.template,
                        "topic": r.prompt.topic, "labels": r.labels, "label_positions": spans}
                row = request_row(r.request_id, api_request_id=r.request_id, metadata=meta, prompt_tokens=n_p,
                                  generated_tokens=len(r.output_ids), finish_reason=r.finish_reason)
                gen = np.zeros(n, bool)
                gen[n_p:] = True
                b.add(row, a[None], np.arange(n, dtype=np.int64), np.array(r.ids, dtype=np.int64), gen)
            rd.write(b, fsync=False)
    finally:
        rd.close()
    for split in P.SPLITS:  # label files for `--labels` (one line per request of the split)
        with open(root.parent / f"labels-{split}.jsonl", "w") as f:
            for r in reqs:
                if r.prompt.split == split:
                    f.write(json.dumps({"api_request_id": r.request_id,
                                        "label": [c for c in P.CONCEPTS if r.labels[c]]}) + "\n")


def _runs(positions: np.ndarray) -> list[list[int]]:
    """Sorted positions as [start, end) runs."""
    out: list[list[int]] = []
    for p in positions.tolist():
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def train_probes(reqs: list[Request], acts: list[torch.Tensor], layer: int, out: Path, seed: int) -> list[dict]:
    """The authoring command's probe training (per request, 30 % of the training split held out
    inside it for the threshold) on the training split only."""
    from monitor.author import train as T

    examples = [T.Example(r.request_id, a[len(r.prompt_ids):], r.token_labels,
                          np.array([r.labels[c] for c in P.CONCEPTS]))
                for r, a in zip(reqs, acts) if r.prompt.split == "train" and r.output_ids]
    reports = T.train(examples, list(P.CONCEPTS), layer, out, per="request", fpr=0.01, holdout=0.3, seed=seed)
    return T.as_json(reports)


def build(out: Path, cfg: Config, assets: Path = ASSETS) -> dict:
    from monitor.demo.build_config import BuildConfig, set_threads
    from monitor.demo.sae_training import save_sae, train_batchtopk_sae
    from monitor.encode import load_sae
    from monitor.models.fetch import fetch

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    folder = str(fetch("smollm2"))
    out.mkdir(parents=True, exist_ok=True)
    _, tok = load_model(folder)
    prompts = P.all_prompts("train") + P.all_prompts("heldout")
    log(f"generating {len(prompts)} greedy answers (<= {cfg.max_tokens} tokens) with vLLM")
    # vLLM in its own process: it pins this process's threads otherwise
    cache = out / "generations.json"
    subprocess.run([sys.executable, "-m", "monitor.models.smollm2.generate", str(cache), str(cfg.max_tokens)],
                   check=True)
    items = json.loads(cache.read_text())["items"]
    assert len(items) == len(prompts), cache
    set_threads(cfg.threads)
    model, tok = load_model(folder)
    reqs = label_requests(tok, prompts, items)
    counts = {s: {c: sum(r.labels[c] for r in reqs if r.prompt.split == s) for c in P.CONCEPTS} for s in P.SPLITS}
    log(f"labels (positive requests): {counts}")
    acts = cached_residuals(model, reqs, cfg.layer, out / f"residuals_l{cfg.layer}.safetensors")
    prefix = common_prefix([r.prompt_ids for r in reqs])
    train_idx = [i for i, r in enumerate(reqs) if r.prompt.split == "train"]
    held_idx = [i for i, r in enumerate(reqs) if r.prompt.split == "heldout"]
    x_train = sae_rows([reqs[i] for i in train_idx], [acts[i] for i in train_idx], prefix)
    x_held = torch.cat([acts[i][prefix:] for i in held_idx])
    norms = x_train.norm(dim=1)
    scale = math.sqrt(x_train.shape[1]) / float(norms.mean())
    log(f"SAE rows: train {len(x_train)}, held-out {len(x_held)}; mean norm {float(norms.mean()):.2f} "
        f"(position 0: {float(acts[0][0].norm()):.1f}); scale {scale:.4f}")
    dcfg = BuildConfig(d_sae=cfg.d_sae, sae_k=cfg.k, sae_steps=cfg.steps, sae_batch=cfg.batch, sae_lr=cfg.lr,
                         sae_groups=cfg.groups)
    weights, info = train_batchtopk_sae(x_train * scale, dcfg, cfg.seed)
    weights = fold_scale(weights, scale)
    sae_dir = assets / f"sae_l{cfg.layer}"
    save_sae(weights, sae_dir, cfg.layer, {
        "model_name": MODEL_NAME, "dataset_path": "monitor.models.smollm2.prompts", "prepend_bos": False,
        "context_size": 1024, "sae_lens_training_version": "featurewatch-smollm2",
        "training_tokens": int(len(x_train)), "norm_scaling_factor_folded": scale, **info})
    sae = load_sae(str(sae_dir))
    quality = sae_quality(sae, x_held, torch.cat([x_train, x_held]))
    log(f"SAE: {quality}")
    ppl = spliced_perplexity(model, sae, cfg.layer, concept_free(tok, reqs))
    log(f"perplexity on concept-free held-out text: {ppl}")
    log("writing the recording")
    write_recording(out / "recording", reqs, acts, cfg.layer, x_train.shape[1])
    log("training probes (authoring code, training split only)")
    probe_reports = train_probes(reqs, acts, cfg.layer, assets / f"probes_l{cfg.layer}.safetensors", cfg.seed)
    manifest = {
        "model": MODEL_NAME, "fetch": "featurewatch model fetch smollm2", "layer": cfg.layer,
        "config": asdict(cfg), "prompts": {s: len(P.all_prompts(s)) for s in P.SPLITS},
        "generated_tokens": int(sum(len(r.output_ids) for r in reqs)), "positives": counts,
        "sae": {"path": sae_dir.name, "d_in": int(sae.d_in), "d_sae": int(sae.d_sae),
                "training_rows": int(len(x_train)), "heldout_rows": int(len(x_held)), **quality},
        "perplexity": ppl, "probes": {"path": f"probes_l{cfg.layer}.safetensors", "train_reports": probe_reports},
        "recording": "<--out>/recording (default <cache>/builds/smollm2)", "build_seconds": round(time.time() - t0, 1),
    }
    (assets / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"done in {time.time() - t0:.0f}s -> {assets}")
    return manifest


def main(argv=None) -> None:  # python -m monitor.models.smollm2.build [--out DIR] [--assets DIR] [--steps N]
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="work folder (generations, recording)")
    p.add_argument("--assets", type=Path, default=ASSETS)
    for f, v in asdict(Config()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    a = p.parse_args(argv)
    cfg = Config(**{f: getattr(a, f) for f in asdict(Config())})
    build(a.out or default_out(), cfg, a.assets)


if __name__ == "__main__":
    main()
