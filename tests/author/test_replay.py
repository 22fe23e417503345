"""The replay gives the verdicts the sidecar's evaluator gives when the same rows arrive the way
vLLM sends them: prompt in one batch, then one generated token per request per step, requests
interleaved."""

import numpy as np
import torch
import yaml

from monitor.author import replay as rp
from monitor.evaluate.state import LayerBatch, RequestInfo, RequestTable
from monitor.pipeline import finite_rows
from tests.author.test_calibrate import RULES, _traffic
from tests.support.sidecar import fixture_config

D = 64


def _live(rules, reqs):
    """Step-by-step evaluation as the pipeline does it (dedupe, encode, finite rows, evaluate)."""
    table = RequestTable(10_000, 1e9)
    table.reset_rules(len(rules.rules))
    for r in reqs:
        table.start(RequestInfo(r.request_id, r.api_request_id, r.metadata))
    fired = {r.request_id: [] for r in reqs}
    n_prompt = [int((~r.generated).sum()) for r in reqs]
    steps = [[(i, np.arange(n_prompt[i])) for i in range(len(reqs))]]
    steps += [[(i, np.array([n_prompt[i] + k])) for i in range(len(reqs)) if n_prompt[i] + k < len(reqs[i].positions)]
              for k in range(max(len(r.positions) for r in reqs))]
    for step in steps:
        if not step:
            continue
        ids = [reqs[i].request_id for i, _ in step]
        token_request = np.concatenate([np.full(len(rows), j) for j, (_, rows) in enumerate(step)])
        positions = np.concatenate([reqs[i].positions[rows] for i, rows in step])
        generated = np.concatenate([reqs[i].generated[rows] for i, rows in step])
        x = torch.cat([reqs[i].activations[1][rows] for i, rows in step])
        lb = LayerBatch(1, ids, token_request, positions, generated)
        keep = table.dedupe(lb)
        mask = finite_rows(x)
        if mask is not None:
            keep &= mask
        for v in table.evaluate(rules, lb, rules.encode.compute(1, x), keep):
            fired[v.request.request_id].append(rp.Fired(v.rule.name, v.position, v.value))
    return fired


def test_replay_equals_step_by_step_evaluation(tmp_path):
    cfg = tmp_path / "featurewatch.yaml"
    cfg.write_text(yaml.safe_dump(fixture_config(tmp_path, D)))
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES.replace("above: 100.0", "above: 2.0").replace("above: 0.99", "above: 0.6"))
    setup = rp.load_setup(rules_file, cfg)
    reqs = _traffic(n_pos=20, n_neg=40)
    reqs[3].activations[1][5, 0] = float("nan")  # a non-finite row is dropped, not evaluated
    live = _live(setup.rules, reqs)
    replayed = rp.replay(setup.rules, reqs)
    assert sum(map(len, live.values())) > 30  # rules of every window kind fired
    assert {f.rule for fs in live.values() for f in fs} == {"feat_token", "feat_count", "probe_ema"}
    for rid in live:
        key = lambda f: (f.rule, f.position)  # noqa: E731
        assert sorted(live[rid], key=key) == sorted(replayed[rid], key=key), rid
