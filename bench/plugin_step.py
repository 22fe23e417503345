"""The plugin's own work per step, on the forward thread and on the client thread, without vLLM.

Drives the real ``Runtime`` hooks (``pre_step`` → labels as the v1 runner adapter builds them →
``before_forward`` → ``after_forward``) with fake scheduler outputs and a fake runner, on the
serving bench's shapes (hidden 512, 4 hooked and tapped layers, CPU tap buffer, 8 requests of 64
prompt + 32 generated tokens: one prefill step, then decode steps), the activations going through
a real shared-memory ring; after each step the client thread's part (serialising the batch's
labels and descriptor) runs and the sink takes and frees the slot, timed separately. No model runs,
so these are the plugin's costs alone; bench/serving_overhead.py measures them against serving.

    python bench/plugin_step.py                  # per-step medians, forward thread and client
    python bench/plugin_step.py --profile        # cProfile of the forward-thread hooks
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.plugin import ops  # noqa: E402
from monitor.plugin.client import BatchItem  # noqa: E402
from monitor.plugin.config import PluginConfig  # noqa: E402
from monitor.plugin.patches import _v1_labels  # noqa: E402
from monitor.plugin.runtime import Runtime  # noqa: E402
from monitor.protocol import pb  # noqa: E402
from monitor.protocol.shm_ring import RingReader, RingWriter  # noqa: E402


class FakeRunner:
    """What ``_v1_labels`` reads off vLLM's GPUModelRunner (host-side numpy buffers)."""

    def __init__(self, max_reqs: int, max_tokens: int) -> None:
        self.input_batch = types.SimpleNamespace(num_reqs=0, req_ids=[],
                                                 num_computed_tokens_cpu=np.zeros(max_reqs, np.int32))
        self.query_start_loc = types.SimpleNamespace(np=np.zeros(max_reqs + 1, np.int32))
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int32)

    def set_step(self, req_ids: list[str], computed: list[int], counts: list[int]) -> None:
        ib = self.input_batch
        ib.num_reqs, ib.req_ids = len(req_ids), list(req_ids)
        ib.num_computed_tokens_cpu[: len(req_ids)] = computed
        self.query_start_loc.np[0] = 0
        self.query_start_loc.np[1: len(req_ids) + 1] = np.cumsum(counts)


def build(args, ring_dir: str):
    hooked = [int(x) for x in args.tap_layers.split(",")]
    tables = ops.SteerTables(num_layers=len(hooked), d_model=args.hidden, rows=8, clamps=2,
                             max_tokens=2048, device=torch.device("cpu"), dtype=torch.float32,
                             do_tap=True)
    vc = types.SimpleNamespace(parallel_config=types.SimpleNamespace(distributed_executor_backend="uni"))
    rt = Runtime(PluginConfig(address=f"unix://{ring_dir}/nowhere.sock"), vllm_config=vc, model_name="m",
                 d_model=args.hidden, num_layers=args.layers, hooked=hooked, tables=tables,
                 tp_rank=0, tp_size=1, pp_rank=0, engine="0")
    step_bytes = 2048 * len(hooked) * args.hidden * 4
    reader = RingReader.create(ring_dir, 16, min(step_bytes, 16 << 20))
    g = reader.geometry
    plan = pb.TapPlan(layers=hooked, steering_enabled=True, steering_failure_mode="open",
                      shm_ring=pb.ShmRing(path=g.path, slots=g.n_slots, slot_bytes=g.slot_bytes, nonce=g.nonce))
    rt.client.shm.writer = RingWriter.attach(g.path, g.n_slots, g.slot_bytes, g.nonce)
    rt.client.connected = True  # never started: the bench drains its queue itself
    rt._apply_ops([("plan", plan.SerializeToString())])
    return rt, reader


def drain(rt, reader) -> None:
    """The client thread's part for what the step queued, then the sink's take (freed at once)."""
    q = rt.client._q
    while not q.empty():
        item = q.get_nowait()
        if isinstance(item, BatchItem):
            for raw in item.messages(rt.client.max_batch_bytes):
                b = pb.PluginMessage.FromString(raw).batch if item.shm is not None else None
                if b is not None:
                    reader.take(b.shm_slot.slot, b.shm_slot.sequence, b.step, b.shm_slot.nbytes)
            rt.client._release(item)
        else:
            item.SerializeToString()


def one_round(rt, runner, reader, args, round_no: int, fwd: list, cli: list) -> None:
    rids = [f"r{round_no}-{i}" for i in range(args.requests)]
    new = [types.SimpleNamespace(req_id=r, sampling_params=types.SimpleNamespace(extra_args={}),
                                 prompt_token_ids=[1] * args.prompt, prompt_embeds=None,
                                 num_computed_tokens=0) for r in rids]
    for s in range(args.gen):
        prefill = s == 0
        so = types.SimpleNamespace(scheduled_new_reqs=new if prefill else [], finished_req_ids=set())
        counts = [args.prompt if prefill else 1] * len(rids)
        computed = [0 if prefill else args.prompt + s - 1] * len(rids)
        runner.set_step(rids, computed, counts)
        t0 = time.perf_counter()
        rt.pre_step(so)
        rt.before_forward(_v1_labels(runner, runner.input_ids))
        rt.after_forward()
        t1 = time.perf_counter()
        drain(rt, reader)
        t2 = time.perf_counter()
        if not prefill:
            fwd.append(t1 - t0)
            cli.append(t2 - t1)
    so = types.SimpleNamespace(scheduled_new_reqs=[], finished_req_ids=set(rids))
    rt.pre_step(so)
    drain(rt, reader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tap-layers", default="0,4,8,12")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ring_dir = tempfile.mkdtemp(prefix="fw_bench_", dir="/dev/shm")
    rt, reader = build(args, ring_dir)
    runner = FakeRunner(args.requests, 2048)
    fwd: list[float] = []
    cli: list[float] = []
    for r in range(5):  # warm-up
        one_round(rt, runner, reader, args, -1 - r, [], [])
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    for r in range(args.rounds):
        one_round(rt, runner, reader, args, r, fwd, cli)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    c = rt.counters
    print(f"decode steps {len(fwd)}: forward thread median {1e6 * statistics.median(fwd):.1f} us "
          f"(mean {1e6 * statistics.fmean(fwd):.1f}), client thread median {1e6 * statistics.median(cli):.1f} us; "
          f"batches {c.batches_enqueued}, tokens tapped {c.tokens_tapped}, shm full {c.shm_ring_full}")
    reader.close()


if __name__ == "__main__":
    main()
