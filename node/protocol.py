"""The wire protocol between the aggregator (ZeroMQ ROUTER) and a node (DEALER).

A message is a multipart frame list: one msgpack header followed by one raw frame per
tensor. The header names the tensors (name, dtype, shape) so the receiver can view each
frame as an array without copying. Every field is checked on decode: a peer that sends
anything else gets a ProtocolError, never a crash.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 2  # 2: the TASK plan is node.plan.Plan.to_dict()

HELLO = "HELLO"          # node -> aggregator: name, profile, capabilities
WELCOME = "WELCOME"      # aggregator -> node: run id, model, data shard
TASK = "TASK"            # aggregator -> node: a training plan and the tensors to start from
RESULT = "RESULT"        # node -> aggregator: trained tensors and measurements
HEARTBEAT = "HEARTBEAT"  # node -> aggregator: alive, current phase
BYE = "BYE"              # either way: the run is over / the node leaves
ERROR = "ERROR"          # either way: what was wrong with the last message
TYPES = (HELLO, WELCOME, TASK, RESULT, HEARTBEAT, BYE, ERROR)

# Only plain numeric dtypes travel; anything else (object arrays, pickles) is refused.
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
_ITEMSIZE = {d: np.dtype(d).itemsize for d in DTYPES}
MAX_TENSORS = 4096
MAX_HEADER_BYTES = 16 << 20
MAX_MESSAGE_BYTES = 2 << 30
MAX_FRAME_BYTES = 512 << 20  # the aggregator's socket drops a peer that sends a larger frame (zmq MAXMSGSIZE)
MAX_NAME_LEN = 512


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says which field and why."""


@dataclass
class Message:
    type: str
    run: str = ""
    round: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION



def encode(msg: Message) -> list:
    """Frames for `msg`: msgpack header, then each tensor's buffer (no copy if contiguous)."""
    specs, frames = [], []
    for name, arr in msg.tensors.items():
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (ascontiguousarray would turn a 0-d tensor into shape (1,))
        dtype = arr.dtype.name
        if dtype not in _ITEMSIZE:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype} is not one of {', '.join(DTYPES)}")
        specs.append([name, dtype, list(arr.shape)])
        frames.append(arr.reshape(-1).data)  # flat bytes: also for 0-d and shapes with a 0
    header = {"type": msg.type, "version": msg.version, "run": msg.run, "round": int(msg.round),
              "meta": msg.meta, "tensors": specs}
    return [msgpack.packb(header, use_bin_type=True)] + frames


def _check(cond: bool, text: str) -> None:
    if not cond:
        raise ProtocolError(text)


def decode(frames: list, *, check_version: bool = True) -> Message:
    """Parse and validate a frame list; tensors are zero-copy views of the frames."""
    _check(len(frames) >= 1, "empty message")
    raw = [memoryview(getattr(f, "buffer", f)).cast("B") for f in frames]
    _check(len(raw[0]) <= MAX_HEADER_BYTES, f"header of {len(raw[0])} bytes exceeds {MAX_HEADER_BYTES}")
    _check(sum(len(r) for r in raw) <= MAX_MESSAGE_BYTES, f"message exceeds {MAX_MESSAGE_BYTES} bytes")
    try:
        header = msgpack.unpackb(raw[0], raw=False, strict_map_key=True, max_bin_len=0,
                                 max_array_len=1 << 20, max_map_len=1 << 20)
    except Exception as exc:  # msgpack raises many types for garbage
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    _check(isinstance(header, dict), f"header must be a map, got {type(header).__name__}")
    missing = {"type", "version", "run", "round", "meta", "tensors"} - header.keys()
    _check(not missing, f"header lacks field(s) {sorted(missing)}")
    version = header["version"]
    _check(isinstance(version, int) and not isinstance(version, bool), "field 'version' must be an integer")
    if check_version:
        _check(version == PROTOCOL_VERSION,
               f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    _check(header["type"] in TYPES, f"field 'type' is {header['type']!r}, allowed: {', '.join(TYPES)}")
    _check(isinstance(header["run"], str) and len(header["run"]) <= MAX_NAME_LEN, "field 'run' must be a short string")
    rnd = header["round"]
    _check(isinstance(rnd, int) and not isinstance(rnd, bool) and 0 <= rnd < 1 << 31,
           "field 'round' must be an integer in [0, 2^31)")
    _check(isinstance(header["meta"], dict), "field 'meta' must be a map")
    specs = header["tensors"]
    _check(isinstance(specs, list) and len(specs) <= MAX_TENSORS, f"field 'tensors' must be a list of at most {MAX_TENSORS}")
    _check(len(specs) == len(raw) - 1, f"header names {len(specs)} tensors but {len(raw) - 1} frames follow")
    tensors: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):  # hot path: messages are built only when a check fails
        if not (isinstance(spec, list) and len(spec) == 3):
            raise ProtocolError(f"tensors[{i}] must be [name, dtype, shape]")
        name, dtype, shape = spec
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN):
            raise ProtocolError(f"tensors[{i}].name must be a non-empty string")
        if name in tensors:
            raise ProtocolError(f"tensor {name!r} appears twice")
        if dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(type(d) is int and 0 <= d < 1 << 31 for d in shape)):
            raise ProtocolError(f"tensor {name!r}: shape must be a list of at most 8 non-negative integers")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]  # Python ints: no overflow
        if nbytes != len(raw[i + 1]):
            raise ProtocolError(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, "
                                f"frame has {len(raw[i + 1])}")
        tensors[name] = np.frombuffer(raw[i + 1], dtype=dtype).reshape(shape)
    return Message(type=header["type"], run=header["run"], round=rnd, meta=header["meta"],
                   tensors=tensors, version=version)


def frames_nbytes(frames: list) -> int:
    """Wire size of a frame list as received or about to be sent."""
    return sum(len(memoryview(getattr(f, "buffer", f)).cast("B")) for f in frames)
