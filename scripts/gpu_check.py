#!/usr/bin/env python
"""Check the featurewatch plugin on a GPU, in every graph mode vLLM serves with.

For each (model runner, graph mode) it starts a fresh engine in a subprocess with the plugin and
the tests' fake sidecar, and checks:

* ``selftest``  the plugin's start-up self-test passed (it runs vLLM's own dummy batches after
                graph capture: a decode batch, replayed by a FULL graph where vLLM uses one, and
                a mixed batch, PIECEWISE/eager);
* ``tap``       tapped activations match HF transformers (fp32, teacher-forced on the tokens
                vLLM generated) for every prompt and generated position on every hooked layer;
* ``steer``     a policy-steered request (clamp + add) matches HF with the same intervention,
                prefill and decode positions alike (decode steps are where FULL graphs replay);
* ``directive`` a directive applied mid-generation (from a position) matches HF;
* ``cobatch``   a co-batched unsteered request is bit-identical to the same batch unsteered.

Prints pass/fail per mode and exits non-zero if any mode fails. Needs CUDA and a vLLM build for
it; nothing is downloaded (the model is a random Llama built locally).

    python scripts/gpu_check.py                       # all modes
    python scripts/gpu_check.py --modes v1:FULL,v2:PIECEWISE --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (runner, cudagraph mode); "eager" = enforce_eager (no compile, no graphs)
ALL_MODES = [
    ("v1", "FULL_AND_PIECEWISE"),  # vLLM's GPU default: FULL graphs for decode, PIECEWISE else
    ("v1", "PIECEWISE"),
    ("v1", "FULL"),
    ("v1", "FULL_DECODE_ONLY"),
    ("v1", "eager"),
    ("v2", "FULL_AND_PIECEWISE"),
    ("v2", "PIECEWISE"),
    ("v2", "FULL"),
    ("v2", "eager"),
]


def child(args) -> dict:
    import numpy as np
    import torch

    from tests.plugin.fake_sidecar import FakeSidecar
    from tests.plugin.helpers import (
        DIRECTIVE,
        POLICY_CLAMP_ADD,
        HFReference,
        directive_on_start,
        make_plan,
        prompts,
    )

    runner, mode = args.mode.split(":")
    root = args.root
    address = f"unix://{root}/sidecar.sock"
    sidecar = FakeSidecar(address, make_plan()).start()
    sidecar.on_start = directive_on_start
    os.environ.update(FEATUREWATCH_ADDRESS=address, FEATUREWATCH_RUNTIME_DIR=root,
                      VLLM_USE_V2_MODEL_RUNNER="1" if runner == "v2" else "0")
    from vllm import LLM, SamplingParams

    kwargs = dict(dtype=args.dtype, max_model_len=512, max_num_seqs=8, seed=0,
                  gpu_memory_utilization=args.gpu_memory_utilization, block_size=16)
    if not torch.cuda.is_available():  # --allow-cpu smoke run of this script
        kwargs.update(block_size=32, kv_cache_memory_bytes=64 << 20)
    if mode == "eager":
        kwargs["enforce_eager"] = True
    elif torch.cuda.is_available():
        kwargs["compilation_config"] = {"cudagraph_mode": mode,
                                        "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]}
    result: dict = {"mode": args.mode, "checks": {}}
    llm = LLM(args.model, **kwargs)
    try:
        def status():
            return llm.collective_rpc("featurewatch_status")[0]

        sidecar.wait_for(lambda: status().get("connected"), 30)
        st = status()
        result["graph_mode"] = st.get("graph_mode")
        result["runner"] = st.get("runner")
        result["selftest"] = st.get("selftest")
        result["checks"]["selftest"] = st.get("selftest", {}).get("status") == "passed"

        hf = HFReference(args.model)
        tol = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 8e-2}[args.dtype]

        def run(ps, metas, max_tokens, salt=None):
            sp = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                 extra_args=m) for m in metas]
            inputs = [{"prompt_token_ids": p, **({"cache_salt": salt} if salt else {})}
                      for p in ps]
            return [list(o.outputs[0].token_ids) for o in llm.generate(inputs, sp, use_tqdm=False)]

        def compare(case, tokens, steer=()):
            rid = sidecar.find_request(case=case)
            acts = sidecar.activations(rid)
            ref = hf.layers(tokens, steer)
            worst = 0.0
            for layer, rows in acts.items():
                n = len(tokens)
                if sorted(rows) != list(range(n)):
                    return False, f"{case}: layer {layer} positions {sorted(rows)[:5]}..."
                mine = np.stack([rows[q] for q in range(n)])
                scale = max(1.0, float(np.abs(ref[layer]).max()))
                worst = max(worst, float(np.abs(mine - ref[layer]).max()) / scale)
            return worst <= tol, f"{case}: max relative error {worst:.2e} (tol {tol})"

        G = 24
        ps = prompts(3, 40, seed=21)
        outs = run(ps, [{"case": "plain"}, {"case": "pol", "steer": "policy"},
                        {"case": "dir", "directive_from": str(40 + 12)}], G)
        time.sleep(0.5)
        ok, msg = compare("plain", ps[0] + outs[0][:-1])
        result["checks"]["tap"], result["tap"] = ok, msg
        ok, msg = compare("pol", ps[1] + outs[1][:-1], steer=[(0, POLICY_CLAMP_ADD)])
        result["checks"]["steer"], result["steer"] = ok, msg
        ok, msg = compare("dir", ps[2] + outs[2][:-1], steer=[(40 + 12, DIRECTIVE)])
        late = status()["counters"]["directives_late"]
        result["checks"]["directive"] = ok and late == 0
        result["directive"] = f"{msg}; late directives {late}"

        pa, pb_ = prompts(2, 33, seed=22)
        a = run([pa, pb_], [{"case": "cbA1", "steer": "policy"}, {"case": "cbB1"}], 16, "s1")
        b = run([pa, pb_], [{"case": "cbA2"}, {"case": "cbB2"}], 16, "s2")
        time.sleep(0.5)
        b1 = sidecar.activations(sidecar.find_request(case="cbB1"))
        b2 = sidecar.activations(sidecar.find_request(case="cbB2"))
        same = a[1] == b[1] and a[0] != b[0] and all(
            np.array_equal(b1[layer][q], b2[layer][q]) for layer in b1 for q in b1[layer])
        result["checks"]["cobatch"] = bool(same)
        result["counters"] = {k: status()["counters"][k] for k in (
            "steps", "tokens_tapped", "batches_dropped_queue_full", "steering_rows_applied")}
    finally:
        sidecar.stop()
    result["passed"] = all(result["checks"].values())
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default=",".join(f"{r}:{m}" for r, m in ALL_MODES))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--allow-cpu", action="store_true",
                    help="smoke-run this script on CPU (graph modes fall back to compile only)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args)
        print("GPUCHECK " + json.dumps(res, default=str), flush=True)
        os._exit(0)  # skip interpreter teardown of engine threads

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device here; nothing to check")
        return 2
    from tests.plugin.tiny_model import build_tiny_llama

    tmp = tempfile.mkdtemp(prefix="fw_gpucheck_")
    model = str(build_tiny_llama(os.path.join(tmp, "model")))
    rows = []
    for mode in args.modes.split(","):
        root = tempfile.mkdtemp(prefix="mode_", dir=tmp)
        env = dict(os.environ)
        for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME"):
            env[var] = os.path.join(root, var.lower())
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
        log = os.path.join(root, "engine.log")
        t0 = time.time()
        with open(log, "w") as f:
            p = subprocess.run([sys.executable, __file__, "--child", "--mode", mode, "--model",
                                model, "--root", root, "--dtype", args.dtype,
                                "--gpu-memory-utilization", str(args.gpu_memory_utilization)],
                               env=env, stdout=subprocess.PIPE, stderr=f, text=True, timeout=1200)
        res = None
        for line in p.stdout.splitlines():
            if line.startswith("GPUCHECK "):
                res = json.loads(line[len("GPUCHECK "):])
        if res is None:
            res = {"mode": mode, "passed": False, "checks": {},
                   "error": f"engine failed (rc={p.returncode}); see {log}"}
        res["seconds"] = round(time.time() - t0, 1)
        rows.append(res)
        checks = " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in res["checks"].items())
        print(f"{'PASS' if res['passed'] else 'FAIL'}  {mode:<24} {checks} "
              f"{res.get('graph_mode', '')} {res.get('error', '')}", flush=True)
        for k in ("tap", "steer", "directive"):
            if k in res:
                print(f"        {res[k]}")
        if not res["passed"] and res.get("selftest"):
            print(f"        selftest: {json.dumps(res['selftest'])[:800]}")
    failed = [r["mode"] for r in rows if not r["passed"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} modes passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
