"""The sidecar's end of a stream's lane: a Unix ``SOCK_SEQPACKET`` socket beside the stream's ring
that carries the plugin's batch descriptors, RequestStarts and RequestFinishes, one serialized
``PluginMessage`` per packet, sent by the plugin's forward thread itself.

Why: once the activations go through the ring, what is left per step is a descriptor of a few
hundred bytes. On the gRPC stream each one cost the plugin a hand-off to its sender thread and
gRPC's per-message work (~50 µs of CPU, on the core the model runs on, plus thread wake-ups); on
the lane it is one non-blocking ``send``.

- **Trust**: the socket is created here (mode 0600, in the ring's directory, unlinked once
  accepted or when the stream ends) and announced only in the plan of the stream that owns the
  ring; exactly one connection is accepted, from a process of this user (``SO_PEERCRED``). A
  packet is validated like a message on the stream (size, kind, its slot in this stream's ring).
- **Order**: the plugin sends ``LaneOpen`` on the stream, then everything per step and per request
  on the lane; the lane is read only from the ``LaneOpen`` on, so nothing sent on the stream
  before is overtaken. One connection keeps the packets in the order sent.
- **Never blocks the plugin**: sequenced packets are bounded by the sender's socket buffer in
  bytes (not by ``net.unix.max_dgram_qlen``, 10 in most containers, which limits datagrams); a
  full buffer makes the plugin drop and count, never wait.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from monitor.protocol.unix_address import unix_address

MAX_PACKET = 1 << 20  # a descriptor of a 16 384-token step is ~150 KB; more is refused
RECEIVE_BUFFER = 4 << 20  # capped by net.core.rmem_max


class LaneError(OSError):
    """The lane cannot be created or accepted."""


class LaneReader:
    """One stream's lane: listening until the plugin's ``LaneOpen``, then one connection."""

    def __init__(self, path: Path, listener: socket.socket) -> None:
        self.path = path
        self._listener: socket.socket | None = listener
        self.conn: socket.socket | None = None
        self.closed = False  # the plugin closed its end (or the lane failed)
        self._buf = bytearray(MAX_PACKET)

    @classmethod
    def create(cls, ring_path: str | Path) -> LaneReader:
        """Listen on ``<ring>.lane`` (mode 0600). Raises OSError: the stream then keeps its
        descriptors on the gRPC stream."""
        path = Path(ring_path).with_suffix(".lane")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old = os.umask(0o177)
            try:
                with unix_address(str(path)) as address:
                    sock.bind(address)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            try:
                path.unlink()
            except OSError:
                pass
            raise
        return cls(path, sock)

    def accept(self) -> socket.socket:
        """The plugin's connection (made before it sent ``LaneOpen``, so already waiting). The
        listening socket is closed and unlinked: nobody else can connect. Raises LaneError."""
        listener, self._listener = self._listener, None
        if listener is None:
            raise LaneError("the lane was already opened")
        try:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                raise LaneError("LaneOpen with no connection waiting on the lane") from None
        finally:
            listener.close()
            self._unlink()
        try:
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                raise LaneError(f"lane connection from uid {uid} (pid {pid}), not this user's")
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            except OSError:
                pass
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return conn

    def receive(self, limit: int = 256) -> Iterator[bytes | None]:
        """The packets waiting now (at most ``limit``, so other streams get the loop too); None for
        one larger than MAX_PACKET (cut short, refused). Sets ``closed`` at end of stream."""
        conn = self.conn
        if conn is None:
            return
        buf = self._buf
        for _ in range(limit):
            try:
                n = conn.recv_into(buf, MAX_PACKET, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                return
            if n == 0:
                self.closed = True
                return
            yield None if n > MAX_PACKET else bytes(buf[:n])

    def fileno(self) -> int:
        return self.conn.fileno() if self.conn is not None else -1

    def close(self) -> None:
        for sock in (self._listener, self.conn):
            if sock is not None:
                sock.close()
        self._listener = self.conn = None
        self.closed = True
        self._unlink()

    def _unlink(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
