"""The control-message codec: builtins and CPU tensors only, never pickle.

A frame is ``MAGIC | u32 header_len | header (UTF-8 JSON) | tensor bytes...``. The header holds the message with
every tensor replaced by ``{"__t__": index}`` and a table of (dtype, shape, nbytes[, at]). A tensor of at least
ARENA_MIN_BYTES is put in the sender's shared arena instead when one is given (``at`` = its offset there), so only
the header crosses the socket. Decoding checks every length and type before building anything, so a hostile or
broken peer can only ever cause a ProtocolError.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

from .config import WireEnum
from .errors import ProtocolError

MAGIC = b"DDF1"
_HEAD = struct.Struct("<4sI")
MAX_HEADER_BYTES = 16 * 1024 * 1024
TENSOR_KEY = "__t__"
ARENA_MIN_BYTES = 1 << 20  # below this, the copy into the frame costs less than the bookkeeping

class Op(WireEnum):
    """What the host asks of every rank (``{"op": ..., "id": call}``)."""

    LOAD = "load"
    ENCODE = "encode"
    DENOISE = "denoise"
    DECODE = "decode"
    PING = "ping"
    UNLOAD = "unload"
    SET_LORAS = "set_loras"  # make the ranks hold exactly this LoRA set (lora.py)
    CANCEL = "cancel"  # stop the call with this id at its next step boundary
    SHUTDOWN = "shutdown"


class Event(WireEnum):
    """What a rank tells the host besides its answer (``{"event": ...}``)."""

    HELLO = "hello"  # connected and authenticated (start-up)
    READY = "ready"  # in the process group (start-up)
    PROGRESS = "progress"  # a leader finished a denoise step: done / total
    HEARTBEAT = "heartbeat"  # a CP non-leader finished a denoise step (alive; its progress is its leader's)
    ALIVE = "alive"  # the beat thread: the process runs (with "loading" while weights load)
    JOIN = "join"  # a node's `join` asks for ranks (cluster.py), before any rank of it connects
    ASSIGN = "assign"  # the head's answer to JOIN: the node's first rank, its count, the world size
    REFUSED = "refused"  # the head's answer to a JOIN it does not admit, with the reason


# Closed set of dtypes that may cross the channel, by name.
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def encode(message: Any, *, arena=None) -> bytes:
    """Message (nested dict/list/str/int/float/bool/None/CPU tensor) -> one frame. With an `arena.Arena`, large
    tensors are copied into it (once) and the frame carries their offsets."""
    tensors: list[torch.Tensor] = []
    table: list[dict[str, Any]] = []

    def walk(obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (list, tuple)):
            return [walk(x) for x in obj]
        if isinstance(obj, dict):
            out = {}
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise ProtocolError(f"message keys must be str, got {type(key).__name__}")
                if key == TENSOR_KEY:
                    raise ProtocolError(f"message key {TENSOR_KEY!r} is reserved")
                out[key] = walk(value)
            return out
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                raise ProtocolError(f"only CPU tensors cross the channel, got one on {obj.device}")
            if obj.dtype not in _DTYPE_NAMES:
                raise ProtocolError(f"dtype {obj.dtype} cannot cross the channel")
            t = obj.detach().contiguous()
            table.append({"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "nbytes": t.numel() * t.element_size()})
            tensors.append(t)
            return {TENSOR_KEY: len(tensors) - 1}
        raise ProtocolError(f"type {type(obj).__name__} cannot cross the channel (builtins and CPU tensors only)")

    body = walk(message)
    inline = _place_in_arena(tensors, table, arena) if arena is not None else tensors
    header = json.dumps({"m": body, "t": table}, separators=(",", ":"), allow_nan=True).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header is {len(header)} bytes, over the {MAX_HEADER_BYTES} limit")
    parts = [_HEAD.pack(MAGIC, len(header)), header]
    parts.extend(_tensor_bytes(t) for t in inline)
    return b"".join(parts)


def _place_in_arena(tensors: list[torch.Tensor], table: list[dict[str, Any]], arena) -> list[torch.Tensor]:
    """Copy the large tensors into `arena`, record their offsets; return the tensors that stay inline."""
    from .arena import ALIGN

    offsets, end = {}, 0
    for index, spec in enumerate(table):
        if spec["nbytes"] >= ARENA_MIN_BYTES:
            offsets[index] = end
            end += -(-spec["nbytes"] // ALIGN) * ALIGN
    if not offsets:
        return tensors
    buffer = arena.buffer(end)
    for index, at in offsets.items():
        nbytes = table[index]["nbytes"]
        target = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=at)
        target.copy_(tensors[index].view(-1).view(torch.uint8))
        table[index]["at"] = at
    return [t for i, t in enumerate(tensors) if i not in offsets]


def _tensor_bytes(t: torch.Tensor) -> memoryview | bytes:
    if t.numel() == 0:
        return b""
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def decode(frame: bytes | bytearray | memoryview, *, arena=None) -> Any:
    """One frame -> message. Raises ProtocolError (only) for anything malformed. Tensors the peer put in its
    arena come back as views on `arena` (valid until the peer writes its next frame)."""
    view = memoryview(frame).cast("B")
    if len(view) < _HEAD.size:
        raise ProtocolError(f"frame of {len(view)} bytes is shorter than its {_HEAD.size}-byte head")
    magic, header_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError("frame does not start with the DistDiff magic")
    if header_len > MAX_HEADER_BYTES or _HEAD.size + header_len > len(view):
        raise ProtocolError(f"header length {header_len} does not fit a {len(view)}-byte frame")
    try:
        header = json.loads(bytes(view[_HEAD.size:_HEAD.size + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"m", "t"} or not isinstance(header["t"], list):
        raise ProtocolError("header must be an object with exactly the keys 'm' and 't'")
    offset = _HEAD.size + header_len
    tensors = []
    for index, spec in enumerate(header["t"]):
        dtype, shape, nbytes = _check_spec(index, spec)
        if "at" in spec:
            tensors.append(_from_arena(index, spec["at"], nbytes, dtype, shape, arena))
            continue
        if offset + nbytes > len(view):
            raise ProtocolError(f"tensor {index} needs {nbytes} bytes past offset {offset}; frame has {len(view)}")
        raw = view[offset:offset + nbytes]
        offset += nbytes
        if nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:
            # bytearray copy: the tensor must own its memory (the frame buffer is reused / freed).
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            tensors.append(flat.view(dtype).reshape(shape))
    if offset != len(view):
        raise ProtocolError(f"frame has {len(view) - offset} trailing bytes")
    try:
        return _restore(header["m"], tensors, set())
    except RecursionError:
        raise ProtocolError("message nests too deeply") from None


def _from_arena(index: int, at: Any, nbytes: int, dtype: torch.dtype, shape: list[int], arena) -> torch.Tensor:
    if arena is None:
        raise ProtocolError(f"tensor {index} is in a shared arena, but this channel has none")
    if type(at) is not int or at % 64:
        raise ProtocolError(f"tensor {index}: arena offset {at!r} is not an aligned int")
    try:
        raw = arena.view(at, nbytes)
    except ValueError as exc:
        raise ProtocolError(f"tensor {index}: {exc}") from None
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


def _check_spec(index: int, spec: Any) -> tuple[torch.dtype, list[int], int]:
    if not isinstance(spec, dict) or not {"dtype", "shape", "nbytes"} <= set(spec) <= {"dtype", "shape", "nbytes", "at"}:
        raise ProtocolError(f"tensor {index}: spec must have exactly dtype, shape, nbytes (and an arena offset)")
    dtype = _DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise ProtocolError(f"tensor {index}: dtype {spec['dtype']!r} is not allowed")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > 8 or not all(
        type(d) is int and 0 <= d < 2**40 for d in shape
    ):
        raise ProtocolError(f"tensor {index}: shape {shape!r} is not a list of at most 8 non-negative ints")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if spec["nbytes"] != nbytes:
        raise ProtocolError(f"tensor {index}: nbytes {spec['nbytes']!r} != prod({shape}) × {itemsize} = {nbytes}")
    return dtype, shape, nbytes


def _restore(obj: Any, tensors: list[torch.Tensor], used: set[int]) -> Any:
    if isinstance(obj, list):
        return [_restore(x, tensors, used) for x in obj]
    if isinstance(obj, dict):
        if TENSOR_KEY in obj:
            index = obj[TENSOR_KEY]
            if len(obj) != 1 or type(index) is not int or not 0 <= index < len(tensors) or index in used:
                raise ProtocolError(f"bad tensor reference {obj!r}")
            used.add(index)
            return tensors[index]
        return {k: _restore(v, tensors, used) for k, v in obj.items()}
    return obj
