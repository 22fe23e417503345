"""Ingest benchmark: sustained throughput and token-to-alert latency through the real sidecar.

    python bench/ingest.py [--d 2304] [--d-sae 16384] [--tokens 256] [--dtype fp32|bf16] [--rounds 3] [--seconds 4]

One run, side by side (this machine is shared and noisy, so compare within a run); batches are
wire-encoded by the real plugin's encoder and sent from a generator as the plugin's sender does:
  1. a null gRPC sink (same proto, same socket kinds) that only counts bytes: the transport ceiling;
  2. the real `featurewatch serve` process (SAE subset encode + probes + rules) over its Unix socket
     and over TCP loopback (activations as bytes on the gRPC stream), and over the Unix socket with
     the activations in the sidecar's shared-memory ring (`shm`: the sender copies each batch into a
     slot, as the plugin's forward thread does, and sends a descriptor on the ring's lane; `shm-s`:
     the descriptor on the gRPC stream instead; when every slot is in use it waits for one, where the
     plugin would drop the step), open loop at full speed: accepted GB/s,
     processed tokens/s, drops; 1 and 2 alternate for --rounds rounds and the medians are reported;
  2b. recording off vs on (`record:` at --record-sample, 5 % by default): the same sidecar config with
     and without the flight recorder, fed the same stream (requests finish as they end, so sampled
     requests are written as shards), over the Unix socket, interleaved in the same rounds;
  3. latency at nominal load (a fixed fraction of the measured capacity), with a planted feature in
     every batch: client-side send -> steering directive received (p50/p99), and the sidecar's own
     featurewatch_token_to_verdict_seconds histogram; over the bytes path and the ring, in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.protocol import pb  # noqa: E402
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction  # noqa: E402
from tests.support.plugin_client import PluginClient  # noqa: E402
from tests.support.sidecar import SidecarProcess, free_port, metric_value as metric  # noqa: E402


def write_bench_sae(path: Path, d: int, d_sae: int) -> Path:
    """A JumpReLU SAE at the benchmark size with the planted feature of the test fixtures."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    u = planted_direction(d)
    w_enc = rng.standard_normal((d, d_sae), dtype=np.float32) * np.float32(0.01)
    w_enc[:, PLANTED_FEATURE] = u
    w_dec = np.ascontiguousarray(w_enc.T)
    path.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": w_enc, "W_dec": w_dec, "b_enc": np.full(d_sae, -1.0, np.float32),
               "b_dec": np.zeros(d, np.float32), "threshold": np.full(d_sae, 0.5, np.float32)},
              str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": d, "d_sae": d_sae, "dtype": "float32",
                                               "apply_b_dec_to_input": False, "normalize_activations": "none"}))
    return path


def write_bench_probes(path: Path, d: int) -> Path:
    from monitor.encode import save_probes

    rng = np.random.default_rng(1)
    weight = np.stack([planted_direction(d)] + [rng.standard_normal(d).astype(np.float32) * 0.01 for _ in range(3)])
    save_probes(path, weight, np.full(4, -5.0, np.float32), names=["planted", "p1", "p2", "p3"], layer=1)
    return path


RULES = "rules:\n" + "".join(
    f"  - {{name: f{f}, signal: {{source: sae, feature: {f}}}, above: 2.0, scope: generated}}\n" for f in range(1, 16) if f != PLANTED_FEATURE
) + f"""  - name: planted
    signal: {{source: sae, feature: {PLANTED_FEATURE}}}
    above: 2.0
    actions: [{{alert: {{}}}}, {{steer: {{clamp: {{source: sae, feature: {PLANTED_FEATURE}, value: 0}}}}}}]
  - {{name: probe_count, signal: {{source: probes, probe: planted}}, above: 0.9, window: {{kind: count, n: 3}}}}
  - {{name: probe_ema, signal: {{source: probes, probe: p1}}, above: 0.9, window: {{kind: ema, alpha: 0.2}}}}
"""


WIRE_DTYPES = {"fp32": pb.FLOAT32, "bf16": pb.BFLOAT16}


