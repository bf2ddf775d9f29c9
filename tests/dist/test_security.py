"""Security of a live sidecar: every socket of the host and the ranks is on loopback; hostile peers during start-up
are refused without a byte of theirs decoded (a pickle payload is never unpickled); after start-up the host no
longer listens, so a late connect is refused by the OS; the session secret is on no command line, in no log, and
in no rank's environment (a 0600 file, removed after start-up)."""

from __future__ import annotations

import ast
import ipaddress
import logging
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import psutil
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_backend import launcher, protocol
from dist_backend.channel import MAX_FRAME_BYTES, Channel, client_connect, new_secret
from dist_backend.errors import ProtocolError
from dist_backend.worker import ENV_SECRET_FILE

from tests.dist.reliability_cases import PROMPTS, SHORT, session

ROOT = Path(__file__).resolve().parents[2]


class _Pwn:
    """Unpickling this runs `touch <path>`: the marker file exists only if some code unpickled our bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _hostile_peers(address, marker: str, sent: list[str]) -> None:
    """What a local attacker can try in the start-up window, before the real ranks (which first import torch)."""
    def attempt(name, fn):
        try:
            fn()
        except (OSError, ProtocolError):
            pass
        sent.append(name)

    def raw(payload: bytes, *, linger: float = 0.0):
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(payload)
            time.sleep(linger)

    attempt("garbage", lambda: raw(os.urandom(4096)))
    attempt("pickle", lambda: raw(pickle.dumps(_Pwn(marker)) * 4))
    attempt("wrong secret", lambda: client_connect(*address, new_secret(), timeout=5))
    attempt("silent", lambda: raw(b"", linger=1.0))  # connects, then says nothing until the handshake deadline


def test_hostile_peers_during_start_up_are_refused(tiny_dirs, tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    sent: list[str] = []
    listeners = []

    class WatchedListener(launcher.Listener):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            listeners.append(self)
            threading.Thread(target=_hostile_peers, args=(self.address, str(marker), sent), daemon=True).start()

    monkeypatch.setattr(launcher, "Listener", WatchedListener)
    s = session()
    try:
        _, images = s.generate(model_dir=tiny_dirs["flux"], prompts=PROMPTS[:1], **SHORT)
        assert images.shape == (1, 64, 64, 3)
        assert sent == ["garbage", "pickle", "wrong secret", "silent"]  # all tried before the ranks got in
        assert listeners[0].rejected >= 3  # each refused at the challenge (a peer that closes first is not counted)
        assert not marker.exists(), "hostile bytes were unpickled"
    finally:
        s.close()


def test_live_sidecar_refuses_late_connections_and_keeps_only_loopback_sockets(tiny_dirs, tmp_path, caplog,
                                                                             monkeypatch):
    caplog.set_level(logging.DEBUG)
    secret = new_secret()
    monkeypatch.setattr(launcher, "new_secret", lambda: secret)  # known to the test, so it can look for it
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")  # as ComfyUI sets it for itself
    s = session(ulysses=2)
    try:
        s.load(tiny_dirs["flux"])
        cond = s.encode(PROMPTS[:1])
        before = s.denoise(cond, **SHORT)
        sidecar = s.sidecar
        control = sidecar._launched.listener.address
        procs = [psutil.Process()] + [psutil.Process(pid) for pid in s.sidecar_pids()]
        # The host stopped listening when the last rank got in: connects are refused by the OS, nothing is read.
        assert not [c for c in procs[0].net_connections("inet") if c.status == psutil.CONN_LISTEN]
        attempts = {"nothing": lambda: _send(control, b""), "garbage": lambda: _send(control, os.urandom(64)),
                    "pickle": lambda: _send(control, pickle.dumps(_Pwn(str(tmp_path / "pwned")))),
                    "wrong secret": lambda: client_connect(*control, new_secret(), timeout=2)}
        for name, attempt in attempts.items():
            try:
                attempt()
            except ConnectionRefusedError:
                continue
            # Ephemeral ports belong to the whole machine: only if another process bound the freed port meanwhile
            # can a connect get through, and then it reached that process, not the sidecar.
            owners = [p.pid for p in procs if any(c.laddr.port == control[1] and c.status == psutil.CONN_LISTEN
                                                  for c in p.net_connections("inet"))]
            assert not owners, f"{name}: the control port {control} accepted a connection (listening: {owners})"
        assert not (tmp_path / "pwned").exists()

        listening = [c.laddr for p in procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening, "the ranks' gloo and TCPStore sockets should be listed"
        assert all(ipaddress.ip_address(a.ip).is_loopback for a in listening), listening
        master_port = int(psutil.Process(s.sidecar_pids()[0]).environ()["DISTDIFF_MASTER_PORT"])
        assert any(a.port == master_port for a in listening)  # the TCPStore is among them, on loopback

        # The secret: in no environment block, on no command line, in no log of host or ranks; its 0600 file is gone
        # once every rank is in (the ranks' environment names only the path).
        texts = [" ".join(p.cmdline()) for p in procs]
        texts += [f.read_text(errors="replace") for f in Path(sidecar.log_dir).glob("*.log")]
        texts.append(caplog.text)
        texts += [Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace") for pid in s.sidecar_pids()]
        assert not [t for t in texts if secret.hex() in t], "the secret leaked"
        for pid in s.sidecar_pids():
            secret_file = Path(psutil.Process(pid).environ()[ENV_SECRET_FILE])
            assert not secret_file.exists(), "the secret file must be removed once the ranks are in"
            assert "PYTORCH_CUDA_ALLOC_CONF" not in psutil.Process(pid).environ()  # not inherited from the host
        assert torch.equal(s.denoise(cond, **SHORT), before) and s.starts == 1  # unharmed
    finally:
        s.close()


def _send(address, payload: bytes) -> None:
    with socket.create_connection(address, timeout=2) as sock:
        sock.sendall(payload)


def test_nothing_on_the_control_plane_unpickles():
    """Static guard for the invariant behind all of the above: the modules that handle received bytes import no
    pickle, marshal or multiprocessing, and call no eval, exec or torch.load."""
    for name in ("channel", "protocol", "driver", "launcher", "worker", "rank_engine", "session"):
        tree = ast.parse((ROOT / "dist_backend" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in {"pickle", "marshal", "multiprocessing", "dill"} for m in modules), \
                    f"{name}.py imports {modules}"
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                assert called not in {"eval", "exec", "torch.load", "pickle.loads"}, f"{name}.py calls {called}"


# Lengths a peer may announce: near the truth, or past the limit. (Lengths in between make the receiver allocate
# them up front: bounded by MAX_FRAME_BYTES, and only an authenticated peer gets that far; see docs/RELIABILITY.md.)
LENGTHS = st.one_of(st.integers(0, 4096), st.integers(MAX_FRAME_BYTES + 1, 2**64 - 1))


@given(frame=st.binary(max_size=512), length=LENGTHS)
@settings(max_examples=100, deadline=None)
def test_frames_over_a_real_channel_only_raise_protocol_error(frame, length):
    """Frames through a real socket pair (the length prefix included, so a peer may lie about it): decoding gives
    a message or ProtocolError, never another exception, and a huge announced length is refused unread."""
    a, b = socket.socketpair()
    sender, receiver = Channel(a), Channel(b)
    try:
        sender.send(frame)
        got = receiver.recv(timeout=2)
        assert bytes(got) == frame
        try:
            protocol.decode(got)
        except ProtocolError:
            pass
        a.sendall(length.to_bytes(8, "little") + frame)
        try:
            body = receiver.recv(timeout=0.02)
            assert len(body) == length
        except ProtocolError:  # over MAX_FRAME_BYTES, or fewer bytes than announced before the deadline
            pass
    finally:
        sender.close()
        receiver.close()
