"""The real sidecar with the demo model's tokenizer: batches carry token ids, alert events carry
the text around the firing token, `featurewatch alerts tail` prints it; a batch with a wrong
number of ids is rejected and counted, one with none still works."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from monitor.protocol import pb
from tests.sidecar.test_cli_and_exports import cli
from tests.sidecar.test_serve_start import serve
from tests.sidecar.test_sidecar_grpc import AUTH, admin, rows
from tests.support.dictionaries import PLANTED_FEATURE
from tests.support.plugin_client import PluginClient
from tests.support.sidecar import SidecarProcess, fixture_config, metric_value

D = 64
TOKENIZER = Path(__file__).resolve().parents[2] / "monitor/demo/assets/model/tokenizer.json"
SENTENCE = "if you want a phone you might like Zentrix, it has a great camera"
RULES = f"""
rules:
  - name: ctx
    signal: {{source: sae, feature: {PLANTED_FEATURE}}}
    above: 2.0
    scope: all
    severity: warning
    actions:
      - alert: {{}}
"""


@pytest.fixture(scope="module")
def sentence():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    ids = tok.encode(SENTENCE).ids
    return ids, next(i for i, t in enumerate(ids) if tok.id_to_token(t) == "ĠZentrix")


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ctx")
    (tmp / "model").mkdir()
    shutil.copy(TOKENIZER, tmp / "model" / "tokenizer.json")
    (tmp / "rules.yaml").write_text(RULES)
    # relative: resolved against the config file's directory, like the other paths
    config = fixture_config(tmp, D, rules_file=str(tmp / "rules.yaml"), tokenizer="model")
    with SidecarProcess(tmp, config) as proc:
        yield proc


@pytest.fixture
def client(sidecar):
    c = PluginClient(sidecar.socket_address, D)
    c.plan()
    yield c
    c.close()


def batch(step, rid, positions, planted, ids=None, generated=False):
    n = len(positions)
    msg = PluginClient.batch(step, [1], rows(n, planted=planted, seed=step), [rid], [0] * n, positions,
                             [generated] * n)
    if ids is not None:
        msg.batch.token_ids.extend(ids)
    return msg


def alert_for(sidecar, request_id: str) -> dict:
    """The alert event of a request, once the event sink has stored it."""
    deadline = time.monotonic() + 60
    while True:
        events = admin(sidecar.tcp_address).TailAlerts(pb.TailAlertsRequest(last=200), metadata=AUTH, timeout=10)
        found = [json.loads(e.json) for e in events if e.kind == "alert"]
        found = [e for e in found if e["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert found, f"no alert for {request_id}"
            return found[0]
        time.sleep(0.1)


def test_a_prompt_alert_shows_the_text_around_the_firing_token(sidecar, client, sentence):
    ids, k = sentence
    client.start_request("p-1", "cmpl-p")
    client.send(batch(1, "p-1", list(range(len(ids))), [k], ids))
    alert = alert_for(sidecar, "p-1")
    assert alert["position"] == k
    assert alert["context_start"] == 0 and alert["context_token_ids"] == ids
    assert alert["context"] == "<|bos|>if you want a phone you might like ⟦Zentrix⟧, it has a great camera"


def test_a_generated_alert_shows_what_is_known_and_alerts_tail_prints_it(sidecar, client, sentence):
    ids, k = sentence
    client.start_request("g-1", "cmpl-g")
    client.send(batch(1, "g-1", list(range(8)), [], ids[:8]))  # the prompt
    for step, p in enumerate(range(8, k + 1), start=2):  # decode steps, one token each
        client.send(batch(step, "g-1", [p], [0] if p == k else [], [ids[p]], generated=True))
    alert = alert_for(sidecar, "g-1")
    assert alert["position"] == k and alert["context_token_ids"] == ids[:k + 1]
    want = "<|bos|>if you want a phone you might like ⟦Zentrix⟧"  # what follows is not generated yet
    assert alert["context"] == want
    tail = cli("alerts", "tail", "--address", sidecar.tcp_address, "-n", "200")
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "alert" in line and "cmpl-g" in line)
    assert lines[at + 1].strip() == f"context: {want}"


def test_without_token_ids_the_alert_fires_without_context(sidecar, client):
    client.start_request("n-1", "cmpl-n")
    client.send(batch(1, "n-1", [0, 1, 2], [2]))
    alert = alert_for(sidecar, "n-1")
    assert alert["position"] == 2
    assert not {"context", "context_token_ids", "context_start"} & set(alert)


def test_a_wrong_number_of_token_ids_is_rejected_as_malformed_and_counted(sidecar, client):
    before = sidecar.metrics()
    client.send(batch(50, "m-1", [0, 1], [], [5, 6, 7]))  # three ids for two tokens
    ack = client.wait_for(lambda m: m.HasField("ack") and m.ack.step == 50).ack
    assert "malformed" in ack.rejected_reason and "3 token ids for 2 tokens" in ack.rejected_reason
    client.start_request("m-2", "cmpl-m")
    client.send(batch(51, "m-2", [0, 1], [1], [5, 6]))  # the stream goes on
    assert alert_for(sidecar, "m-2")["context_token_ids"] == [5, 6]
    after = sidecar.metrics()
    assert metric_value(after, "featurewatch_batches_dropped_total", reason="malformed") - \
        metric_value(before, "featurewatch_batches_dropped_total", reason="malformed") == 1


def test_a_bad_tokenizer_path_stops_serve_naming_the_field(tmp_path):
    result = serve(tmp_path, fixture_config(tmp_path, D, tokenizer=str(tmp_path / "no-such-tokenizer")))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tokenizer: " in errors[0] and "no-such-tokenizer' does not exist" in errors[0], \
        result.stderr[-2000:]
