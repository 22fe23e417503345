"""A tiny Llama trained in seconds on template sentences, so its greedy output is fluent (in its
tiny language) and a steer that wrecks it shows: the quick start's "your own model".

Every sentence reads ``the <size> <animal> was <colour> and <verb> to the <place> .``; the verb
follows from the animal, and ``dog`` is the commonest animal, so greedy continuations mention it.
"""

from __future__ import annotations

import random
from pathlib import Path

ANIMALS = {"dog": "run", "cat": "sleep", "bird": "fly", "fish": "swim"}
SIZES, COLOURS, PLACES = ("big", "small", "old", "happy"), ("red", "blue", "green"), ("river", "city", "house", "tree")


def sentence(rng: random.Random) -> str:
    animal = rng.choice(["dog", "dog", "dog", "cat", "bird", "fish"])
    return (f"the {rng.choice(SIZES)} {animal} was {rng.choice(COLOURS)} and {ANIMALS[animal]} "
            f"to the {rng.choice(PLACES)} .")


def corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(4)) for _ in range(n_docs)]


def build_story_model(path: str | Path, *, hidden_size: int = 64, num_layers: int = 3, steps: int = 300,
                      seed: int = 0) -> Path:
    """Train and save (HF format, float32) a ``LlamaForCausalLM`` and its tokenizer; idempotent."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    docs = corpus(seed=seed)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    ids = [tok.encode(d).ids for d in docs]
    length = min(len(i) for i in ids)
    data = torch.tensor([i[:length] for i in ids])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=gen)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    gen_cfg = path / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    return path
