"""The authoring loop's last two steps on the real model: rules calibrated on the training split,
backtested on the held-out split (what `featurewatch rules calibrate` / `rules backtest` run).

Per concept, two rules a user would write after `features compare` and `probes train`, both per
request on the generated tokens (``window: token``):

- ``<concept>_probe``: the shipped probe (demo.py's served rule, its threshold the bank's);
- ``<concept>_feature``: the SAE feature that `features compare` ranks first on the *training*
  split (positive: the training requests labelled with the concept; negative: the other training
  requests), starting from the compare's ``above@fpr``.

Splits come from the build's label files (``labels-train.jsonl``, ``labels-heldout.jsonl``: every
request of a split, with its concepts): each concept's rules are calibrated with
``monitor.author.calibrate.calibrate`` on the training requests without that concept as the benign
set, and only the training requests are read (the set language has no intersection, so "training
split and not the concept" cannot be written as one ``--benign`` set for the CLI on a recording
that holds both splits). The calibrated file is then replayed by ``monitor.author.backtest`` over
the held-out requests only and scored against the held-out labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from monitor.models.smollm2 import prompts as P
from monitor.models.smollm2.demo import PROBE_SOURCE, SAE_SOURCE, smollm2_rules


def sidecar_config(assets: Path, manifest: dict) -> dict:
    """The sources the rules run under: the shipped SAE and probe bank, named as the served demo names them."""
    layer = manifest["layer"]
    return {"model_name": "smollm2-135m-instruct", "store": {"kind": "memory"},
            "sources": [{"name": SAE_SOURCE, "kind": "sae", "layer": layer, "path": str(assets / manifest["sae"]["path"])},
                        {"name": PROBE_SOURCE, "kind": "probes", "layer": layer,
                         "path": str(assets / manifest["probes"]["path"])}]}


def split_ids(catalog, labels_path: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(every request the label file names, ``concept -> its positive requests``)."""
    from monitor.author.sets import labelled

    names = labelled(catalog, labels_path)
    return set(names), {c: {rid for rid, got in names.items() if c in got} for c in P.CONCEPTS}


def loop_rules(probe_thresholds: dict[str, float], features: dict[str, tuple[int, float]]) -> str:
    """The rules file before calibration: the served probe rule and one feature rule for each concept
    of ``features`` (``concept -> (feature, starting above)``)."""
    doc = yaml.safe_load(smollm2_rules({c: probe_thresholds.get(c, 0.5) for c in P.CONCEPTS}, suppress=False))
    doc["rules"] = [r for r in doc["rules"] if r["labels"]["concept"] in features]
    for concept, (feature, above) in features.items():
        doc["rules"].append({"name": f"{concept}_feature",
                             "description": f"SAE feature #{feature}, ranked first for {concept} on the training split",
                             "signal": {"source": SAE_SOURCE, "feature": int(feature)}, "above": float(above),
                             "scope": "generated", "severity": "warning", "labels": {"concept": concept},
                             "actions": [{"alert": {}}]})
    doc.pop("policies", None)
    return yaml.safe_dump(doc, sort_keys=False)


def best_features(sae, recording, layer: int, train: set[str], positives: dict[str, set[str]],
                  fpr: float) -> dict[str, object]:
    """``concept -> FeatureScore`` of the feature `features compare` ranks first, training split only."""
    from monitor.author.compare import rank, request_maxima

    ids, maxima = request_maxima(sae, recording.iter_requests(layers=[layer]), layer, "generated", train)
    out = {}
    for c in P.CONCEPTS:
        pos = np.array([i in positives[c] for i in ids], dtype=bool)
        if pos.any() and (~pos).any():
            out[c] = rank(maxima[pos], maxima[~pos], top=1, fpr=fpr)[0]
    return out


