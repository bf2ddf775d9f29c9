"""The control channel refuses peers that cannot prove the session secret, and never decodes their bytes."""

import socket
import threading

import pytest

from dist_backend.channel import ChannelTimeout, Listener, client_connect
from dist_backend.errors import ProtocolError


def _serve(listener, secret, out):
    try:
        out.append(listener.accept(secret, timeout=10.0, handshake_timeout=1.0))
    except Exception as exc:  # recorded for the assertion
        out.append(exc)


def test_right_secret_connects_and_frames_flow():
    listener = Listener()
    out = []
    server = threading.Thread(target=_serve, args=(listener, b"s" * 32, out))
    server.start()
    client = client_connect(*listener.address, b"s" * 32, timeout=5.0)
    server.join(10)
    host_side = out[0]
    client.send(b"hello")
    assert host_side.recv(timeout=5.0) == b"hello"
    big = bytes(range(256)) * 4096
    host_side.send(big)
    assert bytes(client.recv(timeout=5.0)) == big
    client.close(), host_side.close(), listener.close()


def test_wrong_secret_silent_peer_and_garbage_are_refused_then_a_good_peer_still_gets_in():
    secret = b"k" * 32
    listener = Listener()
    out = []
    server = threading.Thread(target=_serve, args=(listener, secret, out))
    server.start()
    with pytest.raises(ProtocolError):
        client_connect(*listener.address, b"wrong" * 7, timeout=5.0)
    silent = socket.create_connection(listener.address)  # never answers the challenge
    garbage = socket.create_connection(listener.address)
    garbage.sendall(b"\x80\x04\x95" + b"A" * 100)  # a pickle opcode prefix: must never be unpickled
    good = client_connect(*listener.address, secret, timeout=10.0)
    server.join(15)
    assert not isinstance(out[0], Exception)
    assert listener.rejected >= 2
    good.close(), silent.close(), garbage.close(), listener.close()


def test_impostor_host_is_refused_by_the_rank():
    listener = Listener()
    out = []
    server = threading.Thread(target=_serve, args=(listener, b"host-secret".ljust(32), out))
    server.start()
    with pytest.raises(ProtocolError):
        client_connect(*listener.address, b"rank-secret".ljust(32), timeout=5.0)
    server.join(0.1)
    listener.close()


def test_accept_has_a_deadline():
    listener = Listener()
    with pytest.raises(ChannelTimeout):
        listener.accept(b"x" * 32, timeout=0.2)
    listener.close()


def test_the_secret_file_is_owner_only_from_its_creation(tmp_path):
    import stat

    from dist_backend.launcher import _write_secret

    path = _write_secret(tmp_path / "secret", b"\x01" * 32)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "01" * 32
