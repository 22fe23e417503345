"""The demo's BPE tokenizer: trained on the corpus, saved as a transformers tokenizer with the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence


from monitor.demo.corpus_labels import Example


SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# newlines as expressions: transformers renders chat templates with trim_blocks, which drops a
# literal newline right after a block tag
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}agent: {% else %}customer: {% endif %}"
    "{{ m['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}agent:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", BOS_ID)])
    assert [tok.token_to_id(s) for s in SPECIALS] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def save_tokenizer(tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "model_max_length": 256, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}, indent=2) + "\n")


def encode_docs(tok, docs: Sequence[Example]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids (BOS first, no EOS) and character offsets per document."""
    encs = tok.encode_batch([d.text for d in docs])
    return [(e.ids, e.offsets) for e in encs]


