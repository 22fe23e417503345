"""Host side of the steering op's finiteness guard, and the tokens steering actually changed.

The op (ops.py) keeps a token's original residual row whenever steering would have made it
non-finite, and counts that per layer and steering row in ``SteerTables.nonfinite``. After a
steered step the host reads the counts back (asynchronously on a GPU: it never waits for the
device) and maps the flagged rows to the action keys of the programs they ran, so the runtime can
drop those actions: a request whose steering misbehaves is served unsteered, never with NaN.

Rows are remembered per step until a read-back covers them, so a row reassigned to another
program in between is attributed to both (dropping too much is the safe side).

The same read-back proves steering in-band: the host knows which policies and directives each
step's rows ran (steering.rows_for_step), and the guard says how many of a row's tokens it
refused, so the tokens steered per policy and rule are counted without any extra device sync
(:class:`SteeredTokens`, sent in PluginStats).
"""

from __future__ import annotations

import numpy as np
import torch

from monitor.plugin.ops import SteerTables

MAX_NAMES = 256  # distinct policy (and rule) names counted; beyond, they share "other"
OTHER = "other"


class NonfiniteGuard:
    def __init__(self, tables: SteerTables) -> None:
        self.tables = tables
        self._since: dict[int, frozenset[str]] = {}  # rows of steps not yet read back -> keys
        # row -> {source key: tokens} of steps not yet read back, and of the step in flight
        self._sources: dict[int, dict[str, int]] = {}
        self._step_sources: dict[int, dict[str, int]] = {}
        self._pending: tuple | None = None  # (event | None, counts, rows, sources)
        self._host: torch.Tensor | None = None

    def note_step(self, rows: np.ndarray, row_keys: dict[int, frozenset[str]],
                  sources: dict[int, dict[str, int]] | None = None) -> None:
        """Before a steered forward: which programs its rows run (and for whom: ``sources``,
        row -> {source key: tokens}, counted once the step is done)."""
        for r in np.unique(rows).tolist():
            if r:
                self._since[r] = self._since.get(r, frozenset()) | row_keys.get(r, frozenset())
        self._step_sources = sources or {}

    def abort_step(self) -> None:
        """The forward did not run (a wrapper failed): its tokens were not steered."""
        self._step_sources = {}

    def after_step(self) -> None:
        """After a steered forward: start reading the counts back (one read-back in flight)."""
        if not self._sources:  # the usual case: every step is read back before the next
            self._sources = self._step_sources
        else:
            for r, per in self._step_sources.items():
                into = self._sources.setdefault(r, {})
                for key, n in per.items():
                    into[key] = into.get(key, 0) + n
        self._step_sources = {}
        if self._pending is not None or not self._since:
            return
        nf = self.tables.nonfinite
        if not self.tables.on_device:
            counts = nf.sum(0).numpy().copy()
            nf.zero_()
            self._pending = (None, counts, self._since, self._sources)
        else:
            if self._host is None:
                self._host = torch.zeros(nf.shape[1], dtype=nf.dtype, pin_memory=True)
            self._host.copy_(nf.sum(0), non_blocking=True)
            nf.zero_()  # stream-ordered after the copy
            event = torch.cuda.Event()
            event.record()
            self._pending = (event, self._host, self._since, self._sources)
        self._since, self._sources = {}, {}

    def collect(self) -> tuple[int, set[str], dict[str, int]]:
        """Once the read-back is done: (refused token rows, action keys of their programs, tokens
        steered per source key); (0, empty, empty) while it is in flight.

        A row's refusals are summed over layers and cannot be told apart per token, so a source
        sharing a row that was partly refused is credited its tokens less all the refusals (a
        lower bound; exact when one source runs the row, and 0 when every token was refused)."""
        if self._pending is None:
            return 0, set(), {}
        event, counts, rows, sources = self._pending
        if event is not None and not event.query():
            return 0, set(), {}
        self._pending = None
        c = counts.numpy() if isinstance(counts, torch.Tensor) else counts
        total = int(c.sum())
        steered: dict[str, int] = {}
        for r, per in sources.items():
            refused = int(c[r]) if total and r < len(c) else 0
            for key, n in per.items():
                n -= min(refused, n)
                if n:
                    steered[key] = steered.get(key, 0) + n
        if not total:
            return 0, set(), steered
        keys: set[str] = set()
        for r in np.nonzero(c)[0].tolist():
            keys |= rows.get(r, frozenset())
        return total, keys, steered


class SteeredTokens:
    """Cumulative tokens steered per always-on policy and per rule of a directive (what
    ``PluginStats.policy_tokens_steered`` / ``rule_tokens_steered`` carry). Written by the forward
    thread; :meth:`snapshot` copies the maps (a dict copy is atomic under the GIL) for the
    stats thread. At most ``MAX_NAMES`` names each; later ones share ``other``."""

    def __init__(self) -> None:
        self.policies: dict[str, int] = {}
        self.rules: dict[str, int] = {}

    def add(self, steered: dict[str, int]) -> None:
        for key, n in steered.items():
            kind, _, name = key.partition(":")
            into = self.policies if kind == "policy" else self.rules
            if name not in into and len(into) >= MAX_NAMES:
                name = OTHER
            into[name] = into.get(name, 0) + n

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"policies": self.policies.copy(), "rules": self.rules.copy()}
