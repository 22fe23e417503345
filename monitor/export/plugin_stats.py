"""A plugin process's cumulative PluginStats turned into counter increases.

The plugin reports totals since its process started, and resends them on every stream: after a
reconnect the same totals arrive on a new stream. So the last totals are kept per plugin *process*
(the Hello's engine and instance, host:pid), not per stream, and only what grew is exported: each
exported counter then equals the process's own count however often it reconnects. A new process is
a new identity and counts from zero. A total that went down for the same identity means the process
restarted (a container keeps host and pid): its report counts from zero, as Prometheus treats a
counter reset, never as a negative increment. A report from an older stream of the identity than the
last one seen (the old stream's last words, read after the new stream's first) is stale and ignored.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Last:
    label: str  # the engine label the increases went to
    stream: int  # the stream of the latest report (stream ids only grow)
    counts: dict  # key -> last cumulative value


class PluginCounts:
    """Last cumulative counts per plugin identity, at most ``limit`` identities (least recently
    reported forgotten first: an identity reports every few seconds while connected)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._last: OrderedDict[object, _Last] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def increases(self, identity, label: str, stream: int, counts: dict) -> dict:
        """What grew since this identity's last report into ``label`` (key -> increase > 0).
        ``counts`` are finite, non-negative cumulative values."""
        last = self._last.pop(identity, None)
        if last is not None and stream < last.stream:  # stale: the newer stream's totals include it
            self._last[identity] = last
            return {}
        base = {} if last is None or last.label != label else last.counts
        if any(v < base.get(k, 0) for k, v in counts.items()):  # went backwards: the process restarted
            base = {}
        self._last[identity] = _Last(label, stream, {**base, **counts})
        while len(self._last) > self.limit:
            self._last.popitem(last=False)
        return {k: v - base.get(k, 0) for k, v in counts.items() if v > base.get(k, 0)}

    def forget(self, identity) -> None:
        self._last.pop(identity, None)

    def forget_label(self, label: str) -> None:
        """The label's series were removed: its identities count from zero again under a new one."""
        for identity in [i for i, last in self._last.items() if last.label == label]:
            del self._last[identity]
