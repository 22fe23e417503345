"""`featurewatch demo --model smollm2`: the product on a real pretrained chat model.

The planted demo's machinery (monitor/demo/run.py: the real sidecar, vLLM's OpenAI server with the
plugin) serves SmolLM2-135M-Instruct (`featurewatch model fetch smollm2`, cached) with the shipped
layer-15 SAE and probe bank. Traffic is the *held-out* prompts of the build (prompts.py: templates
and topics the detectors never saw) in the model's chat template; ground truth is the labelers
over what the model generated. Then each concept's prompts are sent again with a per-request
policy (`vllm_xargs: {suppress: <concept>}`) clamping that concept's SAE features to 0, error term
kept (what steer.py measured offline), beside the neutral prompts unsteered in the same batches:
the steered answers change, the unsteered ones must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from rich.table import Table

from monitor.demo.run import Demo, Options, Sent, console
from monitor.models.smollm2 import labelers as L
from monitor.models.smollm2 import prompts as P

ASSETS = Path(__file__).resolve().parent / "assets"

# Per concept, the SAE features a suppression clamps: the three best by detection AUROC on the
# *training* split (quality.py's `train_top_features`, the table in docs/benchmarks.md, measured with
# `python bench/quality.py --model smollm2 --threads 1 --steer 3`). Offline the clamp cut
# non_english 66.7 % -> 0 % of held-out answers (+16.9 % perplexity); advice 86 %, pii 50 %, code 0 %.
STEER_FEATURES = {"code": (43, 7, 20), "non_english": (2027, 4, 1055), "advice": (3, 1650, 70),
                  "pii": (1756, 21, 92)}
SAE_SOURCE, PROBE_SOURCE = "demo_sae", "demo_probes"  # the demo sidecar's source names (monitor/demo/run.py)


def smollm2_rules(thresholds: dict[str, float], suppress: bool) -> str:
    """An alert rule per concept on its probe at the shipped threshold; with ``suppress``, a policy
    per concept clamping its features on the requests whose metadata says ``suppress: <concept>``."""
    rules, policies = [], []
    for concept in P.CONCEPTS:
        rules.append({"name": f"{concept}_probe", "description": f"linear probe for {concept} (SmolLM2 layer 15)",
                      "signal": {"source": PROBE_SOURCE, "probe": concept}, "above": float(thresholds[concept]),
                      "scope": "generated", "severity": "warning",
                      "labels": {"owner": "trust-safety", "concept": concept}, "actions": [{"alert": {}}]})
        if suppress:
            policies.append({"name": f"suppress_{concept}", "selector": {"suppress": concept},
                             "steer": [{"clamp": {"source": SAE_SOURCE, "feature": f, "value": 0.0}}
                                       for f in STEER_FEATURES[concept]]})
    return yaml.safe_dump({"rules": rules, "policies": policies}, sort_keys=False)


def shipped_rules(assets: Path = ASSETS, suppress: bool = True) -> str:
    """:func:`smollm2_rules` at the thresholds the shipped probe bank carries (set at 1 % FPR on
    training requests by the build)."""
    from monitor.encode import load_probes

    manifest = json.loads((assets / "manifest.json").read_text())
    bank = load_probes(str(assets / manifest["probes"]["path"]))
    return smollm2_rules({c: float(bank.threshold[bank.index(c)]) for c in P.CONCEPTS}, suppress)


def heldout_subset(kind: str, n: int) -> list[P.Prompt]:
    """``n`` held-out prompts of one kind, evenly spread over its templates and topics."""
    ps = P.prompts(kind, "heldout")
    if n >= len(ps):
        return ps
    return [ps[(i * len(ps)) // n] for i in range(n)]


class SmolLM2Demo(Demo):
    served_name = "smollm2-135m-instruct"
    max_model_len = 512

    def __init__(self, options: Options, model_folder: str | None = None) -> None:
        from transformers import AutoTokenizer

        from monitor.models.fetch import fetch

        options.assets = ASSETS
        super().__init__(options)
        if model_folder is None:
            with console.status("fetching SmolLM2-135M-Instruct (featurewatch model fetch smollm2; cached) …"):
                model_folder = str(fetch("smollm2"))
        self.folder = model_folder
        self.tokenizer = AutoTokenizer.from_pretrained(model_folder)

    # ------------------------------------------------------------------ what is served
    def model_path(self) -> str:
        return self.folder

    def rules_yaml(self, steer: str) -> str:
        return shipped_rules(self.assets, suppress=steer != "none")

    def start_sidecar(self, steer: str = "policy") -> None:
        """The policies are in force from the start: they steer only requests that ask for them."""
        super().start_sidecar(steer)

    def chat(self, user: str) -> str:
        return P.chat(self.tokenizer, user)

    def requests(self, phase: str, kinds=P.KINDS, n: int | None = None, suppress: bool = False) -> list[Sent]:
        """Held-out prompts of ``kinds`` (``n`` each; default the options' counts); with ``suppress``
        each concept prompt asks for its concept's policy (neutral ones never do)."""
        out = []
        for kind in kinds:
            count = n if n is not None else (self.o.neutral_requests if kind == "neutral" else self.o.requests_per_concept)
            for i, p in enumerate(heldout_subset(kind, count)):
                concept = None if kind == "neutral" else kind
                xargs = {"suppress": concept} if suppress and concept else {}
                out.append(Sent(f"{phase}-{kind}-{i}", concept, self.chat(p.user), xargs=xargs))
        return out

    # ------------------------------------------------------------------ reports
    def report_alerts(self, sent: list[Sent]) -> dict:
        table = Table(title="Probe alerts against the labelers (concept in the generated text), held-out prompts")
        for col in ("rule", "requests with the concept", "TP", "FP", "FN", "precision", "recall"):
            table.add_column(col, justify="left" if col == "rule" else "right")
        scores = {}
        for concept in P.CONCEPTS:
            truth = {s.api_id for s in sent if L.REQUEST[concept](s.text)}
            rule = f"{concept}_probe"
            fired = {s.api_id for s in sent if rule in s.alerts}
            tp, fp, fn = len(fired & truth), len(fired - truth), len(truth - fired)
            precision = tp / (tp + fp) if tp + fp else float("nan")
            recall = tp / (tp + fn) if tp + fn else float("nan")
            scores[rule] = {"precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}
            table.add_row(rule, str(len(truth)), str(tp), str(fp), str(fn), f"{precision:.2f}", f"{recall:.2f}")
        console.print(table)
        return scores

    def report_suppression(self, before: list[Sent], after: list[Sent]) -> dict:
        table = Table(title="Concept in the answer (labeler), same held-out prompts: monitor only → its policy's clamp")
        for col in ("concept", "clamped SAE features", "before", "after", "cut"):
            table.add_column(col, justify="left" if col in ("concept", "clamped SAE features") else "right")
        out = {}
        for concept in P.CONCEPTS:
            b = [L.REQUEST[concept](s.text) for s in before if s.concept == concept]
            a = [L.REQUEST[concept](s.text) for s in after if s.concept == concept]
            rb, ra = sum(b) / max(1, len(b)), sum(a) / max(1, len(a))
            cut = (1 - ra / rb) if rb else float("nan")
            out[concept] = {"before": rb, "after": ra, "cut": cut, "n": len(b),
                            "steered": sum(s.steered for s in after if s.concept == concept)}
            table.add_row(concept, ", ".join(f"#{f}" for f in STEER_FEATURES[concept]), f"{rb:.0%} ({sum(b)}/{len(b)})",
                          f"{ra:.0%} ({sum(a)}/{len(a)})", f"{cut:.0%}")
        console.print(table)
        neutral = [(b, a) for b, a in zip(before, after) if b.concept is None]
        same = sum(b.text == a.text for b, a in neutral)
        out["neutral_identical"] = [same, len(neutral)]
        console.print(f"unsteered neutral requests in the same batches: {same}/{len(neutral)} answers byte-identical "
                      f"to the monitor-only phase")
        for concept in P.CONCEPTS:
            pair = next(((b, a) for b, a in zip(before, after) if b.concept == concept and L.REQUEST[concept](b.text)), None)
            if pair:
                b, a = pair
                user = b.prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
                console.print(f"[dim]{concept}: {user[:80]!r}[/dim]\n  [red]monitor only:[/red] {_line(b.text)}\n"
                              f"  [green]suppressed:[/green]   {_line(a.text)}")
        return out

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        m = self.manifest
        console.rule("[bold]featurewatch demo --model smollm2")
        console.print(f"model: SmolLM2-135M-Instruct ({self.folder}); layer {m['layer']} SAE {m['sae']['d_sae']} "
                      f"features + probes {', '.join(P.CONCEPTS)} (shipped: {self.assets}); workdir {self.work}")
        self.start_sidecar()
        self.start_vllm()
        self.wait_policies()
        console.rule("1. monitor: probe alerts on held-out prompts")
        monitored = self.send(self.requests("monitor"), "monitor")
        alerts = self.report_alerts(monitored)
        contexts = self.show_alert_context(monitored)  # tokenizer: the fetched folder's (Demo.tokenizer_path)
        console.rule("2. suppress: each concept's prompts with its clamp policy, neutral ones unsteered beside them")
        steered = self.send(self.requests("suppress", suppress=True), "suppress")
        suppression = self.report_suppression(monitored, steered)
        console.print(f"\nPrometheus metrics: [bold]http://127.0.0.1:{self.metrics_port}/metrics[/bold]   "
                      f"vLLM: http://127.0.0.1:{self.http_port}/metrics   logs: {self.work}")
        return {"alerts": alerts, "suppression": suppression, "alert_context": contexts,
                "requests": [{"api_id": s.api_id, "concept": s.concept, "alerts": sorted(s.alerts), "steered": s.steered,
                              "labels": [c for c in P.CONCEPTS if L.REQUEST[c](s.text)], "text": s.text}
                             for s in monitored + steered]}

    def wait_policies(self, timeout: float = 60.0) -> None:
        """Until the plugin received a plan (the sidecar had the policies before vLLM started): the
        engine core decides a request's policies from it, so none is created unsteered by mistake."""
        def received() -> bool:
            workers = self.plugin_status().get("workers") or []
            return bool(workers) and all(w.get("counters", {}).get("plans_received", 0) >= 1 for w in workers)

        self._wait(received, "the steering plan", timeout, "sending", "in the plugin")


def _line(text: str, n: int = 110) -> str:
    return repr(text.strip()[:n])
