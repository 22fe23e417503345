"""Host side of steering: the steering table's rows and clamp slots, per-request state, policies.

Only the forward thread mutates this state, at step boundaries (directives and plans arrive on the
gRPC thread as queued ops and are applied "from the next step on"). A *program* is a set of
actions (clamps and added directions on hooked layers); identical programs share one table row,
identical clamps share one clamp slot, so an always-on policy costs one row however many requests
it matches. A request's steering is a list of segments ``(from_position, row)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.plugin.ops import SteerTables
from monitor.protocol import pb

logger = logging.getLogger("vllm.featurewatch")

PRIVATE_KEY = "_featurewatch"  # our key in SamplingParams.extra_args (never sent as metadata)
_NOT_METADATA = {PRIVATE_KEY, "kv_transfer_params", "ec_transfer_params"}


# ---------------------------------------------------------------- metadata and ids


def flat_metadata(extra_args: dict | None) -> dict[str, str]:
    """``vllm_xargs`` as the proto's ``map<string,string>``: strings as they are, everything else
    (numbers, booleans, lists) JSON-encoded."""
    out: dict[str, str] = {}
    for k, v in (extra_args or {}).items():
        if k in _NOT_METADATA:
            continue
        out[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


def selector_matches(selector: dict[str, str], metadata: dict[str, str]) -> bool:
    return all(metadata.get(k) == v for k, v in selector.items())


def api_request_id(internal_id: str, external_id: str | None = None) -> str:
    """The id the client sees. vLLM's internal id is the external id plus ``-`` and 8 random hex
    characters; the completions endpoint's external id adds ``-<prompt index>`` to the response
    id (``cmpl-<X-Request-Id>-0-1a2b3c4d`` → ``cmpl-<X-Request-Id>``)."""
    base = external_id or internal_id
    head, sep, tail = base.rpartition("-")
    if not external_id and sep and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail):
        base = head
    if base.startswith("cmpl-"):
        head, sep, tail = base.rpartition("-")
        if sep and tail.isdigit() and head != "cmpl":
            base = head
    return base


# ---------------------------------------------------------------- actions


def tensor_to_vector(t: pb.Tensor, d_model: int, what: str) -> np.ndarray:
    shape = list(t.shape)
    n = int(np.prod(shape)) if shape else 0
    if t.dtype in (pb.FLOAT32, pb.DTYPE_UNSPECIFIED):
        arr = np.frombuffer(t.data, dtype="<f4")
    elif t.dtype == pb.FLOAT16:
        arr = np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    elif t.dtype == pb.BFLOAT16:
        bits = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        arr = bits.view(np.float32)
    else:
        raise ValueError(f"{what}: unsupported dtype {t.dtype}")
    if arr.size != d_model or (shape and n != d_model):
        raise ValueError(f"{what}: expected {d_model} values, got shape {shape} / {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: non-finite values")
    return np.array(arr, dtype=np.float32)


def _digest(*parts: bytes | str | float) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str):
            p = p.encode()
        elif isinstance(p, float):
            p = np.float32(p).tobytes()
        h.update(p)
        h.update(b"\x00")
    return h.hexdigest()[:24]


@dataclass(frozen=True, eq=False)
class ClampAction:
    layer: int
    encoder: np.ndarray
    bias: float
    threshold: float
    decoder: np.ndarray
    value: float
    gate_encoder: np.ndarray | None
    gate_bias: float
    feature: int = 0
    source: str = ""
    key: str = ""

    @property
    def kind(self) -> str:
        return "clamp"


@dataclass(frozen=True, eq=False)
class AddAction:
    layer: int
    vector: np.ndarray  # scale * direction
    key: str = ""

    @property
    def kind(self) -> str:
        return "add"


Action = ClampAction | AddAction


def parse_action(a: pb.SteeringAction, d_model: int) -> Action:
    which = a.WhichOneof("kind")
    if which == "clamp":
        c = a.clamp
        enc = tensor_to_vector(c.encoder, d_model, "clamp.encoder")
        dec = tensor_to_vector(c.decoder, d_model, "clamp.decoder")
        gate = (
            tensor_to_vector(c.gate_encoder, d_model, "clamp.gate_encoder")
            if len(c.gate_encoder.data)
            else None
        )
        key = _digest("clamp", str(a.layer), enc.tobytes(), float(c.bias), float(c.threshold),
                      dec.tobytes(), float(c.value),
                      b"" if gate is None else gate.tobytes(), float(c.gate_bias))
        return ClampAction(a.layer, enc, float(c.bias), float(c.threshold), dec, float(c.value),
                           gate, float(c.gate_bias), c.feature, c.source, key)
    if which == "add":
        vec = tensor_to_vector(a.add.direction, d_model, "add.direction") * np.float32(a.add.scale)
        key = _digest("add", str(a.layer), vec.tobytes())
        return AddAction(a.layer, vec.astype(np.float32), key)
    raise ValueError("steering action without clamp or add")


def program_key(actions: tuple[Action, ...]) -> str:
    return _digest(*sorted(a.key for a in actions)) if actions else ""


def policy_hash(policy: pb.SteeringPolicy) -> str:
    return _digest("policy", policy.name,
                   *[a.SerializeToString(deterministic=True) for a in policy.actions])


# ---------------------------------------------------------------- the table


class TableFull(Exception):
    pass


class SteeringTable:
    """Allocates rows and clamp slots of :class:`SteerTables` and writes them."""

    def __init__(self, tables: SteerTables, hooked_layers: list[int]) -> None:
        self.t = tables
        self.slot_of_layer = {layer: i for i, layer in enumerate(hooked_layers)}
        # host mirrors, flushed to the device between steps (on CPU they are the tables)
        names = ("row_on", "active", "add", "encg", "bias", "thr", "gbias", "val", "dec")
        self.host = {
            n: (getattr(tables, n).cpu().clone() if tables.on_device else getattr(tables, n))
            for n in names
        }
        self.dirty: set[tuple[str, int, int]] = set()
        self.rows: dict[str, list] = {}  # program key -> [row, refcount]
        self.free_rows = list(range(tables.rows - 1, 0, -1))
        self.clamps: list[dict[str, list]] = [{} for _ in hooked_layers]  # key -> [slot, refs]
        self.free_clamps = [list(range(tables.clamps - 1, -1, -1)) for _ in hooked_layers]

    @property
    def rows_in_use(self) -> int:
        return len(self.rows)

    def _write(self, name: str, layer_slot: int, index: int, value) -> None:
        self.host[name][layer_slot, index] = value
        if self.t.on_device:
            self.dirty.add((name, layer_slot, index))

    def flush(self) -> None:
        """Copy changed entries to the device (stream-ordered before the next forward)."""
        if not self.dirty:
            return
        for name, ls, idx in self.dirty:
            getattr(self.t, name)[ls, idx].copy_(self.host[name][ls, idx], non_blocking=False)
        self.dirty.clear()

    def _acquire_clamp(self, ls: int, c: ClampAction) -> int:
        entry = self.clamps[ls].get(c.key)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        if not self.free_clamps[ls]:
            raise TableFull(f"no free clamp slot on layer {c.layer} "
                            f"(FEATUREWATCH_STEER_CLAMPS={self.t.clamps})")
        slot = self.free_clamps[ls].pop()
        C = self.t.clamps
        self._write("encg", ls, slot, torch.from_numpy(c.encoder))
        gate = c.gate_encoder if c.gate_encoder is not None else np.zeros_like(c.encoder)
        self._write("encg", ls, C + slot, torch.from_numpy(gate))
        self._write("bias", ls, slot, c.bias)
        self._write("thr", ls, slot, c.threshold)
        self._write("gbias", ls, slot, c.gate_bias if c.gate_encoder is not None else 1.0)
        self._write("val", ls, slot, c.value)
        self._write("dec", ls, slot, torch.from_numpy(c.decoder))
        self.clamps[ls][c.key] = [slot, 1]
        return slot

    def _release_clamp(self, ls: int, key: str) -> None:
        entry = self.clamps[ls][key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.clamps[ls][key]
            self.free_clamps[ls].append(entry[0])

    def acquire(self, actions: tuple[Action, ...]) -> int:
        """The row running ``actions`` (0 for none); raises :class:`TableFull`."""
        actions = tuple(a for a in actions if a.layer in self.slot_of_layer)
        if not actions:
            return 0
        key = program_key(actions)
        entry = self.rows.get(key)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        if not self.free_rows:
            raise TableFull(f"no free steering row (FEATUREWATCH_STEER_ROWS={self.t.rows})")
        taken: list[tuple[int, str]] = []
        try:
            for a in actions:
                if isinstance(a, ClampAction):
                    ls = self.slot_of_layer[a.layer]
                    self._acquire_clamp(ls, a)
                    taken.append((ls, a.key))
        except TableFull:
            for ls, k in taken:
                self._release_clamp(ls, k)
            raise
        row = self.free_rows.pop()
        d = self.t.d_model
        for ls in range(len(self.clamps)):
            mask = torch.zeros(self.t.clamps, dtype=torch.bool)
            vec = np.zeros(d, dtype=np.float32)
            on = False
            for a in actions:
                if self.slot_of_layer[a.layer] != ls:
                    continue
                on = True
                if isinstance(a, ClampAction):
                    mask[self.clamps[ls][a.key][0]] = True
                else:
                    vec += a.vector
            self._write("active", ls, row, mask)
            self._write("add", ls, row, torch.from_numpy(vec))
            self._write("row_on", ls, row, on)
        self.rows[key] = [row, 1, actions]
        return row

    def release(self, actions: tuple[Action, ...]) -> None:
        actions = tuple(a for a in actions if a.layer in self.slot_of_layer)
        if not actions:
            return
        key = program_key(actions)
        entry = self.rows[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        row = entry[0]
        del self.rows[key]
        for a in actions:
            if isinstance(a, ClampAction):
                self._release_clamp(self.slot_of_layer[a.layer], a.key)
        for ls in range(len(self.clamps)):
            self._write("row_on", ls, row, False)
            self._write("active", ls, row, torch.zeros(self.t.clamps, dtype=torch.bool))
            self._write("add", ls, row, torch.zeros(self.t.d_model))
        self.free_rows.append(row)


# ---------------------------------------------------------------- requests, policies, plan


@dataclass
class Policy:
    name: str
    selector: dict[str, str]
    actions: tuple[Action, ...]
    hash: str


@dataclass
class RequestSteering:
    # source key -> (from_position, actions); keys "policy:<name>", "directive:<rule>"
    sources: dict[str, tuple[int, tuple[Action, ...]]] = field(default_factory=dict)
    segments: list[tuple[int, tuple[Action, ...], int]] = field(default_factory=list)
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class PolicyView:
    """What the engine core needs to decide policies and cache salts at request creation."""

    enabled: bool
    policies: tuple[tuple[str, dict[str, str], str], ...]  # (name, selector, hash)
    rules_version: int = 0

    def decide(self, metadata: dict[str, str]) -> tuple[list[str], str]:
        if not self.enabled:
            return [], ""
        hit = [(n, h) for n, sel, h in self.policies if selector_matches(sel, metadata)]
        if not hit:
            return [], ""
        return [n for n, _ in hit], _digest(*[f"{n}:{h}" for n, h in sorted(hit)])[:16]

    def to_json(self) -> str:
        return json.dumps({"enabled": self.enabled, "rules_version": self.rules_version,
                           "policies": [list(p) for p in self.policies]})

    @classmethod
    def from_json(cls, text: str) -> PolicyView:
        d = json.loads(text)
        return cls(bool(d["enabled"]),
                   tuple((n, dict(s), h) for n, s, h in d["policies"]), int(d["rules_version"]))


def view_from_plan(plan: pb.TapPlan | None) -> PolicyView:
    if plan is None:
        return PolicyView(False, ())
    return PolicyView(
        bool(plan.steering_enabled),
        tuple((p.name, dict(p.selector), policy_hash(p)) for p in plan.policies),
        int(plan.rules_version),
    )


class SteeringState:
    def __init__(self, table: SteeringTable, d_model: int, counters) -> None:
        self.table = table
        self.d_model = d_model
        self.counters = counters
        self.enabled = False
        self.failure_mode = "open"
        self.policies: dict[str, Policy] = {}
        self.requests: dict[str, RequestSteering] = {}
        self.local_override: bool | None = None  # /featurewatch/steering (kill switch, local)

    # -- plan / connection

    @property
    def active(self) -> bool:
        if self.local_override is False:
            return False
        return self.enabled and bool(self.requests)

    def apply_plan(self, plan: pb.TapPlan) -> None:
        self.enabled = bool(plan.steering_enabled)
        self.failure_mode = plan.steering_failure_mode or "open"
        policies: dict[str, Policy] = {}
        for p in plan.policies:
            try:
                actions = tuple(parse_action(a, self.d_model) for a in p.actions)
            except ValueError as e:
                self.counters.directives_rejected += 1
                logger.warning("featurewatch: policy %r rejected: %s", p.name, e)
                continue
            policies[p.name] = Policy(p.name, dict(p.selector), actions, policy_hash(p))
        self.policies = policies

    def on_disconnect(self) -> None:
        if self.failure_mode == "closed":
            return
        for rid in list(self.requests):
            self._clear(rid)
        self.policies = {}
        self.enabled = False

    # -- requests

    def start_request(self, req_id: str, decided: list[str] | None, decided_hashes: dict | None,
                      metadata: dict[str, str]) -> list[str]:
        """Attach the policies decided at request creation (names with their hashes). When no
        decision was made upstream (no engine-core hook), decide here from the live plan."""
        if decided is None:
            names = [p.name for p in self.policies.values()
                     if self.enabled and selector_matches(p.selector, metadata)]
        else:
            names = []
            for n in decided:
                p = self.policies.get(n)
                if p is None or (decided_hashes and decided_hashes.get(n) != p.hash):
                    self.counters.policy_mismatch += 1
                    continue
                names.append(n)
        if names:
            sources = {f"policy:{n}": (0, self.policies[n].actions) for n in names}
            if not self._set_sources(req_id, sources):
                return []
        return names

    def apply_directive(self, d: pb.SteeringDirective, live_requests) -> str | None:
        """Returns an error string if the directive was rejected."""
        if d.request_id not in live_requests:
            return "unknown request"
        rs = self.requests.get(d.request_id)
        current = dict(rs.sources) if rs else {}
        key = f"directive:{d.rule or d.directive_id}"
        if d.cancel:
            if d.rule or d.directive_id:
                current.pop(key, None)
            else:
                current = {k: v for k, v in current.items() if not k.startswith("directive:")}
        else:
            try:
                actions = tuple(parse_action(a, self.d_model) for a in d.actions)
            except ValueError as e:
                return str(e)
            current[key] = (int(d.from_position), actions)
        return None if self._set_sources(d.request_id, current) else "steering table full"

    def finish_request(self, req_id: str) -> None:
        self._clear(req_id)

    def _clear(self, req_id: str) -> None:
        rs = self.requests.pop(req_id, None)
        if rs:
            for _, actions, _ in rs.segments:
                self.table.release(actions)

    def _set_sources(self, req_id: str, sources: dict[str, tuple[int, tuple[Action, ...]]]) -> bool:
        starts = sorted({fp for fp, _ in sources.values()})
        new_segments: list[tuple[int, tuple[Action, ...], int]] = []
        try:
            for s in starts:
                acts: dict[str, Action] = {}
                for fp, actions in sources.values():
                    if fp <= s:
                        for a in actions:
                            acts[a.key] = a
                program = tuple(acts[k] for k in sorted(acts))
                new_segments.append((s, program, self.table.acquire(program)))
        except TableFull as e:
            for _, program, _ in new_segments:
                self.table.release(program)
            self.counters.directives_rejected += 1
            logger.warning("featurewatch: steering for %s rejected: %s", req_id, e)
            return False
        old = self.requests.get(req_id)
        if old:
            for _, program, _ in old.segments:
                self.table.release(program)
        segs = new_segments
        if not any(row for _, _, row in segs):
            self.requests.pop(req_id, None)
            for _, program, _ in segs:
                self.table.release(program)
            return True
        self.requests[req_id] = RequestSteering(
            sources=sources,
            segments=segs,
            starts=np.array([s for s, _, _ in segs], dtype=np.int64),
            rows=np.array([r for _, _, r in segs], dtype=np.int64),
        )
        return True

    # -- per step

    def rows_for_step(self, req_index: dict[str, int], qsl: np.ndarray, positions: np.ndarray,
                      n: int) -> np.ndarray | None:
        """Per-token steering rows for this step, or None when no token is steered."""
        if not self.active:
            return None
        out = None
        for rid, rs in self.requests.items():
            i = req_index.get(rid)
            if i is None or not rs.segments:
                continue
            a, b = int(qsl[i]), int(qsl[i + 1])
            if a >= b:
                continue
            k = np.searchsorted(rs.starts, positions[a:b], side="right") - 1
            rows = np.where(k >= 0, rs.rows[np.maximum(k, 0)], 0)
            if out is None:
                out = np.zeros(n, dtype=np.int64)
            out[a:b] = rows
        if out is None or not out.any():
            return None
        return out

    def describe(self) -> dict:
        return {
            "enabled": self.enabled,
            "local_override": self.local_override,
            "failure_mode": self.failure_mode,
            "policies": sorted(self.policies),
            "rows_in_use": self.table.rows_in_use,
            "rows_capacity": self.table.t.rows - 1,
            "requests": {
                rid: {"sources": sorted(rs.sources),
                      "segments": [[s, row] for s, _, row in rs.segments]}
                for rid, rs in self.requests.items()
            },
        }
