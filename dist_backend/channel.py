"""Authenticated, framed TCP channel between the host and each rank.

Why our own and not `multiprocessing.connection`: its `recv()` unpickles, its handshake blocks forever on a silent
peer, and it has no deadlines. Here every read and every write can have a deadline, the peer must prove the
per-session secret with an HMAC challenge before a single byte it sends is decoded, and frames are decoded by
`protocol` (no pickle). Waits use `poll`, not `select`: a busy ComfyUI can hold more than 1024 descriptors, and
`select` fails on a descriptor numbered above that.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import threading
import socket
import struct
import time

from .errors import ProtocolError

_LEN = struct.Struct("<Q")
NONCE_BYTES = 32
MAX_FRAME_BYTES = 8 * 1024**3  # 8 GiB: far above any latent/image batch, but bounds what a peer can make us allocate
_CHUNK = 1 << 24
_HELLO = b"DISTDIFF-HELLO-1"


class ChannelClosed(ProtocolError):
    """The peer closed the connection (or died)."""


class ChannelTimeout(ProtocolError, TimeoutError):
    """No complete frame arrived (or left) before the deadline."""


class FrameTooLarge(ProtocolError):
    """The peer announced a frame over the receiver's limit; nothing of it was read."""


def new_secret() -> bytes:
    return os.urandom(32)


def _mac(secret: bytes, nonce: bytes, role: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def wait_readable(socks, timeout: float) -> list:
    """The objects of `socks` (each with fileno()) readable now or within `timeout` seconds (EOF counts)."""
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        by_fd[sock.fileno()] = sock
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    events = poller.poll(max(0, int(timeout * 1000 + 0.999)))  # ms, rounded up: never busy-loop on 0 < t < 1 ms
    return [by_fd[fd] for fd, _ in events if fd in by_fd]


def _wait_writable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


class Channel:
    """One connected socket carrying length-prefixed frames. `send` may be called from two threads (a rank's
    main thread and its heartbeat thread): whole frames never interleave."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        sock.settimeout(None)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket (e.g. tests with socketpair)
            pass
        self.sock = sock
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self.max_frame_bytes = MAX_FRAME_BYTES
        """Largest frame `recv` accepts; the host lowers it per call to what the call's result can need."""

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes, *, timeout: float | None = None) -> None:
        """Send one whole frame. With `timeout`, raise ChannelTimeout when the peer has not taken it within that
        many seconds (a stopped peer whose socket buffer is full never does); the channel is then unusable (part
        of a frame may have gone out). None blocks until sent (a rank writing to its host)."""
        header = _LEN.pack(len(frame))
        parts = [header + frame] if len(frame) < 65536 else [header, frame]
        with self._send_lock:
            try:
                if timeout is None:
                    for part in parts:
                        self.sock.sendall(part)
                else:
                    deadline = time.monotonic() + timeout
                    for part in parts:
                        self._send_by(part, deadline)
            except ChannelTimeout:
                raise  # a TimeoutError, hence an OSError: not a closed channel
            except OSError as exc:
                raise ChannelClosed(f"send failed: {exc}") from None

    def _send_by(self, data, deadline: float) -> None:
        view = memoryview(data).cast("B")
        sent = 0
        while sent < len(view):
            try:
                # MSG_DONTWAIT: the socket stays blocking for the rank's idle recv, this one write does not block.
                sent += self.sock.send(view[sent:sent + _CHUNK], socket.MSG_DONTWAIT)
                continue
            except BlockingIOError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _wait_writable(self.sock, remaining):
                raise ChannelTimeout(f"the peer took {sent}/{len(view)} bytes of a frame before the send deadline")

    def poll(self, timeout: float = 0.0) -> bool:
        """True when at least part of a frame (or EOF) is readable now or within `timeout` seconds."""
        if self._buf:
            return True
        return bool(wait_readable([self.sock], timeout))

    def recv(self, *, timeout: float | None) -> bytes:
        """The next whole frame. `timeout` None waits forever (only for a rank idling between calls)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        header = self._read_exact(_LEN.size, deadline)
        (length,) = _LEN.unpack(header)
        if length > self.max_frame_bytes:
            # Refused before a byte of it is allocated or read: the stream is out of step, so the caller drops us.
            raise FrameTooLarge(f"peer announced a {length}-byte frame, over this call's {self.max_frame_bytes}-byte "
                                "limit (SessionConfig.max_frame_bytes)")
        return self._read_exact(length, deadline)

    def _read_exact(self, n: int, deadline: float | None) -> bytes:
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not wait_readable([self.sock], remaining):
                    raise ChannelTimeout(f"no complete frame within the deadline ({got}/{n} bytes read)")
            try:
                k = self.sock.recv_into(view[got:], min(n - got, _CHUNK))
            except OSError as exc:
                raise ChannelClosed(f"receive failed: {exc}") from None
            if k == 0:
                raise ChannelClosed("peer closed the connection")
            got += k
        return bytes(out) if n < 65536 else out  # bytearray for big frames: no extra copy

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _recv_exact_raw(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChannelTimeout("handshake timed out")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(data))
        except socket.timeout:
            raise ChannelTimeout("handshake timed out") from None
        except OSError as exc:
            raise ChannelClosed(f"handshake failed: {exc}") from None
        if not chunk:
            raise ChannelClosed("peer closed the connection during the handshake")
        data += chunk
    return data


def server_handshake(sock: socket.socket, secret: bytes, *, timeout: float) -> Channel:
    """Host side: challenge the peer; it must answer with HMAC(secret) before anything else is read.
    Then prove ourselves to the peer (mutual), so a rank never talks to an impostor host."""
    deadline = time.monotonic() + timeout
    nonce = os.urandom(NONCE_BYTES)
    try:
        sock.sendall(_HELLO + nonce)
    except OSError as exc:
        raise ChannelClosed(f"handshake failed: {exc}") from None
    answer = _recv_exact_raw(sock, 32 + NONCE_BYTES, deadline)
    if not hmac.compare_digest(answer[:32], _mac(secret, nonce, b"rank")):
        raise ProtocolError("peer failed the session-secret challenge")
    try:
        sock.sendall(_mac(secret, answer[32:], b"host"))
    except OSError as exc:
        raise ChannelClosed(f"handshake failed: {exc}") from None
    sock.settimeout(None)
    return Channel(sock)


def client_connect(host: str, port: int, secret: bytes, *, timeout: float) -> Channel:
    """Rank side: connect, answer the host's challenge, check the host's answer to ours."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    hello = _recv_exact_raw(sock, len(_HELLO) + NONCE_BYTES, deadline)
    if hello[: len(_HELLO)] != _HELLO:
        sock.close()
        raise ProtocolError("host did not speak the DistDiff handshake")
    my_nonce = os.urandom(NONCE_BYTES)
    sock.sendall(_mac(secret, hello[len(_HELLO):], b"rank") + my_nonce)
    proof = _recv_exact_raw(sock, 32, deadline)
    if not hmac.compare_digest(proof, _mac(secret, my_nonce, b"host")):
        sock.close()
        raise ProtocolError("host failed the session-secret challenge")
    sock.settimeout(None)
    return Channel(sock)


