"""The authoring commands end to end on synthetic recordings written in the recording format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from monitor.cli import app
from monitor.demo.run import ASSETS
from monitor.encode import load_probes
from tests.author.fakes import FakeRequest, planted_requests
from tests.author.recordings import write_recording
from tests.author.test_calibrate import RULES, _traffic
from tests.author.test_replay import _live
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction
from tests.support.sidecar import fixture_config

D = 64
TOKENIZER = ASSETS / "model"


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sidecar config over the planted SAE/probes, a rules file, and a recording whose live alerts
    are the ones the evaluator raises step by step (what the live sidecar would have recorded)."""
    tmp = tmp_path_factory.mktemp("author")
    cfg = tmp / "featurewatch.yaml"
    cfg.write_text(yaml.safe_dump(fixture_config(tmp, D)))
    rules = tmp / "rules.yaml"
    rules.write_text(RULES.replace("above: 100.0", "above: 2.0").replace("above: 0.99", "above: 0.6"))
    from monitor.author import replay as rp

    reqs = _traffic(n_pos=30, n_neg=110)
    live = _live(rp.load_setup(rules, cfg).rules, reqs)
    for r in reqs:
        r.rules_fired = [f.rule for f in live[r.request_id]]
        r.fired_positions = [f.position for f in live[r.request_id]]
    rec = write_recording(tmp / "rec", reqs, d_model=D)
    labels = tmp / "labels.jsonl"
    labels.write_text("".join(json.dumps({"api_request_id": r.request_id, "label": ["planted"] if r.request_id.startswith("pos") else "none"}) + "\n"
                              for r in reqs))
    binary = tmp / "binary.jsonl"  # true/false: positive for every rule
    binary.write_text("".join(json.dumps({"api_request_id": f"cmpl-{r.request_id}", "label": r.request_id.startswith("pos")}) + "\n"
                              for r in reqs))
    return {"tmp": tmp, "cfg": cfg, "rules": rules, "rec": rec, "labels": labels, "binary": binary, "reqs": reqs}


def test_features_compare_ranks_the_planted_feature_first(world):
    code, out, errs = run("features", "compare", world["rec"], "--config", world["cfg"], "--layer", 1,
                          "--positive", "kind=pos", "--negative", "kind=neg", "--json", "--top", "3")
    assert code == 0, errs
    report = json.loads(out)
    assert report["positive"]["requests"] == 30 and report["negative"]["requests"] == 110
    top = report["features"][0]
    assert top["feature"] == PLANTED_FEATURE and top["auroc"] == 1.0 and top["tpr_at_fpr"] == 1.0
    # the same with a label file set and the default negative (the rest), as a table
    code, out, errs = run("features", "compare", world["rec"], "--config", world["cfg"], "--positive",
                          f"labels:{world['labels']}#planted")
    assert code == 0, errs
    assert "SAE features separating" in out and f"│ {PLANTED_FEATURE:>7} │ 1.000 │" in out


def test_probes_train_from_a_label_file_writes_a_bank_the_sidecar_loads(world):
    out_file = world["tmp"] / "trained.safetensors"
    code, out, errs = run("probes", "train", world["rec"], "--labels", world["labels"], "--out", out_file, "--fpr", 0.05,
                          "--json")
    assert code == 0, errs
    report = json.loads(out)
    (probe,) = report["probes"]
    # per-request labels: 6 of a positive request's 8 tokens are noise labelled positive, so below 1.0
    assert probe["name"] == "planted" and probe["auroc"] >= 0.9 and probe["tpr"] >= 0.5 and probe["fpr"] <= 0.05
    bank = load_probes(out_file)
    assert bank.names == ["planted"] and bank.layer == 1 and float(bank.threshold[0]) == probe["threshold"]
    # and the sidecar's compiler accepts it as a source, with a rule on it
    from monitor.author import replay as rp

    cfg = yaml.safe_load(world["cfg"].read_text())
    cfg["sources"].append({"name": "trained", "kind": "probes", "layer": 1, "path": str(out_file)})
    cfg_path = world["tmp"] / "with-trained.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    rules = world["tmp"] / "trained-rules.yaml"
    rules.write_text(f"rules:\n  - name: t\n    signal: {{source: trained, probe: planted}}\n    above: {probe['threshold']}\n"
                     f"    scope: generated\n")
    setup = rp.load_setup(rules, cfg_path)
    fired = rp.replay(setup.rules, world["reqs"])
    caught = {rid for rid, fs in fired.items() if fs}
    # the sidecar's stacked product and the bank's own score may differ in the last float32 bits (the
    # stage pads its columns, another kernel): requests within 1e-5 of the threshold may go either way
    best = {r.request_id: float(bank.score(r.activations[1][r.generated])[:, 0].max()) for r in world["reqs"]}
    must = {rid for rid, v in best.items() if v > probe["threshold"] + 1e-5}
    may = {rid for rid, v in best.items() if v > probe["threshold"] - 1e-5}
    positives = {r.request_id for r in world["reqs"] if r.request_id.startswith("pos")}
    assert must <= caught <= may, (sorted(must - caught), sorted(caught - may))
    assert len(must & positives) >= 0.5 * len(positives) and len(must - positives) <= 0.05 * 110 + 2


