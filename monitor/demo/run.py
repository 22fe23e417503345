"""`featurewatch demo`: the whole product on the embedded default, end to end.

Starts the sidecar (in-memory stores) and vLLM's OpenAI server with the plugin on the project's own
planted-concept model, sends a traffic mix, scores the alerts against the corpus ground truth, then
turns on suppression steering and shows the concept leave the outputs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from monitor.demo import corpus
from monitor.protocol import pb, pb_grpc

ASSETS = Path(__file__).resolve().parent / "assets"
console = Console(soft_wrap=True)


def free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


@dataclass
class Options:
    requests_per_concept: int = 24
    neutral_requests: int = 24
    max_tokens: int = 24
    concurrency: int = 8
    seed: int = 2026
    metrics_port: int = 9400
    linger_s: float | None = None  # None: until Ctrl-C on a terminal, 0 otherwise
    workdir: Path | None = None
    assets: Path = ASSETS
    record: bool = False  # the flight recorder on every request: <workdir>/recording, ground truth in labels.jsonl


@dataclass
class Sent:
    api_id: str
    concept: str | None
    prompt: str
    text: str = ""
    alerts: set = field(default_factory=set)
    steered: bool = False
    xargs: dict = field(default_factory=dict)  # more request metadata (vllm_xargs): what policy selectors match
    completion_tokens: int = 0  # as vLLM counted them (usage)
    contexts: dict = field(default_factory=dict)  # rule -> its alert's text around the firing token (with a tokenizer)


def demo_rules(manifest: dict, steer: str) -> str:
    """Alert rules for every concept from the manifest; `steer` = none | rule | policy."""
    rules, policies = [], []
    for concept, info in manifest["concepts"].items():
        best = info["features"][0]
        labels = {"owner": "trust-safety", "concept": concept}
        actions: list = [{"alert": {}}]
        clamps = [{"clamp": {"source": "demo_sae", "feature": int(f), "value": 0.0}} for f in info["steer_features"]]
        if steer == "rule":
            actions += [{"steer": c} for c in clamps]
        rules.append({"name": f"{concept}_feature", "description": f"best SAE feature for {concept}",
                      "signal": {"source": "demo_sae", "feature": int(best["feature"])},
                      "above": float(best.get("suggested_above", 0.0)), "scope": "generated", "severity": "warning",
                      "labels": labels, "actions": actions})
        rules.append({"name": f"{concept}_probe", "description": f"linear probe for {concept}",
                      "signal": {"source": "demo_probes", "probe": info["probe"]},
                      "above": float(info.get("probe_threshold", 0.5)), "scope": "generated", "severity": "warning",
                      "labels": labels})
        if steer == "policy":
            policies.append({"name": f"suppress_{concept}", "selector": {}, "steer": clamps})
    return yaml.safe_dump({"rules": rules, "policies": policies}, sort_keys=False)


class Demo:
    """The planted model's demo; a subclass serves another model by overriding the hooks below
    (served_name, max_model_len, model_path, rules_yaml, prompts, deep_queues)."""

    served_name = "featurewatch-demo"
    max_model_len = 256

    def __init__(self, options: Options) -> None:
        self.o = options
        self.assets = Path(options.assets)
        self.manifest = json.loads((self.assets / "manifest.json").read_text())
        self.work = Path(options.workdir or tempfile.mkdtemp(prefix="featurewatch-demo-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.procs: list[subprocess.Popen] = []
        self.generated_expected = 0  # generated tokens the sidecar must have evaluated (all phases so far)
        self.socket = self.work / "featurewatch.sock"
        self.grpc_port = free_port()
        self.metrics_port = free_port(options.metrics_port)
        self.http_port = free_port()
        self.env = {**os.environ, "FEATUREWATCH_ADMIN_TOKEN": self.token}
        for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME"):
            self.env.setdefault(var, str(self.work / "cache" / var.lower()))
        self.env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                         "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"})

    # ------------------------------------------------------------------ what is served
    def model_path(self) -> str:
        return str(self.assets / self.manifest["model"]["path"])

    def rules_yaml(self, steer: str) -> str:
        return demo_rules(self.manifest, steer)

    def tokenizer_path(self) -> Path | None:
        """The served model folder when it has a tokenizer.json the sidecar can read (`tokenizer:`:
        alerts then carry the text around the firing token); None otherwise (ids only)."""
        folder = Path(self.model_path())
        if not (folder / "tokenizer.json").is_file():
            return None
        try:
            import tokenizers  # noqa: F401 - the sidecar's `tokenizer` extra (vLLM brings it)
        except ImportError:
            return None
        return folder

    def prompts(self) -> list[tuple[str | None, str]]:
        """(expected concept or None, prompt text) of one phase's traffic."""
        o = self.o
        prompts = [(c, p.text) for c in corpus.CONCEPTS for p in corpus.eliciting_prompts(c, o.requests_per_concept, o.seed)]
        return prompts + [(None, p.text) for p in corpus.eliciting_prompts(None, o.neutral_requests, o.seed)]

    @property
    def deep_queues(self) -> bool:
        """Every queue on the way deep enough that a busy CPU delays batches rather than drops them:
        the demo scores every request against its ground truth, and on a busy 2-core machine the
        default bounds (which protect a production host's memory) drop steps and so alerts."""
        return True

    # ------------------------------------------------------------------ processes
    def start_sidecar(self, steer: str = "none") -> None:
        m = self.manifest
        config = {
            "model_name": self.served_name, "socket": str(self.socket), "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port, "metrics_host": "127.0.0.1",
            "sources": [{"name": "demo_sae", "kind": "sae", "layer": m["layer"], "path": str(self.assets / m["sae"]["path"])},
                        {"name": "demo_probes", "kind": "probes", "layer": m["layer"], "path": str(self.assets / m["probes"]["path"])}],
            "store": {"kind": "memory"}, "encode_threads": 1,
        }
        tokenizer = self.tokenizer_path()
        if tokenizer is not None:
            config["tokenizer"] = str(tokenizer)
        if self.o.record:  # for the authoring loop (docs/authoring.md)
            # every request: a queue deep enough that a busy CPU delays the recorder rather than drops (tiny batches)
            config["record"] = {"dir": str(self.work / "recording"), "sample": 1.0, "flush_interval_s": 2.0,
                                "queue_batches": 65536}
        if self.deep_queues:
            # every batch: the sidecar's own queue deep enough too (a request all of whose batches were dropped
            # under load is not recorded at all), and a request whose RequestFinish the plugin dropped (its
            # queue is bounded: fail open) is written once idle 15 s, not after the default 10 minutes
            config["limits"] = {"queue_batches": 65536, "request_idle_timeout_s": 15.0}
            # and the shared-memory ring: a slot stays taken until the pipeline handled its step, so 16 slots
            # fill while a busy sidecar catches up; 1024 slots of 64 KiB (decode steps; a larger prefill
            # step goes as bytes through the deep queue)
            config["shm"] = {"slots": 1024, "max_bytes": 64 << 20}
        (self.work / "featurewatch.yaml").write_text(yaml.safe_dump(config))
        (self.work / "rules.yaml").write_text(self.rules_yaml(steer))
        self._spawn("sidecar", [sys.executable, "-m", "monitor.cli", "serve", "--config", str(self.work / "featurewatch.yaml")])
        self._wait(lambda: self._healthy(), "sidecar", 60)
        self.apply_rules(steer)

    def start_vllm(self) -> None:
        env = {"FEATUREWATCH_ADDRESS": f"unix://{self.socket}", "FEATUREWATCH_LAYERS": str(self.manifest["layer"]),
               "FEATUREWATCH_MODEL_NAME": self.served_name, "VLLM_PLUGINS": "featurewatch,featurewatch_routes"}
        if self.deep_queues:  # every request recorded: the plugin's send queue deep enough that a busy CPU delays, not drops
            env["FEATUREWATCH_QUEUE_BATCHES"] = "65536"
        self.env.update(env)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path(),
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.http_port),
               "--dtype", "float32", "--max-model-len", str(self.max_model_len), "--enforce-eager", "--max-num-seqs", "16",
               "--kv-cache-memory-bytes", str(256 << 20)]  # a tiny model: don't reserve most of RAM
        self._spawn("vllm", cmd)
        self._wait(lambda: self._http_ok(f"http://127.0.0.1:{self.http_port}/health"), "vLLM", 600)
        # the plugin connects to the sidecar once its self-test passed: traffic before that is served, not watched
        self._wait(self._plugin_connected, "plugin connection", 60)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.work / f"{name}.log", "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def _wait(self, ready, what: str, timeout: float, doing: str = "starting", done: str = "up") -> None:
        """Poll ``ready`` until true; ``timeout`` bounds only a failure (a process that exited fails at once)."""
        deadline = time.monotonic() + timeout
        with console.status(f"{doing} {what} …"):
            while time.monotonic() < deadline:
                for proc in self.procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"a demo process exited ({proc.returncode}) while {doing} {what}; see logs in {self.work}")
                if ready():
                    console.print(f"[green]✓[/green] {what} {done}")
                    return
                time.sleep(0.5)
        raise TimeoutError(f"{what}: not {done} in {timeout:.0f}s; see logs in {self.work}")

    def _healthy(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as ch:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
        except grpc.RpcError:
            return False

    def _plugin_connected(self) -> bool:
        return bool(self.plugin_status().get("connected"))

    def plugin_status(self) -> dict:
        """The plugin's /featurewatch/status ({} while vLLM does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/featurewatch/status", timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ admin
    def _admin(self):
        return pb_grpc.AdminStub(grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")), [("authorization", f"Bearer {self.token}")]

    def apply_rules(self, steer: str) -> None:
        """Put the phase's rules in force; once vLLM runs, return when the plugin holds the new plan
        (every install sends one: its policies decide how the next requests are steered)."""
        before = self.plans_received()
        stub, md = self._admin()
        reply = stub.PutRules(pb.PutRulesRequest(yaml=self.rules_yaml(steer), author=f"demo:{steer}"), metadata=md, timeout=30)
        if not reply.ok:
            raise RuntimeError("demo rules rejected: " + "; ".join(f"{e.rule}.{e.field}: {e.message}" for e in reply.errors))
        if before is not None:
            self._wait(lambda: (self.plans_received() or 0) > before, f"rules '{steer}': plan", 60, "sending", "in the plugin")

    def plans_received(self) -> int | None:
        """Plans the plugin's workers received so far (None before vLLM answers)."""
        workers = self.plugin_status().get("workers") if self.procs else None
        if not workers:
            return None
        return sum(int(w.get("counters", {}).get("plans_received", 0)) for w in workers)

    def events(self) -> list[dict]:
        stub, md = self._admin()
        return [json.loads(e.json) for e in stub.TailAlerts(pb.TailAlertsRequest(last=100_000), metadata=md, timeout=30)]

    # ------------------------------------------------------------------ traffic
    def sent(self, phase: str) -> list[Sent]:
        """One phase's requests, from ``prompts()``."""
        return [Sent(f"{phase}-{i}", c, p) for i, (c, p) in enumerate(self.prompts())]

    def traffic(self, phase: str, sent: list[Sent] | None = None) -> list[Sent]:
        """Send one phase's requests (default: ``sent(phase)``), ``concurrency`` at a time; returns
        once vLLM answered them all (the sidecar may still be evaluating: see :meth:`send`)."""
        o = self.o
        if sent is None:
            sent = self.sent(phase)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task(f"{phase}: {len(sent)} requests", total=len(sent))
            with ThreadPoolExecutor(o.concurrency) as pool:
                for _ in pool.map(self._complete, sent):
                    progress.advance(task)
        return sent

    def _complete(self, s: Sent) -> None:
        body = {"model": self.served_name, "prompt": s.prompt, "max_tokens": self.o.max_tokens, "temperature": 0.0,
                "vllm_xargs": {"tenant": "demo", "expected": s.concept or "none", **s.xargs}}
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "X-Request-Id": s.api_id})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        s.text = reply["choices"][0]["text"]
        s.completion_tokens = int(reply.get("usage", {}).get("completion_tokens", 0))

    def send(self, sent: list[Sent], phase: str, timeout: float = 300.0) -> list[Sent]:
        """Send, then wait until the sidecar has evaluated every generated token and written every
        alert it counted; attach each request's alerts and steering events."""
        self.traffic(phase, sent)
        # the last generated token of a request is never read by the model, so never tapped
        self.generated_expected += sum(max(0, s.completion_tokens - 1) for s in sent)
        self.wait_caught_up(timeout)
        by_id = {s.api_id: s for s in sent}
        for e in self.events():
            s = by_id.get(_api_suffix(e.get("api_request_id", "")))
            if s is not None:
                note_event(s, e)
        return sent

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def wait_caught_up(self, timeout: float) -> None:
        """Until the sidecar evaluated as many generated tokens as vLLM generated, then (a later scrape)
        its encode queue is empty — the queue counts a batch until it is fully handled, alerts
        included — then its event stream holds every alert it counted. ``timeout`` bounds only a
        failure (a batch dropped on the way: monitoring fails open); the error names the drop counters."""
        deadline = time.monotonic() + timeout
        steps = [("generated tokens evaluated",
                  lambda t: metric(t, "featurewatch_tokens_processed_total", scope="generated") >= self.generated_expected),
                 ("encode queue empty", lambda t: metric(t, "featurewatch_queue_depth", stage="encode") == 0),
                 ("every counted alert in the event stream",
                  lambda t: sum(e.get("kind") == "alert" for e in self.events()) >= metric(t, "featurewatch_alerts_total"))]
        for what, done in steps:
            while not done(text := self.metrics_text()):
                if time.monotonic() > deadline:
                    drops = "\n".join(line for line in text.splitlines() if "dropped" in line and not line.startswith("#"))
                    raise TimeoutError(f"the sidecar did not catch up in {timeout:.0f}s (waiting for: {what}; "
                                       f"{self.generated_expected} generated tokens sent); drop counters:\n{drops}")
                time.sleep(0.5)

    # ------------------------------------------------------------------ reports
    def report_alerts(self, sent: list[Sent]) -> dict:
        table = Table(title="Alerts against ground truth (concept present in the generated text)")
        for col in ("rule", "concept", "TP", "FP", "FN", "precision", "recall"):
            table.add_column(col, justify="right" if col not in ("rule", "concept") else "left")
        scores = {}
        for concept in corpus.CONCEPTS:
            truth = {s.api_id for s in sent if corpus.find_mentions(s.text, concept)}
            for kind in ("feature", "probe"):
                rule = f"{concept}_{kind}"
                fired = {s.api_id for s in sent if rule in s.alerts}
                tp, fp, fn = len(fired & truth), len(fired - truth), len(truth - fired)
                precision = tp / (tp + fp) if tp + fp else float("nan")
                recall = tp / (tp + fn) if tp + fn else float("nan")
                scores[rule] = (precision, recall)
                table.add_row(rule, concept, str(tp), str(fp), str(fn), f"{precision:.2f}", f"{recall:.2f}")
        console.print(table)
        return scores

    def report_steering(self, phases: dict[str, list[Sent]]) -> dict:
        """Share of eliciting prompts whose generation mentions the concept, and mentions per
        generation: steering on fire acts from the token after the first detection, so it shows in
        the later mentions; suppressing always shows in both."""
        table = Table(title="Concept emission in generations from eliciting prompts: % with a mention (mentions/request)")
        table.add_column("concept")
        for name in phases:
            table.add_column(name, justify="right")
        table.add_column("reduction (always)", justify="right")
        rates = {}
        for concept in corpus.CONCEPTS:
            row = []
            for name, sent in phases.items():
                counts = [len(corpus.find_mentions(s.text, concept)) for s in sent if s.concept == concept]
                rate = sum(c > 0 for c in counts) / max(1, len(counts))
                rates[(concept, name)] = rate
                row.append(f"{rate:.0%} ({sum(counts) / max(1, len(counts)):.2f})")
            first, last = rates[(concept, list(phases)[0])], rates[(concept, list(phases)[-1])]
            reduction = (1 - last / first) if first else float("nan")
            table.add_row(concept, *row, f"{reduction:.0%}")
        console.print(table)
        return rates

    def show_alert_context(self, sent: list[Sent], per_rule: int = 1) -> list[dict]:
        """A few alerts with the text around their firing token (⟦marked⟧): per rule, the first
        ``per_rule`` requests (in send order) whose alert carries it, other rules' requests last."""
        shown, used = [], set()
        for rule in sorted({r for s in sent for r in s.contexts}):
            having = [s for s in sent if rule in s.contexts]
            for s in sorted(having, key=lambda s: s.api_id in used)[:per_rule]:  # stable: send order kept
                shown.append({"rule": rule, "api_id": s.api_id, "context": s.contexts[rule]})
                used.add(s.api_id)
        if not shown:
            console.print("[dim]alert context: none (the sidecar has no tokenizer: alerts carry token ids only)[/dim]")
            return shown
        console.print("[bold]Alert context[/bold] (the generated text up to the token the rule fired on, ⟦marked⟧):")
        width = [max(len(a[k]) for a in shown) for k in ("rule", "api_id")]
        for a in shown:
            console.print(f"  {a['rule']:<{width[0]}}  {a['api_id']:<{width[1]}}  {escape(a['context'])}")
        return shown

    def show_examples(self, before: list[Sent], after: list[Sent]) -> None:
        pairs = [(b, a) for b, a in zip(before, after) if b.concept and corpus.find_mentions(b.text, b.concept)][:3]
        for b, a in pairs:
            console.print(f"[dim]prompt …{b.prompt[-70:]!r}[/dim]\n  [red]monitor only:[/red] {b.text.strip()[:90]!r}\n"
                          f"  [green]suppressed:[/green]   {a.text.strip()[:90]!r}")

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        console.rule("[bold]featurewatch demo")
        console.print(f"model: {self.manifest['description']}\nlayer {self.manifest['layer']} SAE "
                      f"{self.manifest['sae']['d_sae']} features; workdir {self.work}")
        self.start_sidecar()
        self.start_vllm()
        console.rule("1. monitor: alerts only")
        monitored = self.send(self.sent("monitor"), "monitor")
        alert_scores = self.report_alerts(monitored)
        contexts = self.show_alert_context(monitored)
        console.rule("2. steer from the token a rule fires on (per request)")
        self.apply_rules("rule")
        on_fire = self.send(self.sent("on-fire"), "on-fire")
        console.rule("3. suppress always (policy for every request)")
        self.apply_rules("policy")
        always = self.send(self.sent("always"), "always")
        rates = self.report_steering({"monitor only": monitored, "steer on fire": on_fire, "suppress always": always})
        if self.o.record:
            write_labels(self.work / "labels.jsonl", monitored + on_fire + always)
            console.print(f"recording: {self.work / 'recording'}, ground truth: {self.work / 'labels.jsonl'}")
        self.show_examples(monitored, always)
        metrics = f"http://127.0.0.1:{self.metrics_port}/metrics"
        console.print(f"\nPrometheus metrics: [bold]{metrics}[/bold]   vLLM: http://127.0.0.1:{self.http_port}/metrics   "
                      f"logs: {self.work}")
        return {"alerts": alert_scores, "emission": {f"{c}/{p}": r for (c, p), r in rates.items()},
                "alert_context": contexts}