def on_the_wire(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations as the plugin would send them (bf16: the raw 16-bit patterns)."""
    if dtype == "fp32":
        return x
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy()


class PluginShmSender:
    """The plugin's own shared-memory step, so the sender column measures the plugin's code: the
    rows copied into a slot (``monitor.plugin.shm_writer.write_step``, one copy) and the descriptor
    message (``BatchItem.messages``), sent on the ring's lane (``monitor.plugin.lane``, as the
    forward thread does) or, ``lane=False``, returned for the gRPC stream."""

    def __init__(self, ring: pb.ShmRing, lane: bool = True) -> None:
        from monitor.plugin.lane import LaneSender
        from monitor.protocol.shm_ring import RingWriter

        self.writer = RingWriter.attach(ring.path, ring.slots, ring.slot_bytes, ring.nonce)
        self.lane = LaneSender.connect(ring.lane) if lane and ring.lane else None

    def lane_open(self) -> pb.PluginMessage:
        """What the plugin sends on the stream before its first message on the lane."""
        return pb.PluginMessage(lane_open=pb.LaneOpen(lane=self.lane.path))

    def send(self, msg: bytes) -> None:
        """On the lane; when its buffer is full, wait (the plugin would drop the step)."""
        while self.lane.send(msg) == "full":
            time.sleep(0.0005)

    def batch(self, step: int, x: np.ndarray, request_ids, token_request, positions, generated) -> bytes | None:
        """The descriptor message of ``x`` [layers, tokens, d] written into a slot; None when every
        slot is in use (the plugin drops the step there; the bench waits and tries again)."""
        import torch

        from monitor.plugin.client import BatchItem
        from monitor.plugin.shm_writer import write_step

        src = torch.from_numpy(x)
        if x.dtype == np.int16:  # bf16 bit patterns (on_the_wire)
            src = src.view(torch.bfloat16)
        ref = write_step(self.writer, src, slice(0, src.shape[0]), src.shape[1], None, step)
        if ref is None:
            return None
        item = BatchItem(step=step, layers=[1], host=ref.rows, event=None, request_ids=request_ids,
                         token_request_index=token_request, positions=positions, is_generated=generated,
                         captured_unix_s=time.time(), shm=ref)
        return next(item.messages(0))


def make_batch(step: int, x: np.ndarray, n_requests: int, phase: str = "", steps_per_request: int = 64,
               fresh_last: bool = False, shm: PluginShmSender | None = None) -> bytes:
    """One model step: `n_requests` requests, each with an equal share of the step's tokens.
    A request lives `steps_per_request` steps (positions advance), then new ids take over;
    ids are unique per phase since re-sent (request, position) pairs are deduplicated.
    `fresh_last`: the last request is new in every step (rules fire once per request).
    Wire-encoded as the real plugin does it (`monitor.plugin.client.encode_batch`)."""
    n = x.shape[1]
    per = n // n_requests
    generation, offset = divmod(step, steps_per_request)
    rids = [f"{phase}-{generation}-{i}" for i in range(n_requests)]
    if fresh_last:
        rids[-1] = f"{phase}-step{step}"
    positions = offset * per + np.tile(np.arange(per), n_requests)
    dtype = pb.FLOAT32 if x.dtype == np.float32 else pb.BFLOAT16
    if shm is not None:  # into a ring slot; a descriptor on the stream (wait for a free slot)
        token_request, generated = np.repeat(np.arange(n_requests), per), np.ones(n, dtype=bool)
        while (msg := shm.batch(step, x, rids, token_request, positions, generated)) is None:
            time.sleep(0.0005)
        return msg
    return PluginClient.encoded_batch(step, [1], x, rids, np.repeat(np.arange(n_requests), per), positions, [True] * n,
                                      dtype=dtype)


def run_sink(port_q, socket_path: str) -> None:
    """A null Ingest server: receive the raw messages, count their bytes, discard (the transport
    ceiling: gRPC's own cost of moving the bytes, without any of featurewatch's)."""
    import grpc

    async def stream(request_iterator, context):
        n = 0
        async for raw in request_iterator:
            n += len(raw)
        yield pb.SidecarMessage(ack=pb.Ack(step=n))

    async def main():
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 28)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("featurewatch.v1.Ingest", {
            "Stream": grpc.stream_stream_rpc_method_handler(stream, response_serializer=pb.SidecarMessage.SerializeToString)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def blast(address: str, d: int, seconds: float, make, payload: int, shm: bool = False, lane: bool = True) -> dict:
    """Send ``make(step)`` batches on one Ingest stream as fast as gRPC takes them, for ``seconds``.
    ``payload``: activation bytes per batch. ``shm``: ask for the sidecar's ring and call
    ``make(step, sender)`` with it (the descriptors then carry no activation bytes); they go on
    the ring's lane unless ``lane`` is false (then on the stream).

    The requests are a generator consumed by gRPC's own thread, as in the real plugin's sender
    (``monitor.plugin.client``), so the load generator costs as little as the sidecar lets it."""
    import threading

    import grpc

    from monitor.plugin.client import serialize_message

    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 28),
                                                      ("grpc.max_receive_message_length", 1 << 28)])
    stream = channel.stream_stream("/featurewatch.v1.Ingest/Stream", request_serializer=serialize_message,
                                   response_deserializer=pb.SidecarMessage.FromString)
    hello = pb.PluginMessage(hello=pb.Hello(model_name="bench", d_model=d, available_layers=[1], dtype=pb.FLOAT32,
                                            plugin_version="bench", engine="0", max_tokens_per_step=8192,
                                            shm_capable=shm))
    sent = {"batches": 0, "bytes": 0}
    planned = threading.Event()
    ring: list = []
    start, cpu = time.perf_counter(), time.process_time()

    def requests():
        yield hello
        if shm:
            if not planned.wait(30) or not ring:
                raise RuntimeError("the sidecar announced no shared-memory ring")
            sender = PluginShmSender(ring[0], lane)
            if sender.lane is not None:
                yield sender.lane_open()
        while time.perf_counter() - start < seconds:
            sent["batches"] += 1
            msg = make(sent["batches"], sender) if shm else make(sent["batches"])
            if isinstance(msg, list):  # control messages (request finishes) before the batch
                yield from msg[:-1]
                msg = msg[-1]
            sent["bytes"] += payload
            if shm and sender.lane is not None:
                sender.send(msg)
            else:
                yield msg

    for m in stream(requests()):  # plan, acks; ends when the server closes after our half-close
        if m.HasField("plan") and not planned.is_set():
            if m.plan.HasField("shm_ring"):
                ring.append(m.plan.shm_ring)
            planned.set()
    channel.close()
    return {**sent, "seconds": time.perf_counter() - start, "sender_cpu_s_per_gb": (time.process_time() - cpu) / (sent["bytes"] / 1e9)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sink:
    """The null server in its own process, on a Unix socket and a TCP port."""

    def __init__(self, tmp: Path) -> None:
        q = mp.Queue()
        sock = str(tmp / "sink.sock")
        self.proc = mp.Process(target=run_sink, args=(q, sock), daemon=True)
        self.proc.start()
        port = q.get(timeout=30)
        self.addresses = {"unix": f"unix://{sock}", "tcp": f"127.0.0.1:{port}"}

    def throughput(self, path: str, d: int, x: np.ndarray, seconds: float, n_requests: int) -> tuple[float, float]:
        """(bytes/s, CPU-seconds of the sink per GB)."""
        cpu = cpu_seconds(self.proc.pid)
        r = blast(self.addresses[path], d, seconds, lambda step: make_batch(step, x, n_requests), x.nbytes)
        return r["bytes"] / r["seconds"], (cpu_seconds(self.proc.pid) - cpu) / (r["bytes"] / 1e9)

    def close(self) -> None:
        self.proc.terminate()


def sender_steps(x: np.ndarray, n_requests: int, directory: Path, steps: int = 300) -> dict[str, float]:
    """CPU-seconds per GB of the plugin's per-step sender work alone (this process, no gRPC, no
    sidecar; a slot is freed right after each step, outside the timing), side by side:
    ``bytes``: the rows cloned off the tap buffer and wire-encoded (``BatchItem.messages``);
    ``shm``: ``write_step`` (numpy, one copy into the slot) and the descriptor message;
    ``shm torch copy_ (k threads)``: the same with the slot filled by torch ``copy_`` at k intra-op
    threads, as the plugin did before (vLLM-CPU runs torch at one thread per core)."""
    import torch

    from monitor.plugin.client import BatchItem
    from monitor.plugin.shm_writer import SlotRef, write_step
    from monitor.protocol.shm_ring import RingReader, RingWriter

    src = torch.from_numpy(x)
    if x.dtype == np.int16:
        src = src.view(torch.bfloat16)
    n = src.shape[1]
    per = n // n_requests
    labels = dict(request_ids=[f"r{i}" for i in range(n_requests)], token_request_index=np.repeat(np.arange(n_requests), per),
                  positions=np.arange(n), is_generated=np.ones(n, dtype=bool))
    reader = RingReader.create(directory, 8, x.nbytes)
    g = reader.geometry
    writer = RingWriter.attach(g.path, g.n_slots, g.slot_bytes, g.nonce)

    def item(step, host, ref=None):
        return BatchItem(step=step, layers=[1], host=host, event=None, captured_unix_s=time.time(), shm=ref, **labels)

    def bytes_step(step):
        for _ in item(step, src[0:1, :n].clone()).messages(0):
            pass

    def shm_step(step):
        ref = write_step(writer, src, slice(0, 1), n, None, step)
        next(item(step, ref.rows, ref).messages(0))
        return ref

    def torch_step(step):
        slot, seq, buf = writer.acquire(x.nbytes)
        dst = torch.from_numpy(buf).view(src.dtype).view(1, n, src.shape[2])
        dst.copy_(src[0:1, :n])
        writer.publish(slot, seq, step, x.nbytes)
        ref = SlotRef(writer, slot, seq, x.nbytes, dst)
        next(item(step, dst, ref).messages(0))
        return ref

    threads = torch.get_num_threads()
    cases = [("bytes", bytes_step, threads), ("shm", shm_step, threads)] + [
        (f"shm torch copy_ ({k} thread{'s' if k > 1 else ''})", torch_step, k) for k in sorted({1, os.cpu_count() or 1})]
    out = {}
    for name, fn, k in cases:
        torch.set_num_threads(k)
        cpu = 0.0
        for step in range(steps + 20):
            t = time.process_time()  # the process: torch's intra-op threads count too
            ref = fn(step)
            if step >= 20:  # warm-up steps not counted
                cpu += time.process_time() - t
            if ref is not None:  # the sidecar's side: take the slot and let it go (frees it)
                reader.take(ref.slot, ref.sequence, step, ref.nbytes)  # the view's finaliser frees it at once
        out[name] = cpu / (steps * x.nbytes / 1e9)
    torch.set_num_threads(threads)
    reader.close()
    return out


def pipeline_only(config: dict, d: int, x: np.ndarray, n_requests: int, batches: int = 200) -> float:
    """Tokens/s of parse + decode + encode + evaluate + export on one thread, no transport (the
    ceiling of the sidecar's single pipeline thread)."""
    import torch

    from monitor.config import SidecarConfig
    from monitor.receive.batch import decode_batch
    from monitor.receive.wire import parse_plugin_message
    from monitor.sidecar import Sidecar

    torch.set_num_threads(1)
    cfg = SidecarConfig.model_validate({**config, "socket": None, "grpc_port": None, "metrics_port": None})
    sidecar = Sidecar(cfg)
    raw = [make_batch(i, x, n_requests, "inproc") for i in range(batches)]
    start = time.perf_counter()
    for r in raw:
        m, data = parse_plugin_message(r)
        sidecar.pipeline.process(decode_batch(m.batch, d, {1}, 1 << 30, 1 << 20, data), None, lambda stream, directive: True)
    elapsed = time.perf_counter() - start
    sidecar.events.close()
    return batches * x.shape[1] / elapsed


def histogram_quantile(before: str, after: str, name: str, q: float) -> float:
    """The bucket bound holding quantile q of the observations made between two scrapes."""
    def buckets(text):
        out = {}
        for line in text.splitlines():
            if line.startswith(name + "_bucket"):
                le = line.split('le="')[1].split('"')[0]
                out[float("inf") if le == "+Inf" else float(le)] = float(line.split("#")[0].split()[-1])
        return out
    b0, b1 = buckets(before), buckets(after)
    buckets = sorted((le, n - b0.get(le, 0.0)) for le, n in b1.items())
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= q * total:
            return le
    return float("nan")


def with_finishes(step: int, batch: bytes, n_requests: int, phase: str, steps_per_request: int = 64):
    """``batch``, preceded by the RequestFinish of the previous generation's requests when a new one
    starts (the recorder writes a request when it finishes)."""
    generation, offset = divmod(step, steps_per_request)
    if offset or not generation:
        return batch
    return [pb.PluginMessage(request_finish=pb.RequestFinish(request_id=f"{phase}-{generation - 1}-{i}", finish_reason="length"))
            for i in range(n_requests)] + [batch]


def sidecar_throughput(sc: SidecarProcess, address: str, d: int, x: np.ndarray, seconds: float, n_requests: int,
                       finishes: bool = False, shm: bool = False, lane: bool = True) -> dict:
    phase = f"blast{time.monotonic_ns()}"
    before = sc.metrics()
    cpu = cpu_seconds(sc.proc.pid)
    start = time.perf_counter()
    if finishes:
        r = blast(address, d, seconds, lambda step: with_finishes(step, make_batch(step, x, n_requests, phase), n_requests, phase),
                  x.nbytes)
    elif shm:
        r = blast(address, d, seconds, lambda step, sender: make_batch(step, x, n_requests, phase, shm=sender), x.nbytes,
                  shm=True, lane=lane)
    else:
        r = blast(address, d, seconds, lambda step: make_batch(step, x, n_requests, phase), x.nbytes)
    # Wait for the queue to drain so "processed" counts everything accepted.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = sc.metrics()
        handled = metric(text, "featurewatch_batches_received_total") - metric(before, "featurewatch_batches_received_total")
        if handled >= r["batches"] and metric(text, "featurewatch_queue_depth", stage="encode") == 0:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(sc.proc.pid) - cpu
    tokens = metric(text, "featurewatch_tokens_processed_total") - metric(before, "featurewatch_tokens_processed_total")
    accepted = metric(text, "featurewatch_received_bytes_total") - metric(before, "featurewatch_received_bytes_total")
    dropped = metric(text, "featurewatch_batches_dropped_total") - metric(before, "featurewatch_batches_dropped_total")
    recorded = {k: metric(text, f"featurewatch_record_{k}") - metric(before, f"featurewatch_record_{k}")
                for k in ("requests_total", "tokens_total", "bytes_written_total", "batches_dropped_total",
                          "requests_dropped_total")}
    return {"sent_gbps": r["bytes"] / elapsed / 1e9, "accepted_gbps": accepted / elapsed / 1e9, "tokens_per_s": tokens / elapsed,
            "batches": r["batches"], "dropped": int(dropped), "cpu_s_per_gb": cpu / (accepted / 1e9),
            "sender_cpu_s_per_gb": r["sender_cpu_s_per_gb"], "recorded": recorded}


def latency(sc: SidecarProcess, d: int, x: np.ndarray, tokens_per_s: float, seconds: float, n_requests: int,
            wire: str = "fp32", shm: bool = False, lane: bool = True) -> dict:
    """Paced load with a planted generated token in every batch; time send -> directive back."""
    before = sc.metrics()
    client = PluginClient(sc.socket_address, d, layers=[1], shm_capable=shm)
    plan = client.plan(timeout=30)
    sender = PluginShmSender(plan.shm_ring, lane) if shm else None
    if sender is not None and sender.lane is not None:
        client.send(sender.lane_open().SerializeToString())
    xp = x.copy()
    xp[0, -1] += 10 * planted_direction(d)  # the last token of the last request of every batch
    xp = on_the_wire(xp, wire)
    interval = x.shape[1] / tokens_per_s
    sent_at: dict[str, float] = {}
    start = time.perf_counter()
    step = 0
    while time.perf_counter() - start < seconds:
        step += 1
        phase = ("latency-shm" if lane else "latency-shm-s") if shm else "latency"
        t0 = time.perf_counter()
        msg = make_batch(step, xp, n_requests, phase, fresh_last=True, shm=sender)  # one verdict per batch
        sent_at[f"{phase}-step{step}"] = t0  # from before the copy into the slot (bytes: before the send)
        if sender is not None and sender.lane is not None:
            sender.send(msg)
        else:
            client.send(msg)
        next_at = start + step * interval
        time.sleep(max(0.0, next_at - time.perf_counter()))
    deadline = time.monotonic() + 30
    while len(client.directives()) < step and time.monotonic() < deadline:
        time.sleep(0.05)
    lat = [t - sent_at[m.directive.request_id] for m, t in client.arrivals()
           if m.HasField("directive") and m.directive.request_id in sent_at]
    client.close()
    lat_ms = np.array(lat) * 1e3
    text = sc.metrics()
    return {"offered_tokens_per_s": tokens_per_s, "batches": step, "directives": len(lat),
            "p50_ms": float(np.percentile(lat_ms, 50)) if lat else float("nan"),
            "p99_ms": float(np.percentile(lat_ms, 99)) if lat else float("nan"),
            "sidecar_verdict_p99_le_s": histogram_quantile(before, text, "featurewatch_token_to_verdict_seconds", 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per batch (one model step)")
    ap.add_argument("--requests", type=int, default=16, help="requests per batch")
    ap.add_argument("--seconds", type=float, default=4.0, help="per phase")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved sink/sidecar rounds (medians reported)")
    ap.add_argument("--dtype", choices=sorted(WIRE_DTYPES), default="fp32", help="activation dtype on the wire")
    ap.add_argument("--nominal", type=float, default=0.5, help="latency phase load as a fraction of measured capacity")
    ap.add_argument("--latency-load", type=float, default=None, metavar="TOKENS_PER_S",
                    help="latency phase load in tokens/s instead (e.g. half the capacity measured in another run)")
    ap.add_argument("--latency-only", action="store_true", help="skip the throughput rounds (needs --latency-load)")
    ap.add_argument("--record-sample", type=float, default=0.05, help="record.sample of the recording-on sidecar")
    ap.add_argument("--no-record", action="store_true", help="skip the recording off/on comparison")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fw-bench-"))
    x32 = (np.random.default_rng(2).standard_normal((1, args.tokens, args.d)) * 0.05).astype(np.float32)
    x = on_the_wire(x32, args.dtype)
    mb = x.nbytes / 2**20
    print(f"# featurewatch ingest bench: d={args.d} d_sae={args.d_sae} batch={args.tokens} tokens ({mb:.2f} MiB {args.dtype}), "
          f"{args.requests} requests/batch, {args.rounds} rounds of {args.seconds:.0f}s per phase")
    sae = write_bench_sae(tmp / "sae", args.d, args.d_sae)
    probes = write_bench_probes(tmp / "probes.safetensors", args.d)
    (tmp / "rules.yaml").write_text(RULES)
    config = {"model_name": "bench", "socket": str(tmp / "fw.sock"), "grpc_port": free_port(), "metrics_port": free_port(),
              "metrics_host": "127.0.0.1", "rules_file": str(tmp / "rules.yaml"), "encode_threads": 1,
              "sources": [{"name": "sae", "kind": "sae", "layer": 1, "path": str(sae)},
                          {"name": "probes", "kind": "probes", "layer": 1, "path": str(probes)}]}
    senders = sender_steps(x, args.requests, tmp)  # before pipeline_only, which sets torch to one thread
    inproc = pipeline_only(config, args.d, x, args.requests)
    sink = Sink(tmp)
    # shm: the activations in the ring, descriptors on its lane (the plugin's default); shm-s: the
    # ring with the descriptors on the gRPC stream (FEATUREWATCH_SHM_LANE=0)
    paths = ("unix", "tcp", "shm", "shm-s")
    rounds = []
    recording = None
    if not args.no_record and not args.latency_only:
        (tmp / "rec").mkdir()
        rec_config = {**config, "socket": str(tmp / "rec" / "fw.sock"), "grpc_port": free_port(), "metrics_port": free_port(),
                      "record": {"dir": str(tmp / "rec" / "recording"), "sample": args.record_sample,
                                 "max_bytes": 2 << 30, "flush_interval_s": 0.5}}  # shards written within each phase
        recording = SidecarProcess(tmp / "rec", rec_config).start()
    try:
        with SidecarProcess(tmp, config) as sc:
            addresses = {"unix": sc.socket_address, "tcp": sc.tcp_address}
            for _ in range(0 if args.latency_only else args.rounds):  # interleaved, so drifts in machine load hit both sides alike
                row = {}
                for path in paths:
                    if path.startswith("shm"):  # no null sink for the ring: compare with the pipeline alone
                        row[f"sink_{path}"] = row[f"sink_cpu_{path}"] = float("nan")
                        row[path] = sidecar_throughput(sc, sc.socket_address, args.d, x, args.seconds, args.requests,
                                                       shm=True, lane=path == "shm")
                        continue
                    row[f"sink_{path}"], row[f"sink_cpu_{path}"] = sink.throughput(path, args.d, x, args.seconds, args.requests)
                    row[path] = sidecar_throughput(sc, addresses[path], args.d, x, args.seconds, args.requests)
                if recording is not None:  # the same stream, requests finishing, to the sidecar without and with record:
                    row["record_off"] = sidecar_throughput(sc, sc.socket_address, args.d, x, args.seconds, args.requests, True)
                    row["record_on"] = sidecar_throughput(recording, recording.socket_address, args.d, x, args.seconds,
                                                          args.requests, True)
                rounds.append(row)
            capacity = float(np.median([r["unix"]["tokens_per_s"] for r in rounds])) if rounds else float("nan")
            load = args.latency_load if args.latency_load else capacity * args.nominal
            lat = latency(sc, args.d, x32, load, args.seconds, args.requests, args.dtype)
            lat_shm = latency(sc, args.d, x32, load, args.seconds, args.requests, args.dtype, shm=True)
            lat_shm_stream = latency(sc, args.d, x32, load, args.seconds, args.requests, args.dtype, shm=True, lane=False)
    finally:
        if recording is not None:
            recording.stop()
    sink.close()

    if rounds:
        report_rounds(rounds, paths, inproc, capacity, args, x)
        if recording is not None:
            report_recording(rounds, args)
    print("\nthe plugin's sender work per step alone (this process, no gRPC or sidecar), CPU-s/GB: "
          + ", ".join(f"{name} {v:.3f}" for name, v in senders.items()))
    for name, r in (("unix socket, bytes", lat), ("shm ring, descriptors on its lane", lat_shm),
                    ("shm ring, descriptors on the stream", lat_shm_stream)):
        print(f"\nlatency at {r['offered_tokens_per_s']:.0f} tokens/s offered ({name}): "
              f"batch built -> steering directive p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms "
              f"({r['directives']}/{r['batches']} directives); sidecar token_to_verdict p99 <= "
              f"{r['sidecar_verdict_p99_le_s'] * 1e3:.1f} ms")


def report_rounds(rounds, paths, inproc, capacity, args, x) -> None:
    print(f"\n{'round':<6} {'path':<5} {'sink GB/s':>10} {'sidecar accepted GB/s':>22} {'ratio':>6} {'tokens/s':>10} "
          f"{'dropped':>10} {'CPU s/GB sink':>14} {'sidecar':>8} {'sender':>7}")
    for i, row in enumerate(rounds, 1):
        for path in paths:
            r, ceiling = row[path], row[f"sink_{path}"]
            print(f"{i:<6} {path:<5} {ceiling / 1e9:>10.2f} {r['accepted_gbps']:>22.2f} {r['accepted_gbps'] * 1e9 / ceiling:>6.2f} "
                  f"{r['tokens_per_s']:>10.0f} {r['dropped']:>5}/{r['batches']:<4} {row[f'sink_cpu_{path}']:>14.2f} {r['cpu_s_per_gb']:>8.2f} {r['sender_cpu_s_per_gb']:>7.2f}")
    for path in paths:
        med = lambda f: float(np.median([f(row) for row in rounds]))  # noqa: E731
        print(f"median {path:<5} {med(lambda r: r[f'sink_{path}']) / 1e9:>10.2f} {med(lambda r: r[path]['accepted_gbps']):>22.2f} "
              f"{med(lambda r: r[path]['accepted_gbps'] * 1e9 / r[f'sink_{path}']):>6.2f} {med(lambda r: r[path]['tokens_per_s']):>10.0f} "
              f"{'':>10} {med(lambda r: r[f'sink_cpu_{path}']):>14.2f} {med(lambda r: r[path]['cpu_s_per_gb']):>8.2f} "
              f"{med(lambda r: r[path]['sender_cpu_s_per_gb']):>7.2f}")
    print("CPU s/GB: CPU-seconds the receiving process spent per GB accepted (1 / the GB/s one core would carry);"
          " less sensitive to other load on the machine than GB/s. sender: the load generator, which encodes and"
          " sends as the plugin does (its cost inside vLLM's process)")
    print(f"pipeline alone (one thread, no transport): {inproc:.0f} tokens/s = {inproc * args.d * x.itemsize / 1e9:.2f} GB/s {args.dtype}; "
          f"the sidecar reached (median) " + ", ".join(
              f"{path} {float(np.median([row[path]['tokens_per_s'] for row in rounds])) / inproc:.2f}" for path in paths)
          + " of it. shm: descriptors on the ring's lane, shm-s: on the gRPC stream; neither has a null sink (ratio nan);"
          " their sender waits for a free slot where the plugin would drop")

def report_recording(rounds, args) -> None:
    print(f"\nrecording off vs on (record.sample {args.record_sample}, unix socket, requests finishing every 64 steps)")
    print(f"{'round':<6} {'off GB/s':>9} {'on GB/s':>8} {'ratio':>6} {'off tokens/s':>13} {'on tokens/s':>12} "
          f"{'recorded req':>13} {'tokens':>8} {'MB written':>11} {'rec. dropped batches/requests':>30} {'CPU s/GB off':>13} {'on':>5}")
    for i, row in enumerate(rounds, 1):
        off, on = row["record_off"], row["record_on"]
        rec = on["recorded"]
        print(f"{i:<6} {off['accepted_gbps']:>9.2f} {on['accepted_gbps']:>8.2f} {on['accepted_gbps'] / off['accepted_gbps']:>6.2f} "
              f"{off['tokens_per_s']:>13.0f} {on['tokens_per_s']:>12.0f} {rec['requests_total']:>13.0f} {rec['tokens_total']:>8.0f} "
              f"{rec['bytes_written_total'] / 1e6:>11.1f} {rec['batches_dropped_total']:>20.0f}/{rec['requests_dropped_total']:<9.0f} "
              f"{off['cpu_s_per_gb']:>13.2f} {on['cpu_s_per_gb']:>5.2f}")
    med = lambda f: float(np.median([f(row) for row in rounds]))  # noqa: E731
    print(f"median {med(lambda r: r['record_off']['accepted_gbps']):>9.2f} {med(lambda r: r['record_on']['accepted_gbps']):>8.2f} "
          f"{med(lambda r: r['record_on']['accepted_gbps'] / r['record_off']['accepted_gbps']):>6.2f} "
          f"{med(lambda r: r['record_off']['tokens_per_s']):>13.0f} {med(lambda r: r['record_on']['tokens_per_s']):>12.0f}  "
          f"(tokens/s ratio {med(lambda r: r['record_on']['tokens_per_s'] / r['record_off']['tokens_per_s']):.2f}; sidecar CPU s/GB "
          f"off {med(lambda r: r['record_off']['cpu_s_per_gb']):.2f}, on {med(lambda r: r['record_on']['cpu_s_per_gb']):.2f}: "
          f"one core would carry {med(lambda r: r['record_off']['cpu_s_per_gb'] / r['record_on']['cpu_s_per_gb']):.2f} of the "
          f"throughput with recording on)")


if __name__ == "__main__":
    main()
