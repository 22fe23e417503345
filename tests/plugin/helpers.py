"""Shared pieces of the plugin's end-to-end tests: engine start-up, the HF reference, test plans."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from monitor.protocol import pb
from tests.plugin.fake_sidecar import FakeSidecar, add_action, clamp_action

D_MODEL = 64
NUM_LAYERS = 4
BLOCK = 32

# Random but fixed steering vectors (unit norm) for the tests' policies and directives.
_rng = np.random.default_rng(1234)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


ENC1 = _unit(_rng.standard_normal(D_MODEL))
DEC1 = _unit(_rng.standard_normal(D_MODEL))
ENC2 = _unit(_rng.standard_normal(D_MODEL))
DEC2 = _unit(_rng.standard_normal(D_MODEL))
GATE2 = _unit(_rng.standard_normal(D_MODEL))
DIR = _unit(_rng.standard_normal(D_MODEL))


@dataclass(frozen=True)
class RefClamp:
    layer: int
    encoder: np.ndarray
    decoder: np.ndarray
    bias: float = 0.0
    threshold: float = 0.0
    value: float = 0.0
    gate_encoder: np.ndarray | None = None
    gate_bias: float = 0.0

    def pb(self) -> pb.SteeringAction:
        return clamp_action(self.layer, self.encoder, self.decoder, bias=self.bias,
                            threshold=self.threshold, value=self.value,
                            gate_encoder=self.gate_encoder, gate_bias=self.gate_bias)


@dataclass(frozen=True)
class RefAdd:
    layer: int
    direction: np.ndarray
    scale: float

    def pb(self) -> pb.SteeringAction:
        return add_action(self.layer, self.direction, self.scale)


# policy "clamp_add": clamp feature (ENC1/DEC1) on layer 1 to 3.0 and add 2.5*DIR on layer 2
POLICY_CLAMP_ADD = [RefClamp(1, ENC1, DEC1, bias=0.1, threshold=0.0, value=3.0),
                    RefAdd(2, DIR, 2.5)]
# policy "gated": a gated, JumpReLU-style clamp on layer 1
POLICY_GATED = [RefClamp(1, ENC2, DEC2, bias=0.05, threshold=0.05, value=-1.5,
                         gate_encoder=GATE2, gate_bias=0.02)]
# directive: clamp a feature on layer 2 to 5.0 (error term kept)
DIRECTIVE = [RefClamp(2, ENC2, DEC1, bias=0.2, threshold=0.0, value=5.0)]


def make_plan(layers=(0, 1, 2, 3), scope=pb.TOKEN_SCOPE_ALL, failure_mode="open") -> pb.TapPlan:
    return pb.TapPlan(
        layers=list(layers), scope=scope, steering_enabled=True,
        steering_failure_mode=failure_mode, rules_version=7,
        policies=[
            pb.SteeringPolicy(name="clamp_add", selector={"steer": "policy"},
                              actions=[a.pb() for a in POLICY_CLAMP_ADD]),
            pb.SteeringPolicy(name="gated", selector={"steer": "gated", "tenant": "acme"},
                              actions=[a.pb() for a in POLICY_GATED]),
        ])


def directive_on_start(start: pb.RequestStart) -> list[pb.SteeringDirective]:
    """Fake-sidecar hook: metadata ``directive_from=<position>`` asks for the test directive."""
    fp = start.metadata.get("directive_from")
    if fp is None:
        return []
    return [pb.SteeringDirective(directive_id=f"d-{start.request_id}",
                                 request_id=start.request_id, rule="suppress",
                                 from_position=int(fp), actions=[a.pb() for a in DIRECTIVE])]


# ---------------------------------------------------------------- HF reference


def apply_actions(x: torch.Tensor, actions) -> torch.Tensor:
    """The proto's Clamp/AddDirection math, written independently of the plugin (all actions read
    the same x)."""
    delta = torch.zeros_like(x)
    for a in actions:
        if isinstance(a, RefAdd):
            delta = delta + a.scale * torch.from_numpy(a.direction)
            continue
        pre = x @ torch.from_numpy(a.encoder) + a.bias
        f = pre * (pre > a.threshold)
        if a.gate_encoder is not None:
            f = f * ((x @ torch.from_numpy(a.gate_encoder) + a.gate_bias) > 0)
        delta = delta + (a.value - f).unsqueeze(-1) * torch.from_numpy(a.decoder)
    return x + delta


class HFReference:
    def __init__(self, path: str) -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @contextlib.contextmanager
    def _steered(self, steer, captured: dict[int, torch.Tensor]):
        """Forward hooks applying ``steer`` — (from_position, actions) pairs — to the outputs of
        the actions' layers, recording every layer's (steered) output in ``captured``."""

        def hook_for(idx: int):
            def hook(mod, args, out):
                x = out[0] if isinstance(out, tuple) else out
                rows = []
                for p in range(x.shape[1]):
                    # every action in force at position p reads the same x
                    acts = [a for fp, acts in steer if fp <= p for a in acts if a.layer == idx]
                    rows.append(apply_actions(x[0, p], acts) if acts else x[0, p])
                y = torch.stack(rows).unsqueeze(0)
                captured[idx] = y[0].clone()
                return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
            return hook

        handles = [layer.register_forward_hook(hook_for(i))
                   for i, layer in enumerate(self.model.model.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def layers(self, tokens: list[int], steer=()) -> dict[int, np.ndarray]:
        """layer -> [T, d] outputs (after steering) of a teacher-forced pass over ``tokens``."""
        captured: dict[int, torch.Tensor] = {}
        with self._steered(steer, captured):
            self.model(torch.tensor([tokens]))
        return {i: t.numpy() for i, t in captured.items()}

    @torch.no_grad()
    def run(self, prompt: list[int], max_tokens: int, steer=()):
        """Greedy decode with full recompute, steered. Returns (generated ids, layer -> [T, d]
        outputs for every computed position, i.e. all but the last generated token)."""
        ids = list(prompt)
        gen: list[int] = []
        with self._steered(steer, {}):
            for _ in range(max_tokens):
                tok = int(torch.argmax(self.model(torch.tensor([ids])).logits[0, -1]))
                gen.append(tok)
                ids.append(tok)
        return gen, self.layers(ids[:-1], steer)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=length).tolist() for _ in range(n)]


# ---------------------------------------------------------------- the engine


@dataclass
class Engine:
    llm: object
    sidecar: FakeSidecar
    model_path: str

    def status(self) -> dict:
        return self.llm.collective_rpc("featurewatch_status")[0]

    def generate(self, prompt_ids: list[list[int]], max_tokens: int, metadata: list[dict | None],
                 cache_salt: str | None = None):
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                 extra_args=dict(m) if m else None) for m in metadata]
        salt = {"cache_salt": cache_salt} if cache_salt else {}
        outs = self.llm.generate([{"prompt_token_ids": p, **salt} for p in prompt_ids], params,
                                 use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def engine_env(mp: pytest.MonkeyPatch, root: str, address: str) -> None:
    for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME",
                "TMPDIR"):
        path = os.path.join(root, var.lower())
        os.makedirs(path, exist_ok=True)
        mp.setenv(var, path)
    mp.setenv("FEATUREWATCH_ADDRESS", address)
    mp.setenv("FEATUREWATCH_RUNTIME_DIR", root)
    mp.setenv("FEATUREWATCH_BACKOFF_MAX_S", "1.0")
    mp.setenv("FEATUREWATCH_STATS_INTERVAL_S", "0.5")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("VLLM_NO_USAGE_STATS", "1")
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


@contextlib.contextmanager
def start_engine(model_path: str, root: str, *, enforce_eager: bool, plan: pb.TapPlan,
                 extra_env: dict | None = None, **llm_kwargs):
    address = f"unix://{root}/sidecar.sock"
    sidecar = FakeSidecar(address, plan).start()
    sidecar.on_start = directive_on_start
    llm = None
    with pytest.MonkeyPatch.context() as mp:
        engine_env(mp, root, address)
        for k, v in (extra_env or {}).items():
            mp.setenv(k, v)
        from vllm import LLM

        kwargs = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=256,
                      max_num_seqs=8, kv_cache_memory_bytes=32 << 20, block_size=BLOCK, seed=0,
                      enforce_eager=enforce_eager)
        kwargs.update(llm_kwargs)
        try:
            llm = LLM(model_path, **kwargs)
            eng = Engine(llm, sidecar, model_path)
            assert sidecar.wait_for(lambda: eng.status().get("connected")), eng.status()
            yield eng
        finally:
            if llm is not None:
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
            sidecar.stop()


def assert_close_to_hf(eng: Engine, rid: str, ref_layers: dict[int, np.ndarray], n_positions: int,
                       layers=(0, 1, 2, 3), atol: float = 1e-4) -> None:
    acts = eng.sidecar.activations(rid)
    for layer in layers:
        got = acts[layer]
        assert sorted(got) == list(range(n_positions)), (layer, sorted(got))
        mine = np.stack([got[p] for p in range(n_positions)])
        err = float(np.abs(mine - ref_layers[layer][:n_positions]).max())
        assert err <= atol, f"layer {layer}: max |vllm - hf| = {err}"


def assert_cobatched_unsteered_bit_identical(eng: Engine, ps: list[list[int]], max_tokens: int,
                                            tag: str) -> None:
    """Batch [A, B] twice, A steered by a policy the first time only: B's tokens and every tapped
    row of B are the same bits both times. Each run gets its own cache_salt, so the second one
    recomputes instead of hitting the prefix cache."""
    steered = eng.generate(ps, max_tokens, [{"case": f"{tag}1A", "steer": "policy"},
                                            {"case": f"{tag}1B"}], cache_salt=f"{tag}1")
    plain = eng.generate(ps, max_tokens, [{"case": f"{tag}2A"}, {"case": f"{tag}2B"}],
                         cache_salt=f"{tag}2")
    assert steered[0] != plain[0]
    assert steered[1] == plain[1]
    b1 = eng.sidecar.activations(eng.sidecar.find_request(case=f"{tag}1B"))
    b2 = eng.sidecar.activations(eng.sidecar.find_request(case=f"{tag}2B"))
    n = len(ps[1]) + max_tokens - 1
    for layer in range(NUM_LAYERS):
        assert sorted(b1[layer]) == sorted(b2[layer]) == list(range(n))
        for q in b1[layer]:
            assert np.array_equal(b1[layer][q], b2[layer][q]), (layer, q)
