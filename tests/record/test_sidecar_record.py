"""The real sidecar with `record:` on, fed over gRPC: what it records matches what was sent."""

from __future__ import annotations

import stat
import time

import numpy as np
import pytest

from monitor.protocol import pb
from monitor.record import Recording
from monitor.record.recorder import sampled
from tests.support.dictionaries import planted_direction, planted_rules
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import SidecarProcess, fixture_config, metric_value

D = 64
RATE = 0.5


def api_ids() -> tuple[str, str, str]:
    """Three API ids: the first in the 50 % sample, the other two not (the decision is a hash)."""
    ids = [f"cmpl-{i}" for i in range(200)]
    inside = [i for i in ids if sampled(i, RATE)]
    outside = [i for i in ids if not sampled(i, RATE)]
    return inside[0], outside[0], outside[1]


def batch(step, rids, token_request, positions, generated, x, token_ids):
    msg = PluginClient.batch(step, [1], x, rids, token_request, positions, generated)
    msg.batch.token_ids.extend(token_ids)
    return msg


def wait_metric(sc, name, expected, **labels):
    deadline = time.monotonic() + 60  # bounds only a failure
    while time.monotonic() < deadline:
        if metric_value(sc.metrics(), name, **labels) >= expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name}{labels} never reached {expected}:\n{sc.log()[-2000:]}")


def test_real_sidecar_records_sampled_and_rule_requests(tmp_path):
    (tmp_path / "rules.yaml").write_text(planted_rules())
    config = fixture_config(tmp_path, D, rules_file=str(tmp_path / "rules.yaml"),
                            record={"dir": str(tmp_path / "rec"), "sample": RATE, "on_rules": ["planted_feature"],
                                    "flush_interval_s": 0.2, "max_bytes": 1 << 24, "shard_bytes": 1 << 20})
    sampled_api, fired_api, plain_api = api_ids()
    rids = [a + "-0-1a2b3c4d" for a in (sampled_api, fired_api, plain_api)]
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, 9, D)).astype(np.float32) * 0.05
    step2 = rng.standard_normal((1, 3, D)).astype(np.float32) * 0.05
    step2[0, 1] += 10 * planted_direction(D)  # a planted generated token: planted_feature fires on request 2
    with SidecarProcess(tmp_path, config) as sc:
        client = PluginClient(sc.socket_address, D)
        try:
            client.plan()
            for rid, api in zip(rids, (sampled_api, fired_api, plain_api)):
                client.send(pb.PluginMessage(request_start=pb.RequestStart(
                    request_id=rid, api_request_id=api, metadata={"tenant": "a"}, prompt_tokens=3, started_unix_s=123.0)))
            client.send(batch(1, rids, [0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 2] * 3, [False] * 9, prompt,
                              [10, 11, 12, 20, 21, 22, 30, 31, 32]))
            client.send(batch(2, rids, [0, 1, 2], [3, 3, 3], [True] * 3, step2, [13, 23, 33]))
            for rid in rids:
                client.send(pb.PluginMessage(request_finish=pb.RequestFinish(request_id=rid, generated_tokens=1,
                                                                              finish_reason="stop")))
            wait_metric(sc, "featurewatch_record_requests_total", 1, reason="rule")
            wait_metric(sc, "featurewatch_record_requests_total", 1, reason="sample")
            text = sc.metrics()
            assert metric_value(text, "featurewatch_record_tokens_total") == 8
            assert metric_value(text, "featurewatch_record_disk_bytes") > 0
            assert metric_value(text, "featurewatch_alerts_total", rule="planted_feature") == 1
        finally:
            client.close()
    root = tmp_path / "rec"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in root.iterdir())
    rec = Recording.open(root)
    assert rec.manifest.model_name == "test-model" and rec.manifest.layers == [1] and rec.manifest.d_model == D
    assert set(rec.manifest.sidecar.sources) == {"sae", "probes"} and rec.manifest.sidecar.rules_version >= 0
    got = {r.api_request_id: r for r in rec.iter_requests()}
    assert set(got) == {sampled_api, fired_api}  # the third: neither sampled nor fired on
    s, f = got[sampled_api], got[fired_api]
    assert s.reason == "sample" and s.rules_fired == [] and f.reason == "rule"
    assert f.rules_fired[0] == "planted_feature" and f.fired_positions[0] == 3
    for r, i, first in ((s, 0, 10), (f, 1, 20)):
        assert r.positions.tolist() == [0, 1, 2, 3] and r.token_ids.tolist() == [first, first + 1, first + 2, first + 3]
        assert r.generated.tolist() == [False, False, False, True]
        assert r.metadata == {"tenant": "a"} and r.prompt_tokens == 3 and r.generated_tokens == 1
        assert r.finish_reason == "stop" and r.started_unix_s == pytest.approx(123.0)
        expected = np.concatenate([prompt[0, 3 * i:3 * i + 3], step2[0, i:i + 1]])
        np.testing.assert_array_equal(r.activations[1].numpy(), expected)
