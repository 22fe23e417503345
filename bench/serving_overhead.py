"""vLLM serving throughput with the featurewatch plugin off, loaded-idle and monitoring.

Engines for three configurations (``--replicas`` subprocesses each, engine in-process so an idle
engine costs no CPU, all pinned to the same core) serve the same offline workload in interleaved
rounds (rotating the order every round), so drifts in the machine's load hit all alike; a round's
figure for a configuration is the mean over its replicas, because two identical engine processes
already differ by a few percent:

* ``off``        — the plugin is not loaded (``VLLM_PLUGINS`` allowlists every other plugin);
* ``idle``       — the plugin is loaded, ``FEATUREWATCH_ADDRESS`` unset: no hooks;
* ``monitoring`` — hooks on 4 layers, every token of those 4 layers streamed to a sink gRPC
  server (in this process) that drains everything it receives; the sink offers a shared-memory
  ring as the sidecar does, so the activations go through it (the plugin's default path);
* ``monitoring_bytes`` — the same with ``FEATUREWATCH_SHM=0``: the activations as bytes on the
  gRPC stream;
* ``monitoring_stream`` — the ring, with its descriptors and requests on the gRPC stream instead of
  the ring's lane (``FEATUREWATCH_SHM_LANE=0``).
``--transport shm|bytes|both|lane`` picks the monitoring configurations (default both: monitoring
and monitoring_bytes; lane: monitoring and monitoring_stream).

Prints per-round tokens/s (wall clock, and per CPU-second of the engine process, which a shared
machine disturbs less), medians and the ratios to ``off`` (the goal on CPU is >= 97 %).

The default model is a random Llama, hidden 512, 16 layers, fp32, eager; 8 requests of 64 prompt
+ 32 generated tokens per round. The cost of monitoring is mostly moving the tapped rows (copy
out, serialise, send), so it scales with tapped layers / total layers and falls as the hidden size
grows: 4 of 8 layers of the same model costs about twice as much as 4 of 16.

    python bench/serving_overhead.py                    # ~6 minutes on 2 shared CPU cores
    python bench/serving_overhead.py --layers 8 --tap-layers 0,2,4,6 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --baseline: that engine imports the plugin from another checkout (an older commit's worktree)
sys.path.insert(0, os.environ.get("FEATUREWATCH_BENCH_ROOT") or str(ROOT))

CONFIGS = ("off", "idle", "monitoring", "monitoring_bytes", "monitoring_stream", "monitoring_baseline")


# ---------------------------------------------------------------- the engine side (subprocess)


def engine_main(args) -> None:
    cpus = os.environ.get("FEATUREWATCH_BENCH_CPUS")
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    import numpy as np
    from vllm import LLM, SamplingParams

    kwargs = dict(dtype=args.dtype, max_model_len=1024, max_num_batched_tokens=2048,
                  max_num_seqs=args.requests, kv_cache_memory_bytes=128 << 20, seed=0,
                  enforce_eager=not args.compile)
    llm = LLM(args.model, **kwargs)
    sp = SamplingParams(max_tokens=args.gen, temperature=0.0, ignore_eos=True)
    print("READY", flush=True)
    last: dict = {}
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        seed = int(cmd[1])
        rng = np.random.default_rng(seed)
        prompts = [{"prompt_token_ids": rng.integers(3, 300, size=args.prompt).tolist()}
                   for _ in range(args.requests)]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        n_all = n_out + args.prompt * args.requests
        status = {}
        if args.config.startswith("monitoring"):
            st = llm.collective_rpc("featurewatch_status")[0]
            status = {k: st["counters"][k] for k in (
                "batches_sent", "batches_dropped_queue_full", "batches_dropped_disconnected",
                "tokens_tapped", "host_seconds", "batches_sent_shm", "shm_ring_full", "steps")}
            # this round's forward-thread plugin time per step (the total includes start-up's
            # warm-up and self-test steps)
            d_host = status["host_seconds"] - last.get("host_seconds", 0.0)
            d_steps = status["steps"] - last.get("steps", 0)
            status["round_host_us_per_step"] = round(1e6 * d_host / max(1, d_steps), 1)
            last.update(host_seconds=status["host_seconds"], steps=status["steps"])
            status["connected"] = st["connected"]
            status["transport"] = st.get("transport")
        print("RESULT " + json.dumps({"seconds": dt, "cpu_seconds": dc, "output_tokens": n_out,
                                      "tokens_per_s": n_all / dt,
                                      "tokens_per_cpu_s": n_all / dc,
                                      "status": status}), flush=True)


# ---------------------------------------------------------------- the sink sidecar


class Sink:
    """Drains every stream. A plugin that says ``shm_capable`` gets a ring and its lane (created as
    the sidecar creates them, in ``ring_dir``) in its plan; a batch that names a slot is taken and
    let go at once, whether its descriptor came on the stream or on the lane."""

    def __init__(self, address: str, layers: list[int], ring_dir: str) -> None:
        import grpc

        from monitor.protocol import pb, pb_grpc
        from monitor.protocol.shm_ring import RingReader
        from monitor.receive.lane import LaneReader

        self.received_bytes = 0
        self.batches = 0
        self.shm_batches = 0
        self.lanes = 0
        sink = self

        class Servicer(pb_grpc.IngestServicer):
            def Stream(self, request_iterator, context):  # noqa: N802
                import queue

                out: queue.Queue = queue.Queue()
                ring: list = []
                lane: list = []

                def batch(b) -> None:
                    sink.batches += 1
                    if b.HasField("shm_slot"):
                        ref = b.shm_slot
                        ring[0].take(ref.slot, ref.sequence, b.step, ref.nbytes)  # freed at once
                        sink.shm_batches += 1
                        sink.received_bytes += ref.nbytes
                    else:
                        sink.received_bytes += len(b.activations.data)

                def read_lane() -> None:
                    import select

                    while not lane[0].closed:
                        select.select([lane[0].fileno()], [], [], 1.0)
                        for raw in lane[0].receive():
                            m = pb.PluginMessage.FromString(raw)
                            if m.WhichOneof("kind") == "batch":
                                batch(m.batch)

                def read():
                    try:
                        for m in request_iterator:
                            if m.WhichOneof("kind") == "lane_open":
                                lane[0].accept()
                                sink.lanes += 1
                                threading.Thread(target=read_lane, daemon=True).start()
                            elif m.WhichOneof("kind") == "hello":
                                plan = pb.TapPlan(layers=layers, steering_enabled=True, steering_failure_mode="open")
                                h = m.hello
                                if h.shm_capable:
                                    step = max(1, h.max_tokens_per_step) * len(layers) * h.d_model * 4
                                    ring.append(RingReader.create(ring_dir, 16, min(step, 16 << 20)))
                                    lane.append(LaneReader.create(ring[0].path))
                                    g = ring[0].geometry
                                    plan.shm_ring.CopyFrom(pb.ShmRing(path=g.path, slots=g.n_slots,
                                                                      slot_bytes=g.slot_bytes, nonce=g.nonce,
                                                                      lane=str(lane[0].path)))
                                out.put(pb.SidecarMessage(plan=plan))
                            elif m.WhichOneof("kind") == "batch":
                                batch(m.batch)
                    except grpc.RpcError:
                        pass
                    for r in ring + lane:
                        r.close()
                    out.put(None)

                threading.Thread(target=read, daemon=True).start()
                while True:
                    m = out.get()
                    if m is None:
                        return
                    yield m

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[
            ("grpc.max_receive_message_length", 512 << 20)])
        pb_grpc.add_IngestServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(address)
        self.server.start()


# ---------------------------------------------------------------- the driver


class EngineProc:
    def __init__(self, config: str, replica: int, args, env: dict, log_dir: str) -> None:
        self.config = config
        cmd = [sys.executable, __file__, "--engine", config, "--model", args.model,
               "--requests", str(args.requests), "--prompt", str(args.prompt),
               "--gen", str(args.gen), "--dtype", args.dtype]
        if args.compile:
            cmd.append("--compile")
        self.log = open(os.path.join(log_dir, f"{config}-{replica}.log"), "w")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)

    def wait_ready(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("READY"):
                return
        raise RuntimeError(f"engine {self.config} died; see {self.log.name}")

    def run(self, seed: int) -> dict:
        self.proc.stdin.write(f"run {seed}\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"engine {self.config} died; see {self.log.name}")

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--engine", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="model dir (default: build a random Llama)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tap-layers", default="0,4,8,12", help="hooked and streamed layers")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="torch.compile instead of eager")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each engine")
    ap.add_argument("--replicas", type=int, default=3, help="engine processes per configuration")
    ap.add_argument("--transport", choices=("shm", "bytes", "both", "lane"), default="both",
                    help="monitoring through the shared-memory ring, bytes on the stream, or both side by side; "
                         "lane: the ring with its lane and with the descriptors on the stream, side by side")
    ap.add_argument("--sink-cpus", choices=("other", "any"), default="other",
                    help="the sink's cores: those the engines do not use (default), or any (unpinned)")
    ap.add_argument("--baseline", metavar="CHECKOUT", default=None,
                    help="also run monitoring_baseline: the ring path with the plugin imported from "
                         "CHECKOUT (e.g. `git worktree add /tmp/old HEAD~1`), side by side with this one")
    args = ap.parse_args()
    if args.engine:
        args.config = args.engine
        return engine_main(args)

    # One OpenMP thread per engine: on a shared box, OpenMP barriers spin-wait whenever another
    # process holds a core, which swings throughput 10x between rounds whatever the plugin does.
    # All engines on the same core(s): they take turns, and no engine gets a quieter core.
    cpus = sorted(os.sched_getaffinity(0))[-args.threads:]
    # The sink (the sidecar's stand-in, in this process) on the other cores, as a sidecar container
    # with its own CPU: unpinned, a socket's wake-up puts it on the waker's core (the engine's).
    # Set before any thread starts, so every thread of this process inherits it.
    rest = sorted(set(os.sched_getaffinity(0)) - set(cpus))
    if args.sink_cpus == "other" and rest:
        os.sched_setaffinity(0, rest)
    tmp = tempfile.mkdtemp(prefix="fw_bench_")
    if args.model is None:
        from tests.plugin.tiny_model import build_tiny_llama

        args.model = str(build_tiny_llama(
            os.path.join(tmp, "model"), hidden_size=args.hidden, num_layers=args.layers,
            num_heads=args.hidden // 64, intermediate_size=3 * args.hidden,
            max_position_embeddings=1024))
    layers = [int(x) for x in args.tap_layers.split(",")]
    sock = f"unix://{tmp}/sink.sock"
    ring_dir = tempfile.mkdtemp(prefix="fw_bench_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    sink = Sink(sock, layers, ring_dir)
    configs = CONFIGS[:2] + {"shm": ("monitoring",), "bytes": ("monitoring_bytes",),
                             "both": ("monitoring", "monitoring_bytes"),
                             "lane": ("monitoring", "monitoring_stream")}[args.transport]
    if args.baseline:
        configs += ("monitoring_baseline",)
    base = dict(os.environ)
    for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME"):
        base[var] = os.path.join(tmp, var.lower())
    base.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_NO_USAGE_STATS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
                VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cpus)),
                FEATUREWATCH_BENCH_CPUS=",".join(map(str, cpus)))
    base.pop("FEATUREWATCH_ADDRESS", None)
    # "off" allowlists every general plugin but ours, so only featurewatch differs between configs
    from importlib.metadata import entry_points

    others = [e.name for e in entry_points(group="vllm.general_plugins")
              if e.name != "featurewatch"]
    base.pop("VLLM_PLUGINS", None)
    envs = {
        "off": {**base, "VLLM_PLUGINS": ",".join(others) or "none"},
        "idle": {**base},
        "monitoring": {**base, "FEATUREWATCH_ADDRESS": sock,
                       "FEATUREWATCH_LAYERS": args.tap_layers, "FEATUREWATCH_RUNTIME_DIR": tmp},
    }
    envs["monitoring_bytes"] = {**envs["monitoring"], "FEATUREWATCH_SHM": "0"}
    envs["monitoring_stream"] = {**envs["monitoring"], "FEATUREWATCH_SHM_LANE": "0"}
    if args.baseline:
        envs["monitoring_baseline"] = {**envs["monitoring"],
                                       "FEATUREWATCH_BENCH_ROOT": str(Path(args.baseline).resolve())}
    print(f"model {args.model} (hidden {args.hidden}, {args.layers} layers, {args.dtype}, "
          f"{'compile' if args.compile else 'eager'}); workload {args.requests} requests x "
          f"({args.prompt} prompt + {args.gen} generated) tokens; monitoring layers {layers}; "
          f"engines on cores {cpus}, the sink on {sorted(os.sched_getaffinity(0))}",
          flush=True)
    engines: dict[tuple[str, int], EngineProc] = {}
    try:
        for rep in range(args.replicas):
            # start one at a time (start-up is CPU-bound), rotating the order per replica: two
            # identical engine processes already differ by a few percent (allocation layout)
            k = rep % len(configs)
            for c in configs[k:] + configs[:k]:
                engines[c, rep] = EngineProc(c, rep, args, envs[c], tmp)
                engines[c, rep].wait_ready()
        for e in engines.values():  # warm-up round, not counted
            e.run(10_000)
        # per round and config: the mean over replicas (processes differ by a few % on their own)
        results: dict[str, list[dict]] = {c: [] for c in configs}
        per_engine: dict[tuple[str, int], list[float]] = {}
        keys = list(engines)
        for r in range(args.rounds):
            shift = r % len(keys)
            got: dict[str, list[dict]] = {c: [] for c in configs}
            for key in keys[shift:] + keys[:shift]:
                got[key[0]].append(engines[key].run(r))
                per_engine.setdefault(key, []).append(got[key[0]][-1]["tokens_per_s"])
            for c in configs:
                mean = {k: statistics.fmean(x[k] for x in got[c])
                        for k in ("tokens_per_s", "tokens_per_cpu_s")}
                results[c].append({**mean, "status": got[c][-1]["status"]})
            print(f"round {r:2d}: " + "  ".join(
                f"{c} {results[c][-1]['tokens_per_s']:7.1f} tok/s "
                f"({results[c][-1]['tokens_per_cpu_s']:7.1f}/cpu-s)" for c in configs), flush=True)
    finally:
        for e in engines.values():
            e.close()
    for key, unit in (("tokens_per_s", "tokens/s (wall)"),
                      ("tokens_per_cpu_s", "tokens per CPU-second of the engine process")):
        med = {c: statistics.median(x[key] for x in results[c]) for c in configs}
        paired = {c: statistics.median(a[key] / b[key]
                                       for a, b in zip(results[c], results["off"], strict=True))
                  for c in configs}
        print(f"\nmedian {unit}: " + "  ".join(f"{c} {med[c]:.1f}" for c in configs))
        for c in configs[1:]:
            print(f"{c:>10} / off: {100 * med[c] / med['off']:6.1f} % of medians, "
                  f"{100 * paired[c]:6.1f} % median of per-round ratios")
    print("\nmedian tokens/s (wall) of each engine process (replicas of one configuration differ by "
          "their own few %): " + "  ".join(
              f"{c}#{rep} {statistics.median(v):.1f}" for (c, rep), v in sorted(per_engine.items())))
    for c in configs[2:]:
        print(f"{c}: {results[c][-1]['status']}")
    print(f"sink received {sink.batches} batches ({sink.shm_batches} through the ring; {sink.lanes} lanes opened), "
          f"{sink.received_bytes / 2**20:.1f} MiB")
    sink.server.stop(None)


if __name__ == "__main__":
    main()
