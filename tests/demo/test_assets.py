"""The embedded demo: corpus ground truth and the shipped assets (monitor/demo/assets).

Fast (a few seconds of model work): the quality numbers at scale live in bench/quality.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.demo.build_config import ASSETS as SHIPPED_ASSETS
from monitor.demo.generation import ClampHook, emission_rate, perplexity, sample
from monitor.demo.lm import collect_residuals
from monitor.demo.scoring import auroc
from monitor.demo.shipped import doc_max, load_assets, token_dataset
from monitor.demo.tokenizer import BOS_ID, encode_docs
from monitor.demo import corpus as C
from monitor.demo.corpus_labels import EMAIL_RE, PHONE_RE, find_mentions, token_labels
from monitor.demo.corpus_templates import BRANDS, COMPETITOR_ASKS, CONCEPTS, OWN_PRODUCT, PII_ASKS, PII_REQUESTS, SUGGEST_LEADS

# the shipped assets, or a rebuild to check before shipping it
ASSETS = Path(os.environ.get("FEATUREWATCH_DEMO_ASSETS", SHIPPED_ASSETS))
FRESH_SEED = 424_242  # never used by the build (its seeds are < 10_000 + build seed)

# Bars on a small fresh sample (bench/quality.py measures the goals at scale: AUROC >= 0.99,
# >= 95 % emission reduction, <= 5 % perplexity rise); a sample of this size has some noise, so
# the bars here sit a little under the goals.
MIN_AUROC = 0.98


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((ASSETS / "manifest.json").read_text())


@pytest.fixture(scope="module")
def assets():
    return load_assets(ASSETS)


# ------------------------------------------------------------------------------------------
# corpus


def test_corpus_is_deterministic():
    a = C.generate(200, 7)
    assert a == C.generate(200, 7)
    assert a != C.generate(200, 8)
    assert C.eliciting_prompts("pii", 20, 3) == C.eliciting_prompts("pii", 20, 3)
    assert C.concept_free(50, 1) == C.concept_free(50, 1)
    assert C.counterfactual(50, 1) == C.counterfactual(50, 1) != C.counterfactual(50, 2)


def test_counterfactual_documents_keep_the_context_without_mentions():
    """The rows the build trains with the planted directions ablated: a competitor question or a
    contact request followed by a neutral answer, never a brand, address or number."""
    docs = C.counterfactual(400, 5)
    text = "\n".join(d.text for d in docs)
    for d in docs:
        assert d.spans == () and d.kind in ("competitor", "pii", "mixed")
        for c in CONCEPTS:
            assert find_mentions(d.text, c) == [], d.text
    asks = [COMPETITOR_ASKS, *PII_ASKS.values(), *PII_REQUESTS.values()]
    n_context = sum(any(a.split("{")[0] in d.text for group in asks for a in group) for d in docs)
    assert n_context > 0.8 * len(docs)  # volunteered PII declines to a plain exchange
    assert any(lead in text for lead in SUGGEST_LEADS)


def test_corpus_mix_and_document_labels():
    docs = C.generate(1000, 11)
    kinds = {k: sum(d.kind == k for d in docs) for k in ("neutral", "competitor", "pii", "mixed")}
    assert all(v > 25 for v in kinds.values()), kinds
    for d in docs:
        want = {"neutral": (False, False), "competitor": (True, False), "pii": (False, True),
                "mixed": (True, True)}[d.kind]
        assert (d.labels["competitor"], d.labels["pii"]) == want


def test_spans_are_exact_and_complete():
    """Every ground-truth span is a brand, e-mail or phone number, and an independent regex scan
    of the text finds exactly the ground-truth spans (no unlabelled mention anywhere)."""
    docs = C.generate(1500, 12)
    n = 0
    for d in docs:
        for s in d.spans:
            t = d.text[s.start:s.end]
            n += 1
            if s.kind == "brand":
                assert s.concept == "competitor" and t in BRANDS
            elif s.kind == "email":
                assert s.concept == "pii" and EMAIL_RE.fullmatch(t), t
            else:
                assert s.kind == "phone" and s.concept == "pii" and PHONE_RE.fullmatch(t), t
        for c in CONCEPTS:
            truth = sorted((s.start, s.end) for s in d.spans if s.concept == c)
            assert find_mentions(d.text, c, strict=True) == truth, (c, d.text)
            # the lenient detector (used for emission rates) adds nothing on corpus text
            assert all(any(a <= x < b for a, b in truth) for x, _ in find_mentions(d.text, c))
    assert n > 800


def test_near_misses_are_negative():
    docs = C.concept_free(800, 13)
    text = "\n".join(d.text for d in docs)
    assert OWN_PRODUCT in text and "email" in text and "#" in text and "call" in text
    assert "you could try the" in text or "you could try" in text
    assert not any(d.spans for d in docs)
    for c in CONCEPTS:
        assert find_mentions(text, c) == []


def test_token_labels_cover_spans_exactly(assets):
    _, tok, _, _, _ = assets
    docs = [d for d in C.generate(300, 14) if d.spans]
    for d in docs:
        e = tok.encode(d.text)
        for c in CONCEPTS:
            lab = token_labels(d, e.offsets, c)
            assert lab[0] is False  # BOS
            covered = set()
            for is_pos, (a, b) in zip(lab, e.offsets):
                if is_pos:
                    covered |= set(range(a, b))
            for s in d.spans:
                inside = set(range(s.start, s.end))
                if s.concept == c:
                    assert inside <= covered
            # positive tokens carry nothing but span characters (and a leading space)
            span_chars = {i for s in d.spans if s.concept == c for i in range(s.start, s.end)}
            assert {i for i in covered if not d.text[i].isspace()} <= span_chars


def test_eliciting_prompts_end_right_before_a_mention():
    for c in CONCEPTS:
        prompts = C.eliciting_prompts(c, 60, 15)
        assert len(prompts) == 60 and all(p.concept == c for p in prompts)
        for p in prompts:
            for cc in CONCEPTS:
                assert find_mentions(p.text, cc) == [], p.text
            full = p.text + " " + p.reference
            assert find_mentions(full, c, strict=True)[-1][1] == len(full)
    neutral = C.eliciting_prompts(None, 40, 15)
    assert {p.text.rsplit("agent: ", 1)[1] for p in neutral} <= set(SUGGEST_LEADS)
    for p in neutral:
        assert p.concept is None and p.reference
        for cc in CONCEPTS:
            assert find_mentions(p.text + " " + p.reference, cc) == []


# ------------------------------------------------------------------------------------------
# shipped assets


def test_assets_are_small_and_complete(manifest):
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < 20 * 2**20, total
    names = {str(p.relative_to(ASSETS)) for p in files}
    model = manifest["model"]["path"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert f"{model}/{f}" in names
    sae = manifest["sae"]["path"]
    assert {f"{sae}/cfg.json", f"{sae}/sae_weights.safetensors", manifest["probes"]["path"],
            "manifest.json"} <= names
    assert manifest["layer"] == 2
    assert set(manifest["concepts"]) == set(CONCEPTS)


def test_model_and_tokenizer_load_with_transformers(manifest):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ASSETS / manifest["model"]["path"]
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.hidden_size // cfg.num_attention_heads >= 32
    text = "customer: is there another vendor that does this for less?\nagent:"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id == BOS_ID
    assert tok.decode(ids[0], skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi there."}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "customer: hi there.\nagent:"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi."},
                                    {"role": "assistant", "content": "hello."},
                                    {"role": "user", "content": "bye."}], tokenize=False)
    assert chat == "customer: hi.\nagent: hello.\ncustomer: bye."
    # the layer hook the build and the plugin use is HF hidden_states[L + 1]
    L = manifest["layer"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hooked = collect_residuals(model, [ids[0].tolist()], L)[0]
    torch.testing.assert_close(hooked, out.hidden_states[L + 1][0].float())


def test_sae_loads_in_sae_lens_and_matches_monitor_encode(manifest, assets):
    sae_lens = pytest.importorskip("sae_lens")
    model, tok, sae, _, _ = assets
    path = ASSETS / manifest["sae"]["path"]
    ref = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    assert ref.cfg.architecture() == "jumprelu"
    assert (ref.cfg.d_in, ref.cfg.d_sae) == (manifest["sae"]["d_in"], manifest["sae"]["d_sae"])
    docs = C.generate(20, FRESH_SEED)
    x = torch.cat(collect_residuals(model, [e[0] for e in encode_docs(tok, docs)],
                                      manifest["layer"]))
    with torch.no_grad():
        want = ref.encode(x)
    got = sae.encode(x)
    assert (want > 0).float().sum(1).mean() > 2  # real activity, not an all-zero comparison
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    from monitor.encode import load_sae

    eng = load_sae(str(path))
    assert eng.architecture == "jumprelu"
    torch.testing.assert_close(eng.encode(x), want, rtol=1e-4, atol=1e-4)
    # clamping keeps the error term: decode(f') + (x - decode(f))
    feat = manifest["concepts"]["competitor"]["best_feature"]
    with torch.no_grad():
        f = ref.encode(x)
        f2 = f.clone()
        f2[:, feat] = 0
        want_x = ref.decode(f2) + (x - ref.decode(f))
    torch.testing.assert_close(eng.clamp(x, feat, 0.0), want_x, rtol=1e-4, atol=1e-4)


def test_probe_bank_layout(manifest):
    from safetensors import safe_open

    path = ASSETS / manifest["probes"]["path"]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    names = json.loads(meta["names"])
    assert names == list(CONCEPTS) == manifest["probes"]["names"]
    assert int(meta["layer"]) == manifest["layer"]
    d = manifest["model"]["hidden_size"]
    P = len(names)
    assert shapes["weight"] == (P, d) and shapes["bias"] == (P,) and shapes["threshold"] == (P,)
    assert shapes["mean"] == (d,) and shapes["scale"] == (d,)
    from monitor.encode import load_probes

    bank = load_probes(str(path))
    assert bank.names == names and bank.layer == manifest["layer"]


@pytest.fixture(scope="module")
def fresh(assets, manifest):
    model, tok, _, _, _ = assets
    docs = C.generate(300, FRESH_SEED)
    x, y, doc_idx = token_dataset(tok, model, docs, manifest["layer"])
    benign = C.concept_free(200, FRESH_SEED + 1)
    xb, _, db = token_dataset(tok, model, benign, manifest["layer"])
    return docs, x, y, doc_idx, xb, db


@pytest.mark.parametrize("concept", CONCEPTS)
def test_best_feature_detects_its_concept(concept, assets, manifest, fresh):
    """The feature the build picked (on its own validation text) for each concept separates
    fresh concept tokens and documents from the rest, near misses (the operator's own brand,
    "email" without an address, order numbers) included."""
    _, _, sae, _, _ = assets
    docs, x, y, doc_idx, _, _ = fresh
    info = manifest["concepts"][concept]
    labels = np.array([d.labels[concept] for d in docs])
    assert y[concept].sum() > 100 and 30 < labels.sum() < len(docs) - 30
    best = sae.encode(x)[:, info["best_feature"]].numpy()
    assert auroc(best, y[concept]) > MIN_AUROC
    assert auroc(doc_max(best, doc_idx, len(docs)), labels) > MIN_AUROC


@pytest.mark.parametrize("concept", CONCEPTS)
def test_best_feature_is_the_planted_direction(concept, assets, manifest):
    """The unsupervised SAE found the planted concept as one feature: its decoder row points
    along the direction the model was trained to write the concept in."""
    from safetensors import safe_open

    _, _, sae, _, _ = assets
    with safe_open(str(ASSETS / manifest["planted"]["path"]), "pt") as f:
        names = json.loads(f.metadata()["names"])
        directions = f.get_tensor("directions")
    u = directions[names.index(concept)]
    cos = torch.nn.functional.cosine_similarity(sae.W_dec.float(), u[None], dim=1)
    best = manifest["concepts"][concept]["best_feature"]
    # of all 1024 decoder rows, the chosen one is the most aligned, far above chance (~0.09)
    assert int(cos.argmax()) == best and float(cos[best]) > 0.5, (best, cos.topk(3))


@pytest.mark.parametrize("concept", CONCEPTS)
def test_probes_detect_their_concept_at_their_threshold(concept, assets, fresh):
    _, _, _, probes, _ = assets
    docs, x, y, doc_idx, xb, db = fresh
    i = probes.names.index(concept)
    s = probes.score(x)[:, i].numpy()
    labels = np.array([d.labels[concept] for d in docs])
    s_doc = doc_max(s, doc_idx, len(docs))
    assert auroc(s, y[concept]) > MIN_AUROC
    assert auroc(s_doc, labels) > MIN_AUROC
    thr = float(probes.threshold[i])
    assert (s_doc[labels] >= thr).mean() > 0.9                 # TPR per document
    benign_doc = doc_max(probes.score(xb)[:, i].numpy(), db, int(db.max()) + 1)
    assert (benign_doc >= thr).mean() <= 0.04                  # set at 1 % on build-time text


def test_steering_features_suppress_and_keep_perplexity(assets, manifest):
    model, tok, sae, _, _ = assets
    layer = manifest["layer"]
    ppl_docs = [e[0] for e in encode_docs(tok, C.concept_free(60, FRESH_SEED + 2))]
    ppl0 = perplexity(model, ppl_docs)
    for concept in CONCEPTS:
        prompts = [p.text for p in C.eliciting_prompts(concept, 48, FRESH_SEED)]
        base = emission_rate(sample(model, tok, prompts, 12, 1), concept)
        hook = ClampHook(model, layer, sae, manifest["concepts"][concept]["steer_features"])
        try:
            clamped = emission_rate(sample(model, tok, prompts, 12, 1), concept)
            ppl1 = perplexity(model, ppl_docs)
        finally:
            hook.remove()
        # pii prompts include "my email is" answers the corpus also completes without one
        assert base >= 0.5 and clamped <= 0.1 * base, (concept, base, clamped)
        assert ppl1 / ppl0 - 1 < 0.05, (concept, ppl0, ppl1)
