"""A tiny random-weight Llama checkpoint and a locally trained tokenizer (no hub anywhere).

Built in seconds; used by the plugin's end-to-end tests and by ``bench/serving_overhead.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

WORDS = (
    "the a an of to in and or but is was are were be been being have has had do does did "
    "cat dog bird fish tree river mountain city road house car train ship plane sun moon star "
    "red green blue yellow black white big small fast slow old new good bad happy sad "
    "run walk fly swim eat drink sleep read write speak listen see look think know want "
    "one two three four five six seven eight nine ten hello world model token layer feature"
).split()


def _corpus(n: int = 4000) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(n)]


def build_tiny_llama(
    path: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 384,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a float32 random-weight ``LlamaForCausalLM`` + tokenizer to ``path`` (idempotent)."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(path))
    real_vocab = tok.get_vocab_size()

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=real_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    # Larger-than-default init so layers change the residual stream visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    gen = path / "generation_config.json"
    if gen.exists():
        gen.unlink()  # no sampling defaults from the checkpoint
    (path / "featurewatch_tiny.json").write_text(json.dumps({"seed": seed}))
    return path


def build_tiny_stablelm(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """A float32 random-weight ``StableLmForCausalLM`` (vLLM's StableLM decoder layers return
    ``(stream, stale residual)``, unlike Llama's ``(hidden, residual)``), the Llama's tokenizer."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    llama = build_tiny_llama(path.parent / (path.name + "_tok"), seed=seed)
    path.mkdir(parents=True, exist_ok=True)

    import shutil

    import torch
    from transformers import StableLmConfig, StableLmForCausalLM

    for f in llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    vocab = json.loads((llama / "config.json").read_text())["vocab_size"]
    torch.manual_seed(seed)
    cfg = StableLmConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, partial_rotary_factor=0.5,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         torch_dtype="float32")
    model = StableLmForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    gen = path / "generation_config.json"
    if gen.exists():
        gen.unlink()
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fw_tiny"))
