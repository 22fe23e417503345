"""Host cost per step of counting the tokens steered (issue 11's in-band proof).

The plugin's forward thread builds each step's steering rows on the host (``rows_for_step``) and,
after the step, reads the guard's refusals back (``NonfiniteGuard``). Counting the tokens steered
per policy and directive rule adds one ``bincount`` of the step's rows to the first (per request
only while a row is shared by different sources) and a small dict merge to the second; this times
both, with and without the counting, interleaved, on the same steering state (every request under
a policy, half of them also under a directive from a later position).

    python bench/steering_host.py                       # decode-like and prefill-like steps
    python bench/steering_host.py --requests 256 --tokens 1

No device and no model: only the host functions run (the op itself is unchanged by the counting).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.plugin import ops  # noqa: E402
from monitor.plugin.client import Counters  # noqa: E402
from monitor.plugin.guard import NonfiniteGuard  # noqa: E402
from monitor.plugin.steering import SteeringState  # noqa: E402
from monitor.plugin.table import SteeringTable  # noqa: E402
from monitor.protocol import pb  # noqa: E402


def _add(layer: int, seed: int, d: int) -> pb.SteeringAction:
    v = np.random.default_rng(seed).standard_normal(d).astype(np.float32)
    v /= np.linalg.norm(v)
    t = pb.Tensor(dtype=pb.FLOAT32, shape=[d], data=v.tobytes())
    return pb.SteeringAction(layer=layer, add=pb.AddDirection(direction=t, scale=1.0))


def setup(requests: int, tokens: int, d: int):
    tables = ops.SteerTables(num_layers=2, d_model=d, rows=64, clamps=4, max_tokens=requests * tokens,
                             device=torch.device("cpu"), dtype=torch.float32, do_tap=False)
    st = SteeringState(SteeringTable(tables, [0, 1]), d, Counters())
    st.apply_plan(pb.TapPlan(layers=[0, 1], steering_enabled=True, policies=[
        pb.SteeringPolicy(name=f"p{i}", selector={"t": str(i)}, actions=[_add(0, i, d)]) for i in range(4)]))
    live = {}
    for r in range(requests):
        rid = f"r{r}"
        live[rid] = 1
        st.start_request(rid, None, None, {"t": str(r % 4)})
        if r % 2:
            d_ = pb.SteeringDirective(directive_id=f"d{r}", request_id=rid, rule=f"rule{r % 8}",
                                      from_position=100, actions=[_add(1, 100 + r % 8, d)])
            assert st.apply_directive(d_, live) is None
    qsl = np.arange(requests + 1, dtype=np.int64) * tokens
    first = 100 - tokens // 2  # a prefill step straddles the directives' from_position; a decode step is past it
    positions = np.concatenate([np.arange(first, first + tokens) for _ in range(requests)]).astype(np.int64)
    req_index = {f"r{r}": r for r in range(requests)}
    return st, NonfiniteGuard(tables), req_index, qsl, positions


def step(st, guard, req_index, qsl, positions, count: bool) -> None:
    n = len(positions)
    if count:
        sources: dict = {}
        rows = st.rows_for_step(req_index, qsl, positions, n, sources)
        guard.note_step(rows, st.table.row_keys, sources)
    else:
        rows = st.rows_for_step(req_index, qsl, positions, n)
        guard.note_step(rows, st.table.row_keys)
    guard.after_step()
    _, _, steered = guard.collect()
    if count and steered:
        st.steered.add(steered)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="*", default=[64, 8])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 32], help="tokens per request per step (one per --requests)")
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200, help="steps per round and contender")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for requests, tokens in zip(args.requests, args.tokens):
        st, guard, req_index, qsl, positions = setup(requests, tokens, args.d_model)
        times = {False: [], True: []}
        for rnd in range(args.rounds):
            for count in ((False, True) if rnd % 2 else (True, False)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(st, guard, req_index, qsl, positions, count)
                times[count].append((time.perf_counter() - t0) / args.steps)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"{requests} requests x {tokens} tokens/step (every request under a policy, half also a directive): "
              f"host steering path {off * 1e6:.1f} us/step without counting, {on * 1e6:.1f} us/step with "
              f"(+{(on - off) * 1e6:.1f} us, {100 * (on / off - 1):+.0f} %)")
        print(f"    counted: policies {sum(st.steered.policies.values())} tokens, rules {sum(st.steered.rules.values())} tokens")


if __name__ == "__main__":
    main()
