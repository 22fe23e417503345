import numpy as np
import pytest
import yaml

from monitor.author import replay as rp
from monitor.author.calibrate import calibrate, critical_values
from monitor.author.errors import AuthorError
from monitor.author.rewrite import format_number, set_thresholds
from monitor.evaluate.rules import parse_rules
from tests.author.fakes import planted_requests
from tests.support.dictionaries import planted_direction
from tests.support.sidecar import fixture_config

D = 64

RULES = """# calibrated by featurewatch rules calibrate; the rest is the author's
rules:
  - name: feat_token   # the planted feature
    signal: {source: sae, feature: 3}
    above: 100.0
    scope: generated
  - name: feat_count
    signal: {source: sae, feature: 3}
    above: 100.0
    scope: generated
    window: {kind: count, n: 2}
    labels: {owner: me}
  - name: probe_ema
    signal: {source: probes, probe: planted}
    above: 0.99
    window: {kind: ema, alpha: 0.5}
    scope: all
policies:
  - name: keep_me
    selector: {tenant: b}
    steer: [{clamp: {source: sae, feature: 3, value: 0}}]
"""


@pytest.fixture()
def setup(tmp_path):
    cfg = tmp_path / "featurewatch.yaml"
    cfg.write_text(yaml.safe_dump(fixture_config(tmp_path, D)))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return rp.load_setup(rules, cfg)


def _traffic(n_pos=30, n_neg=220, seed=0):
    """Benign traffic with a spread of planted strengths (so thresholds fall between them)."""
    u = planted_direction(D)
    reqs = planted_requests(n_pos, 0, D, u, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for i, r in enumerate(planted_requests(0, n_neg, D, u, seed=seed + 2)):
        x = r.activations[1].numpy().copy()
        x[rng.integers(4, 12, size=3)] += float(rng.uniform(0, 4)) * u  # weak benign activity
        r.activations[1] = __import__("torch").from_numpy(x)
        reqs.append(r)
    return reqs


@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_calibrated_rules_fire_on_at_most_the_target_share_of_benign_requests(setup, fpr):
    reqs = _traffic()
    benign = {r.request_id for r in reqs if r.request_id.startswith("neg")}
    report, text = calibrate(setup, reqs, benign, fpr, "rec")
    allowed = int(np.floor(len(benign) * fpr))
    compiled = rp.recompile(text, setup.dictionaries, setup.config, setup.rules_path)
    fired = rp.replay(compiled, reqs)
    for rep in report:
        n = sum(any(f.rule == rep.rule for f in fired[rid]) for rid in benign)
        assert n == rep.benign_fired <= allowed, rep
        assert rep.above != 100.0
    by_name = {r.rule: r for r in report}
    assert by_name["feat_token"].other_fired == 30  # every planted request still caught
    # the rest of the file is kept byte for byte, only the numbers changed
    assert text.startswith("# calibrated by featurewatch rules calibrate; the rest is the author's\n")
    assert "  - name: feat_token   # the planted feature\n" in text and "policies:\n  - name: keep_me" in text
    assert parse_rules(text).rules[1].window.n == 2
    expected = RULES.replace("above: 100.0", f"above: {format_number(by_name['feat_token'].above)}", 1)
    expected = expected.replace("above: 100.0", f"above: {format_number(by_name['feat_count'].above)}", 1)
    assert text == expected.replace("above: 0.99", f"above: {format_number(by_name['probe_ema'].above)}")


def test_the_threshold_is_tight(setup):
    reqs = _traffic()
    benign = {r.request_id for r in reqs if r.request_id.startswith("neg")}
    report, _ = calibrate(setup, reqs, benign, 0.01, "rec")
    crit = np.concatenate([critical_values(setup.rules, rp.encode(setup.rules, g)) for g in rp.chunks(reqs)])
    ids = [r.request_id for g in rp.chunks(reqs) for r in g]
    is_benign = np.array([i in benign for i in ids])
    for rep in report:
        col = crit[is_benign, [r.name for r in setup.rules.rules].index(rep.rule)]
        lower = col[col < rep.above]
        if lower.size:
            assert (col > lower.max()).sum() > rep.allowed


def test_refuses_a_recording_too_small_for_the_target(setup):
    reqs = _traffic(n_pos=5, n_neg=99)
    benign = {r.request_id for r in reqs if r.request_id.startswith("neg")}
    with pytest.raises(AuthorError, match=r"rec: 99 benign requests are too few for a 1.00% target: at least 100"):
        calibrate(setup, reqs, benign, 0.01, "rec")
    calibrate(setup, reqs, benign, 0.05, "rec")  # 99 >= 20


def test_numbers_written_are_yaml_floats():
    for v in (1e-5, 2.5e20, -3.0, 0.1, 1.7729265689849854, 5e-324):
        s = format_number(v)
        assert yaml.safe_load(f"x: {s}")["x"] == v, s


def test_an_aliased_above_is_refused_not_silently_shared():
    text = "rules:\n  - name: a\n    signal: {source: s, feature: 1}\n    above: &t 1.0\n" \
           "  - name: b\n    signal: {source: s, feature: 2}\n    above: *t\n"
    with pytest.raises(AuthorError, match="rule 'b'.*alias"):
        set_thresholds(text, {"b": 2.0}, "r.yaml")


def test_only_the_named_rules_are_calibrated(setup):
    reqs = _traffic()
    benign = {r.request_id for r in reqs if r.request_id.startswith("neg")}
    report, text = calibrate(setup, reqs, benign, 0.01, "rec", only=["feat_count"])
    assert [r.rule for r in report] == ["feat_count"]
    first = RULES.index("above: 100.0")
    second = RULES.index("above: 100.0", first + 1)  # feat_count's; feat_token and probe_ema keep theirs
    assert text == RULES[:second] + f"above: {format_number(report[0].above)}" + RULES[second + len("above: 100.0"):]
    with pytest.raises(AuthorError, match="no rule 'nope'"):
        calibrate(setup, reqs, benign, 0.01, "rec", only=["nope"])