def note_event(s: Sent, event: dict) -> None:
    """Attach one alert/steering event of the sidecar to the request it belongs to."""
    if event["kind"] == "alert":
        s.alerts.add(event["rule"])
        if event.get("context"):
            s.contexts.setdefault(event["rule"], event["context"])
    elif event["kind"] == "steering":
        s.steered = True


def write_labels(path: Path, sent: list[Sent]) -> None:
    """Ground truth as a label file for the authoring commands: per request, the concepts its
    generation mentions (`corpus.find_mentions`), or "none"."""
    path.write_text("".join(json.dumps({"api_request_id": s.api_id, "label": [c for c in corpus.CONCEPTS
                                        if corpus.find_mentions(s.text, c)] or "none"}) + "\n" for s in sent))


def _api_suffix(api_request_id: str) -> str:
    """vLLM's API id is cmpl-/chatcmpl- + X-Request-Id; the demo's X-Request-Id is the key."""
    for prefix in ("chatcmpl-", "cmpl-"):
        if api_request_id.startswith(prefix):
            return api_request_id[len(prefix):]
    return api_request_id


def run_demo(options: Options, demo_class: type[Demo] = Demo) -> dict:
    demo = demo_class(options)
    try:
        result = demo.run()
        (demo.work / "result.json").write_text(json.dumps(result, indent=2))
        linger = options.linger_s if options.linger_s is not None else (float("inf") if sys.stdin.isatty() else 0.0)
        if linger > 0:
            console.print("Serving until Ctrl-C (or --linger seconds) so a Prometheus can scrape …")
            try:
                time.sleep(linger if linger != float("inf") else 10**9)
            except KeyboardInterrupt:
                pass
        return result
    finally:
        demo.stop()
        if options.workdir is None and not os.environ.get("FEATUREWATCH_DEMO_KEEP"):
            shutil.rmtree(demo.work / "cache", ignore_errors=True)


def metric(text: str, name: str, **labels) -> float:
    """Sum of one metric's samples (exact name) whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.split("#")[0].split()[-1])
    return total