def fail_when_unreachable(sock: socket.socket, seconds: float) -> None:
    """Make a connection to another machine fail within about `seconds` once the peer stops acknowledging (its link
    removed, the machine off). Without this a node's rank waiting for its host behind a dead link would wait for
    hours: TCP keepalive is off by default and a retransmission gives up after ~15 min. Idle: keepalive probes;
    with data unacknowledged (beats): TCP_USER_TIMEOUT. Linux only (elsewhere the options do not exist: no-op).
    Not for loopback: a host that stops reading for a while must not cut its local ranks off."""
    if not all(hasattr(socket, name) for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")):
        return
    interval = max(1, int(seconds / 6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(seconds / 3)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1000, int(seconds * 1000)))


class Listener:
    """Host-side listening socket. Accepts only peers that pass the handshake; others are dropped and counted."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.address = self.sock.getsockname()[:2]
        self.rejected = 0

    def accept(self, secret: bytes, *, timeout: float, handshake_timeout: float = 5.0) -> Channel:
        """Next authenticated peer. Raises ChannelTimeout when none arrives before `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not wait_readable([self.sock], remaining):
                raise ChannelTimeout("no rank connected before the deadline")
            conn, _ = self.sock.accept()
            try:
                return server_handshake(conn, secret, timeout=min(handshake_timeout, max(0.1, remaining)))
            except ProtocolError:
                self.rejected += 1
                conn.close()

    def close(self) -> None:
        self.sock.close()