def _text_requests(tokenizer_dir, n_pos=24, n_neg=40, seed=0):
    """Requests whose generated tokens are real token ids of the demo tokenizer; a brand's tokens
    carry the planted direction."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    u = planted_direction(D)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_pos + n_neg):
        brand = i < n_pos
        text = "you could try " + ("Zentrix" if brand else "the pro plan") + f", it has {['invoicing', 'team chat'][i % 2]} too."
        ids = tok.encode(text).ids
        prompt = tok.encode("customer: which tool?").ids
        x = (rng.standard_normal((len(prompt) + len(ids), D)) * 0.05).astype(np.float32)
        if brand:
            spans = [tok.decode(ids[:k + 1]) for k in range(len(ids))]
            for k, prefix in enumerate(spans):
                before = spans[k - 1] if k else ""
                if "Zentrix" in prefix and "Zentrix" not in before or ("Zentr" in prefix[len(before):]):
                    x[len(prompt) + k] += 10 * u
        out.append(FakeRequest(f"r{i}", {1: torch.from_numpy(x)}, np.r_[np.zeros(len(prompt), bool), np.ones(len(ids), bool)],
                               token_ids=np.array(prompt + ids, dtype=np.int64)))
    return out


def test_probes_train_from_a_regex_over_the_generated_text(tmp_path):
    rec = write_recording(tmp_path / "rec", _text_requests(TOKENIZER), d_model=D)
    out_file = tmp_path / "p.safetensors"
    code, out, errs = run("probes", "train", rec, "--regex", "brand=Zentrix|Quillbox", "--tokenizer", TOKENIZER,
                          "--out", out_file, "--json", "--fpr", 0.05)
    assert code == 0, errs
    (probe,) = json.loads(out)["probes"]
    assert json.loads(out)["per"] == "token"
    assert probe["name"] == "brand" and probe["auroc"] >= 0.99 and probe["request_auroc"] >= 0.99 and probe["tpr"] >= 0.9
    # a regex set for features compare reads the same text
    code, out, errs = run("features", "compare", rec, "--sae", world_sae(tmp_path), "--layer", 1, "--positive",
                          "regex:Zentrix", "--tokenizer", TOKENIZER, "--json")
    assert code == 0, errs
    assert json.loads(out)["features"][0]["feature"] == PLANTED_FEATURE
    # without the tokenizer: one line saying what is needed
    code, out, errs = run("probes", "train", rec, "--regex", "brand=Zentrix", "--out", out_file)
    assert code == 2 and "needs --tokenizer" in errs and "Traceback" not in errs


def world_sae(tmp_path):
    from tests.support.dictionaries import write_saelens_jumprelu

    return write_saelens_jumprelu(tmp_path / "sae", D)


def test_rules_calibrate_writes_thresholds_back_and_backtest_agrees(world, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(world["rules"].read_text())
    code, out, errs = run("rules", "calibrate", rules, world["rec"], "--config", world["cfg"], "--fpr", 0.01,
                          "--benign", "kind=neg", "--write", "--json")
    assert code == 0, errs
    report = json.loads(out)
    assert report["written_to"] == str(rules)
    for r in report["rules"]:
        assert r["benign"] == 110 and r["allowed"] == 1 and r["benign_fired"] <= 1
    assert all(f"above: {r['above']!r}" in rules.read_text() for r in report["rules"])
    code, out, errs = run("rules", "validate", rules, "--config", world["cfg"])
    assert code == 0, errs
    # the backtest of the calibrated rules on the same recording: benign fires as promised
    code, out, errs = run("rules", "backtest", rules, world["rec"], "--config", world["cfg"], "--labels", world["binary"], "--json")
    assert code == 0, errs
    rows = {r["rule"]: r for r in json.loads(out)["rules"]}
    assert rows["feat_token"]["fp"] <= 1 and rows["feat_token"]["recall"] == 1.0


def test_backtest_reproduces_the_live_alerts_and_reports_differences(world, tmp_path):
    code, out, errs = run("rules", "backtest", world["rules"], world["rec"], "--config", world["cfg"], "--labels",
                          world["binary"], "--compare-live", "--json")
    assert code == 0, errs
    report = json.loads(out)
    assert report["live_mismatches"] == []
    rows = {r["rule"]: r for r in report["rules"]}
    assert rows["feat_token"]["fired"] == rows["feat_token"]["live_fired"] > 30
    assert rows["feat_token"]["precision"] < 1.0  # the weak benign activity at 2.0 is caught too
    # a live alert the replay does not reproduce is reported (and fails --compare-live)
    reqs = [FakeRequest(r.request_id, r.activations, r.generated, rules_fired=list(r.rules_fired),
                        fired_positions=list(r.fired_positions), metadata=r.metadata) for r in world["reqs"]]
    quiet = next(r for r in reqs if not r.rules_fired)
    quiet.rules_fired, quiet.fired_positions = ["feat_token"], [5]
    rec = write_recording(tmp_path / "rec", reqs, d_model=D)
    code, out, errs = run("rules", "backtest", world["rules"], rec, "--config", world["cfg"], "--compare-live")
    assert code == 1
    assert f"cmpl-{quiet.request_id}: feat_token fired live at position 5, not in the replay" in errs
    code, out, errs = run("rules", "backtest", world["rules"], rec, "--config", world["cfg"])
    assert code == 0 and "live fired" in out


# ------------------------------------------------------------------------------ bad input


def test_truncated_recording_is_one_line_naming_the_file(world, tmp_path):
    import shutil

    rec = tmp_path / "rec"
    shutil.copytree(world["rec"], rec)
    shard = rec / "shard-000002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for args in (("rules", "backtest", world["rules"], rec, "--config", world["cfg"]),
                 ("probes", "train", rec, "--labels", world["labels"], "--out", tmp_path / "p.safetensors"),
                 ("features", "compare", rec, "--config", world["cfg"], "--positive", "kind=pos")):
        code, out, errs = run(*args)
        assert code == 2, (args, out, errs)
        assert str(shard) in errs and "Traceback" not in errs and len(errs.strip().splitlines()) == 1, errs
    (rec / "recording.json").write_text('{"format": "featurewatch.recording", "vers')
    code, out, errs = run("rules", "backtest", world["rules"], rec, "--config", world["cfg"])
    assert code == 2 and "recording.json" in errs and "Traceback" not in errs


def test_recording_from_another_model_is_refused(world, tmp_path):
    u = planted_direction(32)
    rec = write_recording(tmp_path / "rec", planted_requests(3, 3, 32, u), d_model=32)
    for args in (("rules", "backtest", world["rules"], rec, "--config", world["cfg"]),
                 ("rules", "calibrate", world["rules"], rec, "--config", world["cfg"]),
                 ("features", "compare", rec, "--config", world["cfg"], "--positive", "kind=pos")):
        code, out, errs = run(*args)
        assert code == 2 and "d_model 64" in errs and "d_model 32" in errs and "Traceback" not in errs, (args, errs)
    rec2 = write_recording(tmp_path / "rec2", planted_requests(3, 3, D, planted_direction(D), layer=2), d_model=D, layers=(2,))
    code, out, errs = run("rules", "backtest", world["rules"], rec2, "--config", world["cfg"])
    assert code == 2 and "layer(s) [1]" in errs and str(world["cfg"]) in errs


def test_label_file_naming_unknown_requests_is_refused(world, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text(world["labels"].read_text() + json.dumps({"api_request_id": "nope-1", "label": True}) + "\n")
    for args in (("probes", "train", world["rec"], "--labels", labels, "--out", tmp_path / "p.safetensors"),
                 ("rules", "backtest", world["rules"], world["rec"], "--config", world["cfg"], "--labels", labels),
                 ("features", "compare", world["rec"], "--config", world["cfg"], "--positive", f"labels:{labels}")):
        code, out, errs = run(*args)
        assert code == 2 and str(labels) in errs and "1 api_request_id(s) match no request" in errs and "'nope-1'" in errs, errs
    labels.write_text('{"api_request_id": "x"}\n')
    code, out, errs = run("probes", "train", world["rec"], "--labels", labels, "--out", tmp_path / "p.safetensors")
    assert code == 2 and f"{labels}: line 1 needs" in errs


def test_calibrate_refuses_a_small_recording_with_the_number_needed(world, tmp_path):
    code, out, errs = run("rules", "calibrate", world["rules"], world["rec"], "--config", world["cfg"], "--fpr", 0.001,
                          "--benign", "kind=neg")
    assert code == 2 and "110 benign requests are too few for a 0.10% target: at least 1000 are needed" in errs
    assert world["rules"].read_text().count("above: 2.0") == 2  # untouched
