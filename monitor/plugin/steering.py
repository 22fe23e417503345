"""Host side of steering: policies, per-request steering state, the engine core's policy view.

Only the forward thread mutates this state, at step boundaries (directives and plans arrive on the
gRPC thread as queued ops and are applied "from the next step on"). A request's steering is a set
of sources (policies, directives), each an action list from a position on, compiled into segments
``(from_position, program, row)`` of the steering table (table.py). Actions are parsed and bounded
in actions.py.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from monitor.plugin.actions import (
    DEFAULT_LIMITS,
    Action,
    ActionLimits,
    _digest,
    parse_action,
    policy_hash,
)
from monitor.plugin.guard import SteeredTokens
from monitor.plugin.table import SteeringTable, TableFull
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
    # per segment: the sources that steer its tokens (an action on a hooked layer), for the
    # tokens-steered counts (SteeredTokens)
    seg_sources: list[tuple[str, ...]] = field(default_factory=list)
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

    def without(self, names: set[str]) -> PolicyView:
        return PolicyView(self.enabled, tuple(p for p in self.policies if p[0] not in names),
                          self.rules_version)

    def to_json(self) -> str:
        return json.dumps({"enabled": self.enabled, "rules_version": self.rules_version,
                           "policies": [list(p) for p in self.policies]})

    @classmethod
    def from_json(cls, text: str) -> PolicyView:
        d = json.loads(text)
        return cls(bool(d["enabled"]),
                   tuple((n, dict(s), h) for n, s, h in d["policies"]), int(d["rules_version"]))


def view_from_plan(plan: pb.TapPlan | None, valid=None) -> PolicyView:
    """The plan's policies as the engine core sees them; ``valid(policy)`` leaves out those the
    worker will refuse, so no request is decided (and salted) for a policy never applied."""
    if plan is None:
        return PolicyView(False, ())
    return PolicyView(
        bool(plan.steering_enabled),
        tuple((p.name, dict(p.selector), policy_hash(p)) for p in plan.policies
              if valid is None or valid(p)),
        int(plan.rules_version),
    )


class SteeringState:
    def __init__(self, table: SteeringTable, d_model: int, counters,
                 limits: ActionLimits = DEFAULT_LIMITS) -> None:
        self.table = table
        self.d_model = d_model
        self.counters = counters
        self.limits = limits
        self.rejections: deque[str] = deque(maxlen=8)  # recent refusals, for the status route
        self.enabled = False
        self.failure_mode = "open"
        self.policies: dict[str, Policy] = {}
        self.requests: dict[str, RequestSteering] = {}
        self.local_override: bool | None = None  # /featurewatch/steering (kill switch, local)
        self.steered = SteeredTokens()  # tokens actually steered, per policy and rule
        # row -> {the sources its tokens run: live segments}; rows run for more than one set of
        # sources (identical programs of different policies) are counted request by request
        self._row_sources: dict[int, dict[tuple[str, ...], int]] = {}
        self._ambiguous = 0  # rows with more than one set of sources

    # -- plan / connection

    @property
    def active(self) -> bool:
        if self.local_override is False:
            return False
        return self.enabled and bool(self.requests)

    def parse_actions(self, actions) -> tuple[Action, ...]:
        """Raises ValueError naming the first bad field (see actions.py for the bounds)."""
        return tuple(parse_action(a, self.d_model, self.limits) for a in actions)

    def valid_policy(self, p: pb.SteeringPolicy) -> bool:
        """Pure (any thread): would :meth:`apply_plan` accept this policy?"""
        try:
            self.parse_actions(p.actions)
        except ValueError:
            return False
        return True

    def _reject(self, what: str, reason: str) -> None:
        self.rejections.append(f"{what}: {reason}"[:300])

    def apply_plan(self, plan: pb.TapPlan) -> None:
        self.enabled = bool(plan.steering_enabled)
        self.failure_mode = plan.steering_failure_mode or "open"
        policies: dict[str, Policy] = {}
        for p in plan.policies:
            try:
                actions = self.parse_actions(p.actions)
            except ValueError as e:
                self.counters.directives_rejected += 1
                self.counters.policies_rejected += 1
                self._reject(f"policy {p.name[:64]!r}", str(e))
                logger.warning("featurewatch: policy %r rejected: %s", p.name[:64], e)
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
                actions = self.parse_actions(d.actions)
            except ValueError as e:
                self._reject(f"directive {d.directive_id[:64]!r}", str(e))
                return str(e)
            current[key] = (int(d.from_position), actions)
        return None if self._set_sources(d.request_id, current) else "steering table full"

    def finish_request(self, req_id: str) -> None:
        self._clear(req_id)

    def _clear(self, req_id: str) -> None:
        rs = self.requests.pop(req_id, None)
        if rs:
            self._track(rs, -1)
            for _, actions, _ in rs.segments:
                self.table.release(actions)

    def _track(self, rs: RequestSteering, sign: int) -> None:
        """Keep ``_row_sources`` (which sources each row in use runs) as segments come and go."""
        for (_, _, row), srcs in zip(rs.segments, rs.seg_sources):
            if not row:
                continue
            per = self._row_sources.setdefault(row, {})
            before = len(per)
            n = per.get(srcs, 0) + sign
            if n > 0:
                per[srcs] = n
            else:
                per.pop(srcs, None)
            self._ambiguous += (len(per) > 1) - (before > 1)
            if not per:
                del self._row_sources[row]

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
            self._track(old, -1)
            for _, program, _ in old.segments:
                self.table.release(program)
        segs = new_segments
        if not any(row for _, _, row in segs):
            self.requests.pop(req_id, None)
            for _, program, _ in segs:
                self.table.release(program)
            return True
        hooked = self.table.slot_of_layer
        self.requests[req_id] = rs = RequestSteering(
            sources=sources,
            segments=segs,
            seg_sources=[tuple(sorted(k for k, (fp, acts) in sources.items()
                                      if fp <= s and any(a.layer in hooked for a in acts)))
                         for s, _, _ in segs],
            starts=np.array([s for s, _, _ in segs], dtype=np.int64),
            rows=np.array([r for _, _, r in segs], dtype=np.int64),
        )
        self._track(rs, +1)
        return True

    def drop_nonfinite(self, bad_keys: set[str]) -> tuple[int, list[str]]:
        """The steering arithmetic produced a non-finite row with these actions (the op kept the
        original row): drop every source that carries one of them from every request, and the
        policies that carry one. Returns (sources dropped, policy names dropped). A later plan is
        parsed afresh (the guard stays in force)."""
        dropped = 0
        for rid, rs in list(self.requests.items()):
            keep = {src: v for src, v in rs.sources.items()
                    if not any(a.key in bad_keys for a in v[1])}
            if len(keep) == len(rs.sources):
                continue
            dropped += len(rs.sources) - len(keep)
            for src in rs.sources.keys() - keep.keys():
                self._reject(f"{src} of {rid[:64]}", "steered rows were not finite; dropped")
            if not self._set_sources(rid, keep):
                self._clear(rid)  # no room for the remaining program: no steering at all
        names = [n for n, p in self.policies.items() if any(a.key in bad_keys for a in p.actions)]
        for n in names:
            del self.policies[n]
            self._reject(f"policy {n[:64]!r}", "steered rows were not finite; dropped")
        return dropped, names

    # -- per step

    def rows_for_step(self, req_index: dict[str, int], qsl: np.ndarray, positions: np.ndarray,
                      n: int, sources: dict | None = None) -> np.ndarray | None:
        """Per-token steering rows for the step's first ``n`` tokens, or None when no token is
        steered. ``sources``, when given, is filled with ``row -> {source key: tokens}``: which
        policies and directives the step's steered tokens run (the tokens-steered counts)."""
        if not self.active:
            return None
        out = None
        per_request = sources is not None and self._ambiguous > 0
        for rid, rs in self.requests.items():
            i = req_index.get(rid)
            if i is None or not rs.segments:
                continue
            a, b = int(qsl[i]), min(int(qsl[i + 1]), n)
            if a >= b:
                continue
            k = np.searchsorted(rs.starts, positions[a:b], side="right") - 1
            rows = np.where(k >= 0, rs.rows[np.maximum(k, 0)], 0)
            if out is None:
                out = np.zeros(n, dtype=np.int64)
            out[a:b] = rows
            if per_request:
                per_seg = np.bincount(k[k >= 0], minlength=len(rs.segments)).tolist()
                for j, count in enumerate(per_seg):
                    row = int(rs.rows[j])
                    if count and row:
                        into = sources.setdefault(row, {})
                        for key in rs.seg_sources[j]:
                            into[key] = into.get(key, 0) + count
        if out is None or not out.any():
            return None
        if sources is not None and not per_request:  # each row runs one set of sources: one bincount
            counts = np.bincount(out)
            counts[0] = 0
            nz = np.flatnonzero(counts)
            for r, c in zip(nz.tolist(), counts[nz].tolist()):
                for srcs in self._row_sources.get(r, {}):  # exactly one (no row is ambiguous)
                    sources[r] = dict.fromkeys(srcs, c)
        return out

    def describe(self) -> dict:
        return {
            "enabled": self.enabled,
            "local_override": self.local_override,
            "failure_mode": self.failure_mode,
            "policies": sorted(self.policies),
            "rows_in_use": self.table.rows_in_use,
            "rows_capacity": self.table.t.rows - 1,
            "max_norm": self.limits.max_norm,
            "recent_rejections": list(self.rejections),
            "tokens_steered": self.steered.snapshot(),
            "requests": {
                rid: {"sources": sorted(rs.sources),
                      "segments": [[s, row] for s, _, row in rs.segments]}
                for rid, rs in self.requests.items()
            },
        }
