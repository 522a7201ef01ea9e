"""Parsing a ModelInferRequest without copying its tensor bytes.

protobuf's upb backend copies a message's bytes fields twice: into the parsed message, and again
into a new `bytes` object on every read of `raw_input_contents[i]`. With the received message
kept alive by the call, a large request was held three times over (the received bytes, the
parsed copy, the copy the pixels are viewed from). `parse_infer_request` walks the message's
top-level fields instead, keeps each `raw_input_contents` entry as a zero-copy view of the
received bytes, and has protobuf parse only the rest (names, shapes, parameters: a few hundred
bytes). The pixels are then held once, in the buffer gRPC handed over.

Messages under `WALK_FROM_BYTES`, where the copies are cheaper than the walk, and anything
unusual (a malformed field, a group, more than `MAX_FIELDS` top-level fields) go to
protobuf's own parser unchanged, so errors and the semantics of odd messages stay protobuf's.
"""

from __future__ import annotations

from typing import Any

from convserve.proto import grpc_service_pb2 as pb

RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents (repeated bytes)
LENGTH_DELIMITED = 2  # protobuf wire type
FIXED_SIZES = {1: 8, 5: 4}  # wire type -> bytes (fixed64, fixed32)
# A real request has a dozen top-level fields; a message made of millions of tiny ones would
# cost seconds of Python here, so beyond this many protobuf's C parser takes over.
MAX_FIELDS = 1024
# Below this size protobuf's copies cost less than the walk (about 4 us of Python per message;
# copying runs at about 20 GB/s): small requests are parsed by protobuf alone.
WALK_FROM_BYTES = 64 << 10


class InferRequest:
    """A parsed ModelInferRequest whose `raw_input_contents` are read-only memoryviews of the
    received bytes. Every other attribute is the parsed message's; `ByteSize()` is the size of
    the message as received."""

    __slots__ = ("message", "raw_input_contents", "_size")

    def __init__(self, message: pb.ModelInferRequest, raw: list[memoryview], size: int):
        self.message = message
        self.raw_input_contents = raw
        self._size = size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def ByteSize(self) -> int:  # noqa: N802 - protobuf's name
        return self._size


class _Unusual(Exception):
    """The walk met something it leaves to protobuf."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Unusual
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _split(data: bytes) -> tuple[list[memoryview], list[memoryview]]:
    """(`raw_input_contents` entries, the other fields' byte ranges), both views of `data`."""
    view = memoryview(data)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    pos = kept_from = fields = 0
    end = len(data)
    while pos < end:
        fields += 1
        if fields > MAX_FIELDS:
            raise _Unusual
        start = pos
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            value_end = pos + length  # past the end: caught by the check after the loop
            if key >> 3 == RAW_INPUT_CONTENTS:
                rest.append(view[kept_from:start])
                raw.append(view[pos:value_end])
                kept_from = value_end
            pos = value_end
        elif wire_type in FIXED_SIZES:
            pos += FIXED_SIZES[wire_type]
        else:  # groups (wire types 3 and 4) and invalid types
            raise _Unusual
    if pos != end:
        raise _Unusual
    rest.append(view[kept_from:])
    return raw, rest


def parse_infer_request(data: bytes) -> InferRequest | pb.ModelInferRequest:
    """`data` parsed as a ModelInferRequest, its raw tensor bytes left where they are.
    Raises what `ModelInferRequest.FromString` raises for bytes that do not parse."""
    if len(data) >= WALK_FROM_BYTES:
        try:
            raw, rest = _split(data)
        except _Unusual:
            raw = []
        if raw:
            return InferRequest(pb.ModelInferRequest.FromString(b"".join(rest)), raw, len(data))
    return pb.ModelInferRequest.FromString(data)
