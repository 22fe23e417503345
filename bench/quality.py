"""Quality of the embedded demo (monitor/demo/assets) on held-out text.

    python bench/quality.py [--assets DIR] [--seed N] [--docs N] [--prompts N] [--json PATH]

Per planted concept (competitor, pii), on corpus documents and prompts the build never saw
(corpus seeds from the manifest's ``quality_bench_from`` on):

- detection: AUROC of the manifest's best SAE feature (chosen by the build on its own validation
  text) and of the concept probe, per token (a token inside a mention vs every other token) and
  per document (max over the document's tokens vs the document's label: rules alert once per
  request); the probe's TPR and FPR at its shipped threshold (set by the build at 1 % FPR on
  benign calibration documents, per document), measured on held-out documents and tokens;
- suppression steering with HF transformers: a forward hook on the SAE's layer applies the SAE
  clamp ``x' = x + (0 - f_i(x)) W_dec[i]`` (``monitor.encode`` ``SAE.clamp``, error term kept) for
  the manifest's steering features at every position; concept emission rate in sampled
  generations (temperature 1) from concept-eliciting prompts with and without the clamp, and
  perplexity on concept-free documents with and without it.

Goals: AUROC >= 0.99, emission reduction >= 95 %, perplexity rise <= 5 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from monitor.demo.build_config import ASSETS, set_threads  # noqa: E402
from monitor.demo.generation import ClampHook, emission_rate, perplexity, sample  # noqa: E402
from monitor.demo.scoring import auroc, auroc_columns  # noqa: E402
from monitor.demo.shipped import doc_max, load_assets, token_dataset  # noqa: E402
from monitor.demo.tokenizer import encode_docs  # noqa: E402
from monitor.demo import corpus as C  # noqa: E402
from monitor.demo.corpus_labels import find_mentions  # noqa: E402
from monitor.demo.corpus_templates import CONCEPTS  # noqa: E402

GOALS = {"auroc": 0.99, "reduction": 0.95, "ppl_rise": 0.05}


def _probe_scores(probes, x: torch.Tensor) -> torch.Tensor:
    return probes.score(x).float()


def evaluate(assets: Path, seed: int, n_docs: int, n_prompts: int, max_new_tokens: int) -> dict:
    model, tok, sae, probes, man = load_assets(assets)
    layer = man["layer"]
    base_seed = man["seeds"]["quality_bench_from"] + seed
    t0 = time.time()

    docs = C.generate(n_docs, base_seed)
    x, y, doc_idx = token_dataset(tok, model, docs, layer)
    benign = C.concept_free(n_docs // 2, base_seed + 1)
    xb, _, db = token_dataset(tok, model, benign, layer)
    f_all = sae.encode(x)
    ps = _probe_scores(probes, x).numpy()
    pb = _probe_scores(probes, xb).numpy()
    thresholds = probes.threshold.numpy() if probes.threshold is not None else None

    ppl_docs = [e[0] for e in encode_docs(tok, C.concept_free(min(400, n_docs), base_seed + 2))]
    ppl_base = perplexity(model, ppl_docs)

    out: dict = {"assets": str(assets), "seed": seed, "corpus_seed": base_seed, "layer": layer,
                 "docs": n_docs, "tokens": int(x.shape[0]), "prompts": n_prompts,
                 "max_new_tokens": max_new_tokens, "ppl_base": ppl_base, "concepts": {}}
    for ci, c in enumerate(CONCEPTS):
        info = man["concepts"][c]
        feat = int(info["best_feature"])
        doc_labels = np.array([d.labels[c] for d in docs])
        fs = f_all[:, feat].numpy()
        pi = probes.names.index(info["probe"])
        thr = float(thresholds[pi]) if thresholds is not None else 0.5
        r = {
            "feature": feat,
            "feature_token_auroc": auroc(fs, y[c]),
            "feature_doc_auroc": auroc(doc_max(fs, doc_idx, len(docs)), doc_labels),
            "probe": info["probe"],
            "probe_token_auroc": auroc(ps[:, pi], y[c]),
            "probe_doc_auroc": auroc(doc_max(ps[:, pi], doc_idx, len(docs)), doc_labels),
            "probe_threshold": thr,
            "probe_token_tpr": float((ps[y[c], pi] >= thr).mean()),
            "probe_token_fpr_benign": float((pb[:, pi] >= thr).mean()),
            "probe_doc_tpr": float((doc_max(ps[:, pi], doc_idx, len(docs))[doc_labels]
                                    >= thr).mean()),
            "probe_doc_fpr_benign": float((doc_max(pb[:, pi], db, len(benign)) >= thr).mean()),
            "positive_tokens": int(y[c].sum()),
            "positive_docs": int(doc_labels.sum()),
        }
        # the best single feature on this held-out set (an upper bound, not the shipped choice)
        a = np.nan_to_num(auroc_columns(f_all, y[c]), nan=0.5)
        r["oracle_feature"], r["oracle_feature_token_auroc"] = int(a.argmax()), float(a.max())

        steer = [int(i) for i in info["steer_features"]]
        prompts = [p.text for p in C.eliciting_prompts(c, n_prompts, base_seed + 3 + ci)]
        gen_seed = base_seed + 100 + ci
        g0 = sample(model, tok, prompts, max_new_tokens, gen_seed)
        hook = ClampHook(model, layer, sae, steer)
        try:
            g1 = sample(model, tok, prompts, max_new_tokens, gen_seed)
            ppl_clamped = perplexity(model, ppl_docs)
        finally:
            hook.remove()
        e0, e1 = emission_rate(g0, c), emission_rate(g1, c)
        r.update({
            "steer_features": steer,
            "emission_base": e0, "emission_clamped": e1,
            "emission_reduction": (1 - e1 / e0) if e0 > 0 else float("nan"),
            "strict_emission_base": float(np.mean([bool(find_mentions(g, c, strict=True))
                                                   for g in g0])),
            "strict_emission_clamped": float(np.mean([bool(find_mentions(g, c, strict=True))
                                                      for g in g1])),
            "ppl_clamped": ppl_clamped, "ppl_rise": ppl_clamped / ppl_base - 1,
            "examples": [{"prompt": p[-80:], "base": a_, "clamped": b_}
                         for p, a_, b_ in list(zip(prompts, g0, g1))[:3]],
        })
        out["concepts"][c] = r
    out["seconds"] = time.time() - t0
    return out


def _ok(v: float, goal: float, higher: bool = True) -> str:
    return "met" if (v >= goal if higher else v <= goal) else "**not met**"


def table_rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for c, r in res["concepts"].items():
        g = GOALS
        rows += [
            (c, f"SAE feature {r['feature']}: AUROC per token", f"{r['feature_token_auroc']:.4f}",
             f">= {g['auroc']}", _ok(r["feature_token_auroc"], g["auroc"])),
            (c, f"SAE feature {r['feature']}: AUROC per document (max)",
             f"{r['feature_doc_auroc']:.4f}", f">= {g['auroc']}",
             _ok(r["feature_doc_auroc"], g["auroc"])),
            (c, "probe: AUROC per token", f"{r['probe_token_auroc']:.4f}", f">= {g['auroc']}",
             _ok(r["probe_token_auroc"], g["auroc"])),
            (c, "probe: AUROC per document (max)", f"{r['probe_doc_auroc']:.4f}",
             f">= {g['auroc']}", _ok(r["probe_doc_auroc"], g["auroc"])),
            (c, f"probe at threshold {r['probe_threshold']:.3g}: TPR / FPR per document",
             f"{r['probe_doc_tpr']:.3f} / {r['probe_doc_fpr_benign']:.4f}", "FPR ~0.01", ""),
            (c, "probe at threshold: TPR / FPR per token",
             f"{r['probe_token_tpr']:.3f} / {r['probe_token_fpr_benign']:.4f}", "", ""),
            (c, f"emission rate without / with clamp {r['steer_features']}",
             f"{r['emission_base']:.3f} / {r['emission_clamped']:.3f}", "", ""),
            (c, "emission reduction", f"{100 * r['emission_reduction']:.1f} %",
             f">= {100 * g['reduction']:.0f} %", _ok(r["emission_reduction"], g["reduction"])),
            (c, "perplexity on concept-free text without / with clamp",
             f"{res['ppl_base']:.4f} / {r['ppl_clamped']:.4f}", "", ""),
            (c, "perplexity rise", f"{100 * r['ppl_rise']:+.2f} %",
             f"<= {100 * g['ppl_rise']:.0f} %", _ok(r["ppl_rise"], g["ppl_rise"], higher=False)),
            (c, f"(info) best feature on this held-out text: {r['oracle_feature']}, AUROC per "
                "token", f"{r['oracle_feature_token_auroc']:.4f}", "", ""),
        ]
    return rows


def print_table(res: dict, command: str) -> None:
    """A Markdown table (pasted as is into docs/benchmarks.md)."""
    rows = table_rows(res)
    head = ("concept", "measure", "value", "goal", "")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(f"Held out: {res['docs']} documents / {res['tokens']} tokens (corpus seed "
          f"{res['corpus_seed']}), {res['prompts']} eliciting prompts per concept x "
          f"{res['max_new_tokens']} sampled tokens (temperature 1); {res['seconds']:.0f} s.")
    print(f"Command: `{command}`")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=ASSETS)
    p.add_argument("--seed", type=int, default=0, help="offset of the held-out corpus seeds")
    p.add_argument("--docs", type=int, default=1500)
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--model", choices=("demo", "smollm2"), default="demo",
                   help="smollm2: the real model's SAE and probes on its held-out prompts (issue 13)")
    p.add_argument("--recording", type=Path, default=None,
                   help="smollm2: the build's labelled recording (default <cache>/builds/smollm2/recording)")
    p.add_argument("--steer", type=int, default=0, metavar="N",
                   help="smollm2: also measure suppression by clamping each concept's N best training-split features")
    p.add_argument("--steer-direction", type=float, nargs="*", default=None, metavar="ALPHA",
                   help="smollm2: also steer along each probe's direction, the step (x median residual norm) "
                        "chosen among ALPHA on training prompts")
    p.add_argument("--rules-only", action="store_true",
                   help="smollm2: only the rules loop (each concept's probe and feature rule calibrated on the training "
                        "split, backtested on the held-out split)")
    p.add_argument("--rules-workdir", type=Path, default=None,
                   help="smollm2: where the loop writes its rules and sidecar config (default <recording>/../rules-loop)")
    a = p.parse_args(argv)
    if a.model == "smollm2":
        return smollm2(a, argv)
    set_threads(a.threads)
    res = evaluate(a.assets, a.seed, a.docs, a.prompts, a.max_new_tokens)
    command = "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print_table(res, command.strip())
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def smollm2(a, argv) -> int:
    """Per concept, held-out prompts, per request: probe AUROC and TPR at 1 % FPR, the best SAE
    feature chosen on the training split and its gap (monitor/models/smollm2/quality.py)."""
    import torch

    from monitor.models.smollm2 import build as SB
    from monitor.models.smollm2 import quality as Q
    from monitor.models.smollm2 import rules_loop as RL

    torch.set_num_threads(a.threads)
    assets = a.assets if a.assets != ASSETS else SB.ASSETS
    recording = a.recording or SB.default_out() / "recording"
    command = "Command: `python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`"
    if a.rules_only:  # the authoring loop's calibrate + backtest only (rules_loop.py)
        loop = RL.bench(assets, recording, a.rules_workdir)
        print(command)
        return RL.write_json(a.json, {"rules_loop": loop})
    res = Q.evaluate(assets, recording)
    print(Q.table(res))
    print()
    res["rules_loop"] = RL.bench(assets, recording, a.rules_workdir)
    if a.steer:
        res["steering"] = Q.steering(assets, recording, res, a.steer, a.max_new_tokens)
        print()
        print(Q.steering_table(res["steering"]))
        for r in res["steering"]:
            for smp in r["samples"][:1]:
                print(f"\n[{r['concept']}] {smp['prompt']}\n  before: {smp['before'][:160]!r}\n  after:  {smp['after'][:160]!r}")
    if a.steer_direction:
        res["direction_steering"] = Q.direction_steering(assets, recording, res, a.steer_direction, a.max_new_tokens)
        print()
        print(Q.direction_table(res["direction_steering"]))
    print(command)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
