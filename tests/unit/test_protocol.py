"""The control-message codec: round trips, and that nothing malformed gets past with anything but ProtocolError."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_backend import protocol
from dist_backend.errors import ProtocolError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=False),
                    st.text(max_size=20))
messages = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8).filter(lambda k: k != "__t__"),
                                                                       inner, max_size=4)), max_leaves=20)


@given(messages)
@settings(max_examples=200, deadline=None)
def test_builtins_round_trip(message):
    assert protocol.decode(protocol.encode(message)) == message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool])
def test_tensors_round_trip_bit_exact(dtype):
    t = (torch.randn(3, 5, 7) * 10).to(dtype)
    out = protocol.decode(protocol.encode({"x": [t, {"y": t[:0]}]}))
    assert out["x"][0].dtype == dtype and torch.equal(out["x"][0], t)
    assert out["x"][1]["y"].shape == (0, 5, 7)


def test_non_contiguous_tensor_is_sent_by_value():
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(protocol.decode(protocol.encode(t)), t)


@pytest.mark.parametrize("bad", [object(), {1: 2}, {"__t__": 0}, torch.randn(2).to(torch.complex64), b"bytes"])
def test_encode_refuses_what_cannot_cross(bad):
    with pytest.raises(ProtocolError):
        protocol.encode(bad)


def _frame(header: bytes, payload: bytes = b"") -> bytes:
    return protocol.MAGIC + struct.pack("<I", len(header)) + header + payload


@pytest.mark.parametrize("frame", [
    b"", b"DDF", b"XXXX\x00\x00\x00\x00",
    _frame(b"not json"), _frame(b"[]"), _frame(b'{"m":1}'),
    _frame(b'{"m":{"__t__":0},"t":[]}'),
    _frame(b'{"m":{"__t__":0},"t":[{"dtype":"float32","shape":[2],"nbytes":8}]}', b"\x00" * 4),
    _frame(b'{"m":{"__t__":0},"t":[{"dtype":"float32","shape":[2],"nbytes":9}]}', b"\x00" * 9),
    _frame(b'{"m":{"__t__":0},"t":[{"dtype":"object","shape":[2],"nbytes":8}]}', b"\x00" * 8),
    _frame(b'{"m":{"__t__":0},"t":[{"dtype":"float32","shape":[-2],"nbytes":8}]}', b"\x00" * 8),
    _frame(b'{"m":[{"__t__":0},{"__t__":0}],"t":[{"dtype":"uint8","shape":[1],"nbytes":1}]}', b"\x00"),
    _frame(b'{"m":1,"t":[]}', b"trailing"),
    protocol.MAGIC + struct.pack("<I", 2**31) + b"{}",
])
def test_malformed_frames_raise_protocol_error(frame):
    with pytest.raises(ProtocolError):
        protocol.decode(frame)


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_random_bytes_only_ever_raise_protocol_error(data):
    for frame in (data, protocol.MAGIC + data, _frame(data)):
        try:
            protocol.decode(frame)
        except ProtocolError:
            pass


@given(messages, st.integers(0, 400), st.integers(0, 255))
@settings(max_examples=300, deadline=None)
def test_corrupted_valid_frames_only_raise_protocol_error(message, position, value):
    frame = bytearray(protocol.encode({"m": message, "t": torch.arange(6, dtype=torch.int16)}))
    frame[position % len(frame)] = value
    try:
        protocol.decode(bytes(frame))
    except ProtocolError:
        pass


def test_large_tensors_cross_through_the_shared_arena_as_views():
    from dist_backend.arena import Arena

    writer = Arena.create("test-arena")
    reader = Arena(writer.fd)
    big = torch.randn(3, 512, 1024)  # 6 MiB: over ARENA_MIN_BYTES
    small = torch.arange(10)
    frame = protocol.encode({"big": big, "small": small, "more": [big[0].clone()]}, arena=writer)
    assert len(frame) < 2048, "large tensors must not travel in the frame"
    out = protocol.decode(frame, arena=reader)
    assert torch.equal(out["big"], big) and torch.equal(out["small"], small) and torch.equal(out["more"][0], big[0])
    with pytest.raises(ProtocolError, match="has none"):
        protocol.decode(frame)  # a peer without an arena cannot be pointed into one
    writer.close()


@pytest.mark.parametrize("at", [-64, 1, 2**40, "0"])
def test_arena_offsets_outside_or_misaligned_raise_protocol_error(at):
    from dist_backend.arena import Arena

    arena = Arena.create("test-arena")
    arena.buffer(4096)
    header = json.dumps({"m": {"__t__": 0}, "t": [{"dtype": "uint8", "shape": [64], "nbytes": 64, "at": at}]})
    with pytest.raises(ProtocolError):
        protocol.decode(_frame(header.encode()), arena=arena)
    arena.close()
