"""A ring of fixed-size slots in a shared file: the plugin writes a step's activations into a slot,
the gRPC stream carries only a descriptor (slot, sequence, step, bytes), the sidecar encodes from a
view on the slot and frees it when the last view is gone. No pickling, no copy on the sidecar.

Who does what (both sides import this one layout):
- the **sidecar** creates the segment (``RingReader.create``: mode 0600, ``O_EXCL``, under a directory
  the operator configures) for one plugin stream, announces it in the TapPlan with a random nonce,
  and unlinks it when the stream ends. It never opens a path a plugin names.
- the **plugin** attaches (``RingWriter.attach``) only if the file is its own user's, not readable by
  anyone else, and carries the announced nonce: a Unix socket to a sidecar on another host (or in
  a container without the shared ``emptyDir``) fails here and the plugin keeps the bytes path.

Slot ownership is a state word per slot: the writer takes FREE slots only (FREE -> WRITING ->
READY), the reader takes READY ones (READY -> HELD -> FREE). The writer never waits: no FREE slot
means the step is dropped and counted. Each slot header also holds a sequence number written
before (``seq_begin``) and after (``seq_end``) the payload, seqlock style: a descriptor whose
sequence is not in both is a slot torn (writer died or misbehaved mid-write) or overwritten
(the descriptor is stale), and is rejected instead of read.

Ordering: headers are aligned 8-byte stores; the descriptor reaches the sidecar through a socket
(a syscall on each side), which orders the payload before it on every architecture.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"FWRING\x01\x00"
HEADER_BYTES = 4096  # segment header: magic, geometry, nonce (one page, so slots are page-aligned)
SLOT_HEADER_BYTES = 64
ALIGN = 64
FREE, WRITING, READY, HELD = 0, 1, 2, 3
# slot header words (uint64)
_SEQ_BEGIN, _SEQ_END, _STATE, _STEP, _NBYTES = range(5)
_NAME = re.compile(r"^featurewatch-ring-(\d+)-[0-9a-f]{8,32}\.(ring|lane)$")  # a ring, its lane socket


class RingError(Exception):
    """The segment cannot be used (missing, wrong owner or mode, wrong geometry or nonce)."""


class SlotRejected(ValueError):
    """A descriptor that names no readable slot: ``reason`` is the drop reason the sidecar counts."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def slot_stride(slot_bytes: int) -> int:
    return SLOT_HEADER_BYTES + -(-slot_bytes // ALIGN) * ALIGN


def segment_bytes(n_slots: int, slot_bytes: int) -> int:
    return HEADER_BYTES + n_slots * slot_stride(slot_bytes)


@dataclass(frozen=True)
class Geometry:
    path: str
    n_slots: int
    slot_bytes: int
    nonce: bytes


class _Segment:
    """The mapping and per-slot header views shared by reader and writer."""

    def __init__(self, mm: mmap.mmap, n_slots: int, slot_bytes: int) -> None:
        self.mm, self.n_slots, self.slot_bytes = mm, n_slots, slot_bytes
        self.stride = slot_stride(slot_bytes)
        self.headers = [np.frombuffer(mm, dtype=np.uint64, count=SLOT_HEADER_BYTES // 8,
                                      offset=self._base(i)) for i in range(n_slots)]

    def _base(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.stride

    def payload(self, slot: int, nbytes: int) -> np.ndarray:
        """A uint8 view of the first ``nbytes`` of a slot's payload (no copy)."""
        return np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=self._base(slot) + SLOT_HEADER_BYTES)

    def state(self, slot: int) -> int:
        return int(self.headers[slot][_STATE])

    def drop(self) -> None:
        """Forget the mapping; it is unmapped once the last view on it is gone (closing it while
        views exist would raise, and unmapping under them would crash whoever holds them)."""
        self.headers = []
        try:
            self.mm.close()
        except BufferError:
            pass


def _header(n_slots: int, slot_bytes: int, nonce: bytes) -> bytes:
    return MAGIC + np.array([n_slots, slot_bytes], dtype=np.uint64).tobytes() + nonce


class RingReader:
    """The sidecar's side: creates the segment, validates descriptors, hands out leased views."""

    def __init__(self, path: Path, segment: _Segment, nonce: bytes) -> None:
        self.path, self._seg, self.nonce = path, segment, nonce
        self.overwritten_in_use = 0  # slots found rewritten when released (a writer broke the protocol)
        self.released = 0
        self._lock = threading.Lock()

    @classmethod
    def create(cls, directory: str | Path, n_slots: int, slot_bytes: int) -> RingReader:
        if n_slots < 1 or slot_bytes < 1:
            raise RingError(f"ring of {n_slots} slots x {slot_bytes} bytes")
        nonce = os.urandom(16)
        path = Path(directory) / f"featurewatch-ring-{os.getpid()}-{nonce[:8].hex()}.ring"
        size = segment_bytes(n_slots, slot_bytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.ftruncate(fd, size)  # sparse: tmpfs allocates pages as slots are first written
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        mm[:HEADER_BYTES] = _header(n_slots, slot_bytes, nonce).ljust(HEADER_BYTES, b"\0")
        return cls(path, _Segment(mm, n_slots, slot_bytes), nonce)

    @property
    def geometry(self) -> Geometry:
        return Geometry(str(self.path), self._seg.n_slots, self._seg.slot_bytes, self.nonce)

    @property
    def name(self) -> str:
        return self.path.name

    def take(self, slot: int, sequence: int, step: int, nbytes: int) -> np.ndarray:
        """The slot's payload as a uint8 array whose lifetime holds the slot: it is freed for the
        writer when the array (and every tensor made from it) is gone. Raises SlotRejected."""
        seg = self._seg
        if not seg.headers:
            raise SlotRejected("shm_closed", f"ring {self.name} is closed")
        if not 0 <= slot < seg.n_slots:
            raise SlotRejected("malformed", f"slot {slot} outside the ring's {seg.n_slots} slots")
        if not 0 <= nbytes <= seg.slot_bytes:
            raise SlotRejected("malformed", f"{nbytes} bytes > slot capacity {seg.slot_bytes}")
        h = seg.headers[slot]
        begin, end, state = int(h[_SEQ_BEGIN]), int(h[_SEQ_END]), int(h[_STATE])
        if begin != sequence:
            raise SlotRejected("shm_overwritten",
                               f"slot {slot} holds sequence {begin}, the descriptor names {sequence}")
        if end != sequence or state != READY:
            if state == READY:  # the writer is done with it: give it back rather than lose the slot
                h[_STATE] = FREE
            raise SlotRejected("shm_torn", f"slot {slot}: sequence {begin} before the payload, {end} after, "
                                           f"state {state}")
        if int(h[_STEP]) != step or int(h[_NBYTES]) != nbytes:
            h[_STATE] = FREE
            raise SlotRejected("malformed", f"slot {slot} holds step {int(h[_STEP])} ({int(h[_NBYTES])} bytes), "
                                            f"the descriptor names step {step} ({nbytes} bytes)")
        h[_STATE] = HELD
        view = seg.payload(slot, nbytes)
        weakref.finalize(view, self._release, slot, sequence)
        return view

    def _release(self, slot: int, sequence: int) -> None:
        """Runs when the last view of a taken slot is gone (any thread)."""
        seg = self._seg
        with self._lock:
            if not seg.headers:
                return  # the segment was closed: nobody writes it any more
            h = seg.headers[slot]
            if int(h[_SEQ_BEGIN]) == int(h[_SEQ_END]) == sequence and int(h[_STATE]) == HELD:
                h[_STATE] = FREE
                self.released += 1
            else:
                self.overwritten_in_use += 1

    def held(self) -> int:
        seg = self._seg
        return sum(1 for i in range(seg.n_slots) if seg.headers and seg.state(i) == HELD)

    def close(self) -> None:
        """Unlink the file (the writer keeps its mapping until it detaches); slots still held stay
        mapped until their views are gone."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        with self._lock:
            self._seg.drop()


class RingWriter:
    """The plugin's side: attaches to an announced segment and fills FREE slots. One producer
    (the forward thread); ``acquire`` never waits."""

    def __init__(self, geometry: Geometry, segment: _Segment) -> None:
        self.geometry, self._seg = geometry, segment
        self._name = Path(geometry.path).name  # every descriptor names it: parse the path once
        self._next = 0
        self._seq = 0
        self.detached = False
        self.writes = 0
        self.full = 0

    @classmethod
    def attach(cls, path: str, n_slots: int, slot_bytes: int, nonce: bytes) -> RingWriter:
        """Map the sidecar's segment; RingError unless it is exactly the one announced."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise RingError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            size = segment_bytes(n_slots, slot_bytes)
            if not stat.S_ISREG(st.st_mode):
                raise RingError(f"{path} is not a regular file")
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise RingError(f"{path}: owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o} "
                                f"(want uid {os.getuid()}, mode 600)")
            if st.st_size != size:
                raise RingError(f"{path}: {st.st_size} bytes, the announced geometry needs {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        want = _header(n_slots, slot_bytes, nonce)
        if mm[:len(want)] != want:
            mm.close()
            raise RingError(f"{path}: header does not match the announced ring (another sidecar's file?)")
        return cls(Geometry(path, n_slots, slot_bytes, nonce), _Segment(mm, n_slots, slot_bytes))

    @property
    def name(self) -> str:
        return self._name

    @property
    def slot_bytes(self) -> int:
        return self._seg.slot_bytes

    def acquire(self, nbytes: int) -> tuple[int, int, np.ndarray] | None:
        """(slot, sequence, uint8 view of ``nbytes``) of a FREE slot now WRITING, or None when
        every slot is still in use (counted in ``full``) or the step does not fit a slot."""
        seg = self._seg
        if nbytes > seg.slot_bytes or self.detached:
            return None
        n = seg.n_slots
        for k in range(n):
            slot = (self._next + k) % n
            h = seg.headers[slot]
            if int(h[_STATE]) == FREE:
                self._next = (slot + 1) % n
                self._seq += 1
                h[_STATE] = WRITING
                h[_SEQ_BEGIN] = self._seq
                return slot, self._seq, seg.payload(slot, nbytes)
        self.full += 1
        return None

    def publish(self, slot: int, sequence: int, step: int, nbytes: int) -> None:
        """The payload is written: close the seqlock and hand the slot to the reader."""
        h = self._seg.headers[slot]
        h[_STEP] = step
        h[_NBYTES] = nbytes
        h[_SEQ_END] = sequence
        h[_STATE] = READY
        self.writes += 1

    def abandon(self, slot: int) -> None:
        """A slot acquired but not published (the copy failed): give it back."""
        self._seg.headers[slot][_STATE] = FREE

    def free_slots(self) -> int:
        seg = self._seg
        return sum(1 for i in range(seg.n_slots) if seg.state(i) == FREE)

    def detach(self) -> None:
        """Write no more slots. The mapping stays until the last reference is gone: the forward
        thread may be copying into a slot right now (it is then dropped, never read)."""
        self.detached = True


def remove_stale(directory: str | Path) -> list[str]:
    """Unlink ring files (and lane sockets) of this user whose sidecar process is gone (a SIGKILLed sidecar cannot
    unlink its own). Returns the names removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _NAME.match(entry.name)
        if not m:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or _alive(pid):
                continue
            os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
