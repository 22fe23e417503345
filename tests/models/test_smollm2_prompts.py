"""The SmolLM2 prompt set: deterministic, and no held-out prompt shares a template or a topic with training."""

from __future__ import annotations

from monitor.models.smollm2 import prompts as P


def test_train_and_heldout_share_no_template_and_no_topic():
    for kind in P.KINDS:
        train, held = P.prompts(kind, "train"), P.prompts(kind, "heldout")
        assert len(train) >= 40 and len(held) >= 18
        assert {p.template for p in train}.isdisjoint({p.template for p in held}), kind
        assert {p.topic for p in train}.isdisjoint({p.topic for p in held}), kind
        assert {p.user for p in train}.isdisjoint({p.user for p in held}), kind
    users = [p.user for s in P.SPLITS for p in P.all_prompts(s)]
    assert len(users) == len(set(users))


def test_the_set_is_deterministic_and_filled():
    assert P.all_prompts("heldout") == P.all_prompts("heldout")
    for p in P.all_prompts("train") + P.all_prompts("heldout"):
        assert "{" not in p.user and p.topic in p.user


def test_unknown_kind_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown prompt kind"):
        P.prompts("weather", "train")


def test_prompts_use_the_models_chat_template(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    text = P.chat(tok, "Translate into French: The cat is sleeping on the sofa.")
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nTranslate into French: The cat is sleeping on the sofa.<|im_end|>\n"
                         "<|im_start|>assistant\n")
