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

The file is authoritative: once it has been valid, this sidecar runs its rules and no others. A set
the store delivers that differs from the file (another replica's `rules apply`) is not applied here
(logged once). `rules apply` to this sidecar writes the file (atomically) and reloads it, so the file,
a restart and an edit all agree with what was applied; a file the sidecar may not write (a symlink,
such as a Kubernetes ConfigMap mount, or a read-only directory) makes `rules apply` refuse, naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from monitor.evaluate.rules import RulesInvalid, read_rules_text

log = logging.getLogger("featurewatch.rules_file")
REASON_CHARS = 500


@dataclass(frozen=True)
class RulesOrigin:
    """Where the rules in force came from: ``source`` file (``origin`` the path), admin (``origin`` the
    author of a `rules apply` to the store) or none; ``store`` memory | redis | "" (in force here only)."""

    source: str
    origin: str
    author: str
    store: str
    updated_unix_s: float = 0.0

    def describe(self) -> str:
        if self.source == "none":
            return "no rules"
        where = f"the rules file {self.origin}" if self.source == "file" else f"rules apply by {self.origin}"
        by = f", last written by rules apply from {self.author}" if self.source == "file" and self.author and \
            not self.author.startswith("file:") else ""
        stored = f"store {self.store}" if self.store else "not in the store yet"
        return f"{where}{by} ({stored})"


def rules_origin(text: str, author: str, store: str, watcher: "RulesFileWatcher | None", updated_unix_s: float) -> RulesOrigin:
    """The origin of ``text`` put in force with ``author``: this sidecar's rules file when it holds that
    text, another replica's file for a ``file:<path>`` author, else the author's `rules apply`."""
    if watcher is not None and text == watcher.good_text:
        return RulesOrigin("file", str(watcher.path), author, store, updated_unix_s)
    if author.startswith("file:"):
        return RulesOrigin("file", author[len("file:"):], author, store, updated_unix_s)
    if not text.strip():
        return RulesOrigin("none", "", author, store, updated_unix_s)
    return RulesOrigin("admin", author or "?", author, store, updated_unix_s)


class RulesFileReadOnly(PermissionError):
    """`rules apply` to a sidecar whose authoritative rules file it may not write."""


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
        self.good_text: str | None = None  # the file's last valid text: the rules this sidecar runs
        self.stored_version = 0  # the store's version of the last text reloaded (0: not stored)
        self._ignored: int | None = None  # the last store version not applied because the file differs
        self._lock = threading.RLock()  # one reload, write or publication at a time (watcher, store thread, admin)

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
    def reload(self, author: str | None = None) -> bool:
        """Read, compile and store (or apply here alone) the file; False when it was not applied.
        ``author``: recorded in the store instead of ``file:<path>`` (a `rules apply` that wrote it)."""
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
            self.good_text = text
            if text == self._unstored:  # already in force here: only the store is still to take it
                return self._store(text, author)
            try:
                stored = self.sidecar.rule_store.get()
            except Exception as exc:  # noqa: BLE001 - a store read failing is the store's problem
                stored = None
                log.debug("rule store read failed: %s", describe(exc))
            if stored is not None and stored.yaml == text:
                self._unstored, self.stored_version = None, stored.version
                self.sidecar.apply_stored(stored)  # the store has it: in force here too (no-op if it is)
                return True
            if not self._store(text, author):
                self.sidecar.install(compiled, f"v0 from {self.path} (not in the store)", author=author or self.author,
                                     stored=False)
            return True

    def follows(self, stored) -> bool:
        """Whether a set the store delivered may be put in force here: the file is authoritative
        once it has been valid, so only its own text is (the store's version number comes with it)."""
        if self.good_text is None or stored.yaml == self.good_text:
            return True
        if stored.version != self._ignored:
            self._ignored = stored.version
            log.warning("the rule store holds v%d by %s, which differs from this sidecar's rules file %s: the file is "
                        "authoritative here, so that set is not applied (edit the file, or `featurewatch rules apply` "
                        "to this sidecar, which writes it)", stored.version, stored.author or "?", self.path)
        return False

    # ------------------------------------------------------------------ rules apply
    def unwritable(self) -> str | None:
        """Why `rules apply` may not write the file, or None."""
        if self.path.is_symlink():
            return "it is a symlink (e.g. a Kubernetes ConfigMap mount), managed elsewhere"
        if not os.access(self.path.parent, os.W_OK):
            return f"its directory {self.path.parent} is not writable by the sidecar"
        if self.path.exists() and not os.access(self.path, os.W_OK):
            return "it is read-only to the sidecar"
        return None

    def write(self, text: str, author: str) -> int:
        """`rules apply` where the file is authoritative: write ``text`` into it atomically (a
        temporary file renamed over it, its mode kept) and put it in force from there. Returns the
        stored version (0: in force here, the store away). Raises RulesFileReadOnly, or
        RuntimeError when the written file could not be applied."""
        problem = self.unwritable()
        if problem is not None:
            raise RulesFileReadOnly(f"the rules file {self.path} is authoritative on this sidecar and cannot be "
                                    f"written: {problem}. Edit that file instead (changes apply within "
                                    f"{self.poll_s:g} s); rules in force unchanged")
        with self._lock:
            try:
                mode = os.stat(self.path).st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o644
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, mode)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._signature = self.signature()  # this version is handled here, not by the next poll
            if not self.reload(author=author):
                raise RuntimeError(f"{self.path} was written but not applied: {self._logged_error or 'see the log'}")
            return self.stored_version

    def store_pending(self) -> bool:
        """Called when the store delivers a set: True when this replica holds file rules the store
        has not taken yet (they are stored now if it answers, and stay in force either way)."""
        if self._unstored is None:
            return False
        with self._lock:
            if self._unstored is not None:
                self._store(self._unstored)
            return True

    def _store(self, text: str, author: str | None = None) -> bool:
        """Put the text in the store; on refusal remember it for a retry. The store may deliver the
        new set to this replica inside ``put`` (memory store): nothing is pending by then."""
        was_pending, self._unstored = self._unstored is not None, None
        try:
            version = self.sidecar.publish_rules(text, author or self.author)
        except Exception as exc:  # noqa: BLE001 - the store is away: serve the file's rules, retry later
            self._unstored, self.stored_version = text, 0
            self._retry_at = time.monotonic() + self.retry_s
            reason = describe(exc)
            if reason != self._logged_store:
                log.warning("rules file %s in force on this replica only: the rule store refused it (%s); "
                            "retrying every %.0f s", self.path, reason, self.retry_s)
                self._logged_store = reason
            return False
        self.stored_version = version
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