def run(assets: Path, recording_path: Path, train_labels: Path, heldout_labels: Path, workdir: Path,
        fpr: float = 0.01) -> dict:
    """Write the rules and config under ``workdir``, calibrate on the training split, backtest on
    the held-out split; ``rules.yaml`` there ends up calibrated."""
    from monitor.author import replay as rp
    from monitor.author.calibrate import calibrate
    from monitor.author.sets import Catalog
    from monitor.encode import load_probes, load_sae
    from monitor.record import Recording

    manifest = json.loads((assets / "manifest.json").read_text())
    layer = manifest["layer"]
    rec = Recording.open(recording_path)
    catalog = Catalog.of(rec.iter_requests(layers=[]), str(recording_path))
    train, train_pos = split_ids(catalog, train_labels)
    heldout, _ = split_ids(catalog, heldout_labels)
    if train & heldout:
        raise ValueError(f"{train_labels} and {heldout_labels} share {len(train & heldout)} request(s): "
                         f"the rules would be calibrated on requests they are scored on")
    bank = load_probes(str(assets / manifest["probes"]["path"]))
    shipped = {c: float(bank.threshold[bank.index(c)]) if bank.threshold is not None else 0.5 for c in P.CONCEPTS}
    best = best_features(load_sae(str(assets / manifest["sae"]["path"])), rec, layer, train, train_pos, fpr)
    concepts = [c for c in P.CONCEPTS if c in best]
    workdir.mkdir(parents=True, exist_ok=True)
    config, rules_path = workdir / "featurewatch.yaml", workdir / "rules.yaml"
    config.write_text(yaml.safe_dump(sidecar_config(assets, manifest), sort_keys=False))
    rules_path.write_text(loop_rules({c: shipped[c] for c in concepts},
                                     {c: (best[c].feature, best[c].above_at_fpr) for c in concepts}))
    setup = rp.load_setup(rules_path, config)
    train_order = [i for i in catalog.ids if i in train]

    def train_requests():
        return (r for r in rec.iter_requests(layers=setup.rules.layers) if r.request_id in train)

    start = held_out_scores(setup.rules, rec, heldout, heldout_labels, recording_path)  # the rules as first written
    calibrated = {}
    for c in concepts:
        report, text = calibrate(setup, train_requests, train - train_pos[c], fpr, f"{recording_path} (training split)",
                                 only=[f"{c}_probe", f"{c}_feature"], ids=train_order)
        calibrated.update({r.rule: r for r in report})
        rules_path.write_text(text)  # as `rules calibrate --write`
        setup = rp.load_setup(rules_path, config)
    after = held_out_scores(setup.rules, rec, heldout, heldout_labels, recording_path)
    rows = []
    for rule in setup.rules.rules:
        cal, s, s0 = calibrated[rule.name], after[rule.name], start[rule.name]
        concept = rule.labels["concept"]
        rows.append({"rule": rule.name, "concept": concept,
                     "signal": f"probe {concept}" if rule.name.endswith("_probe") else f"feature #{best[concept].feature}",
                     "above_before": cal.old_above, "above": cal.above, "train_benign": cal.benign,
                     "train_benign_fired": cal.benign_fired, "train_allowed": cal.allowed,
                     "train_positive": cal.other, "train_positive_fired": cal.other_fired,
                     "heldout_fired": s["fired"], "heldout_positive": s["positive"], "heldout_negative": s["negative"],
                     **{k: s[k] for k in ("tp", "fp", "fn", "precision", "recall", "fpr")},
                     "start": {k: s0[k] for k in ("fired", "tp", "fp", "fn", "precision", "recall", "fpr")}})
    return {"fpr_target": fpr, "layer": layer, "rules_file": str(rules_path), "config": str(config),
            "requests": {"train": len(train), "heldout": len(heldout), "replayed": min(r["replayed"] for r in after.values())},
            "features": {c: {"feature": best[c].feature, "train_auroc": best[c].auroc} for c in concepts},
            "skipped": [c for c in P.CONCEPTS if c not in best], "rows": rows}


def held_out_scores(rules, rec, heldout: set[str], labels: Path, recording_path) -> dict[str, dict]:
    """``rule -> backtest row`` over the held-out requests only, with its FPR among the requests
    labelled without the rule's concept."""
    from monitor.author.backtest import backtest, summarise, truth_for_rules

    result = backtest(rules, (r for r in rec.iter_requests(layers=rules.layers) if r.request_id in heldout),
                      source=f"{recording_path} (held-out split)")
    truth = truth_for_rules(rules, result.catalog, labels)
    out = {}
    for s in summarise(rules, result, truth):
        positive, universe = truth[s["rule"]]
        negative = len(universe) - len(positive)
        out[s["rule"]] = {**s, "positive": len(positive), "negative": negative, "replayed": result.n_requests,
                          "fpr": s["fp"] / negative if negative else float("nan")}
    return out


def table(res: dict) -> str:
    def pct(v: float) -> str:
        return "–" if v != v else f"{v:.1%}"

    lines = [f"| rule | signal | above: start → calibrated | training benign fired (allowed) | training positive fired "
             f"| held-out fired | precision | recall | FPR | at the start threshold: precision / recall / FPR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['rule']} | {r['signal']} | {r['above_before']:.4g} → {r['above']:.6g} "
                     f"| {r['train_benign_fired']}/{r['train_benign']} ({r['train_allowed']}) "
                     f"| {r['train_positive_fired']}/{r['train_positive']} "
                     f"| {r['heldout_fired']}/{r['heldout_positive'] + r['heldout_negative']} "
                     f"| {pct(r['precision'])} ({r['tp']}/{r['tp'] + r['fp']}) | {pct(r['recall'])} ({r['tp']}/{r['heldout_positive']}) "
                     f"| {pct(r['fpr'])} ({r['fp']}/{r['heldout_negative']}) "
                     f"| {pct(r['start']['precision'])} / {pct(r['start']['recall'])} / {pct(r['start']['fpr'])} |")
    if res["skipped"]:
        lines.append(f"\nNo rules for {', '.join(res['skipped'])}: no positive or no negative training request.")
    return "\n".join(lines)


def bench(assets: Path, recording: Path, workdir: Path | None = None) -> dict:
    """`bench/quality.py --model smollm2`'s part: the loop on the build's recording and label files
    (``labels-<split>.jsonl`` beside it), its table printed."""
    res = run(assets, recording, recording.parent / "labels-train.jsonl", recording.parent / "labels-heldout.jsonl",
              workdir or recording.parent / "rules-loop")
    n = res["requests"]
    print(f"Rules calibrated at {res['fpr_target']:.0%} per-request FPR on the {n['train']} training requests "
          f"(benign: those without the rule's concept), backtested on the {n['replayed']} held-out requests:\n")
    print(table(res))
    print(f"\nCalibrated rules: {res['rules_file']} (sidecar config {res['config']})")
    return res


def write_json(path: Path | None, obj: dict) -> int:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")
    return 0
