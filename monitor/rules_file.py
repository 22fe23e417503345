"""The watched rules file: reloaded on every change, and no failure of any kind stops the watching.

A reload reads the file (a regular UTF-8 file of bounded size), compiles it against the loaded
dictionaries and puts it in the rule store, from which every replica (this one included) applies
it. A reload that fails, for whatever reason and with whatever exception, is counted
(``featurewatch_rule_reloads_total{result="error"}``), logged on one line the first time its reason
is seen, and emitted as a ``rules`` / ``rejected`` event; the rules in force stay.

While the file stays bad it is retried every ``retry_s`` (a direction file it names may be fixed
without the rules file changing). Each failed retry counts too, so the reload-failure alert keeps
firing until the file is fixed; the reason is not logged again.

When the store refuses a valid file (Redis away, at start or later) its rules are applied on this
replica alone, as version 0 ("not from the store"), and stored on a later retry or as soon as the
store answers again: a replica never waits for Redis to serve its file's rules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from monitor.evaluate.rules import RulesInvalid, read_rules_text

log = logging.getLogger("featurewatch.rules_file")
REASON_CHARS = 500


def describe(exc: BaseException) -> str:
    """One line, bounded: what went wrong, without a traceback or a whole huge value."""
    if isinstance(exc, RulesInvalid) and exc.errors:
        text = "; ".join(str(e) for e in exc.errors)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


class RulesFileWatcher:
    """Polls one rules file for its sidecar. ``check`` never raises; ``run`` never ends on an error."""

    def __init__(self, sidecar, path: Path, poll_s: float, retry_s: float | None = None) -> None:
        self.sidecar, self.path, self.poll_s = sidecar, Path(path), poll_s
        self.retry_s = retry_s if retry_s is not None else max(1.0, 5 * poll_s)
        self.author = f"file:{self.path}"
        self._signature: tuple | None = None  # the file as last attempted
        self._failing = False  # the last attempt failed: retry when due
        self._logged_error: str | None = None  # reasons already logged: each is logged once
        self._logged_store: str | None = None
        self._retry_at = float("inf")
        self._unstored: str | None = None  # a valid text in force here that the store refused
        self._lock = threading.Lock()  # one reload or publication at a time (watcher vs store thread)

    # ------------------------------------------------------------------ polling
    def signature(self) -> tuple:
        """What identifies a version of the file: a rename over it, an edit in place, a deletion."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return ("unreadable", exc.errno)
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def check(self) -> None:
        """One poll: reload when the file changed, or when a failure or an unstored set is due a retry."""
        try:
            signature = self.signature()
            if signature != self._signature:
                self._signature = signature
            elif not ((self._failing or self._unstored is not None) and time.monotonic() >= self._retry_at):
                return
            self.reload()
        except Exception as exc:  # noqa: BLE001 - reload() handles its own; this is the last guard
            self._failed(exc)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await asyncio.to_thread(self.check)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the watcher outlives anything
                self._failed(exc)

    # ------------------------------------------------------------------ reloading
    def reload(self) -> bool:
        """Read, compile and store (or apply here alone) the file; False when it was not applied."""
        with self._lock:
            try:
                text = read_rules_text(self.path)
                compiled = self.sidecar.compile(text, str(self.path), 0)
            except Exception as exc:  # noqa: BLE001 - any failure of a reload keeps the rules in force
                self._failed(exc)
                return False
            if self._failing:
                log.info("rules file %s is valid again", self.path)
            self._failing, self._logged_error = False, None
            if text == self._unstored:  # already in force here: only the store is still to take it
                return self._store(text)
            try:
                stored = self.sidecar.rule_store.get()
            except Exception as exc:  # noqa: BLE001 - a store read failing is the store's problem
                stored = None
                log.debug("rule store read failed: %s", describe(exc))
            if stored is not None and stored.yaml == text:
                self._unstored = None
                return True  # the store (and so this replica) already has it
            if not self._store(text):
                self.sidecar.install(compiled, f"v0 from {self.path} (not in the store)")
            return True

    def store_pending(self) -> bool:
        """Called when the store delivers a set: True when this replica holds file rules the store
        has not taken yet (they are stored now if it answers, and stay in force either way)."""
        if self._unstored is None:
            return False
        with self._lock:
            if self._unstored is not None:
                self._store(self._unstored)
            return True

    def _store(self, text: str) -> bool:
        """Put the text in the store; on refusal remember it for a retry. The store may deliver the
        new set to this replica inside ``put`` (memory store): nothing is pending by then."""
        was_pending, self._unstored = self._unstored is not None, None
        try:
            version = self.sidecar.publish_rules(text, self.author)
        except Exception as exc:  # noqa: BLE001 - the store is away: serve the file's rules, retry later
            self._unstored = text
            self._retry_at = time.monotonic() + self.retry_s
            reason = describe(exc)
            if reason != self._logged_store:
                log.warning("rules file %s in force on this replica only: the rule store refused it (%s); "
                            "retrying every %.0f s", self.path, reason, self.retry_s)
                self._logged_store = reason
            return False
        if was_pending:
            log.info("rules file %s stored as v%d", self.path, version)
        self._logged_store = None
        return True

    def _failed(self, exc: BaseException) -> None:
        reason = describe(exc)
        self._failing = True
        self._retry_at = time.monotonic() + self.retry_s
        sidecar = self.sidecar
        sidecar.metrics.rule_reloads.labels("error").inc()
        if reason != self._logged_error:
            where = reason if str(self.path) in reason else f"{self.path}: {reason}"
            log.error("rules file not applied, keeping v%d: %s", sidecar.rules.version, where)
            self._logged_error = reason
            sidecar.events.emit("rules", action="rejected", author=self.author, error=reason)
