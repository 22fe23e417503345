"""Requests that are not user traffic but go through ``execute_model`` like it: vLLM's warm-up
steps (vLLM 0.32's V2 runner and 0.33's CPU warm-up build ``_warmup_<i>_`` and
``_v2_mixed_warmup_{decode,prefill}_`` requests by hand) and the plugin's own self-test requests.

They are never announced to the sidecar, never harvested, never steered by policies or
directives, and counted (``/featurewatch/status`` → ``vllm_internal``). User request ids cannot
match: vLLM appends ``-<random hex>`` to every request id it creates for a client, and the
patterns below allow no ``-``.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

SELFTEST_PREFIX = "_featurewatch_selftest_"
# vLLM's hand-built warm-up ids: _warmup_0_, _v2_mixed_warmup_decode_, _sparse_mla_v2_warmup_...
_WARMUP = re.compile(r"_[a-z0-9_]*warmup[a-z0-9_]*_")
_DUMMY = re.compile(r"_dummy_req_[0-9]+")
_SELFTEST = re.compile(re.escape(SELFTEST_PREFIX) + r"[a-z0-9_]*")


def kind(req_id: str) -> str | None:
    """'selftest', 'warmup' or None (a user request)."""
    if not isinstance(req_id, str) or not req_id.startswith("_"):
        return None
    if _SELFTEST.fullmatch(req_id):
        return "selftest"
    if _WARMUP.fullmatch(req_id) or _DUMMY.fullmatch(req_id):
        return "warmup"
    return None


class InternalRequests:
    """Counts of internal requests and steps, and the self-test's probe (request id → steering
    row, and the row of its last token) that the runtime applies to the probe's tokens."""

    def __init__(self) -> None:
        self.requests: Counter = Counter()
        self.steps: Counter = Counter()
        self.probe: dict[str, tuple[int, int]] | None = None
        self.seen: list = []  # StepLabels of self-test steps the forward wrapper saw

    def new_request(self, req_id: str) -> bool:
        """True (and counted) when ``req_id`` is internal: the caller must not start it."""
        k = kind(req_id)
        if k is not None:
            self.requests[k] += 1
        return k is not None

    def in_step(self, labels) -> bool:
        """True (and counted) when the step runs an internal request: it is not harvested."""
        # kind() is None for every id not starting with "_": a step of user requests costs one
        # pass over its ids, not a kind() call per request
        marked = [r for r in labels.req_ids if isinstance(r, str) and r[:1] == "_"]
        kinds = {kind(r) for r in marked} - {None}
        if not kinds:
            return False
        self.steps["selftest" if "selftest" in kinds else "warmup"] += 1
        if "selftest" in kinds:
            self.seen.append(labels)
        return True

    def probe_rows(self, labels, max_tokens: int) -> np.ndarray | None:
        """Per-token steering rows for a self-test step (None: nothing to steer)."""
        if not self.probe:
            return None
        n = min(labels.num_tokens, max_tokens)
        rows = np.zeros(n, dtype=np.int64)
        qsl = labels.qsl
        for i, rid in enumerate(labels.req_ids):
            row, last = self.probe.get(rid, (0, 0))
            lo, hi = int(qsl[i]), min(int(qsl[i + 1]), n)
            if row and hi > lo:
                rows[lo:hi] = row
                if last:
                    rows[hi - 1] = last
        return rows if rows.any() else None

    def as_dict(self) -> dict:
        return {"requests": dict(self.requests), "steps": dict(self.steps)}
