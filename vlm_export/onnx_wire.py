"""An ONNX file's graph without reading its weights: the protobuf wire format walked over a memory map.

`onnx.load(..., load_external_data=False)` still copies every inline weight into Python bytes: ~2 s
for smol's 1.2 GB CLIP-L, and the build parsed whole graphs only to list their external-data files
(verify) or to edit a few nodes (the scoring's all-positions copy, 9 s over a build). Here each
initializer's `raw_data` (TensorProto field 9) of at least `MIN_BYTES` is skipped by its length
prefix and reported as (offset, length) in the file, so what is parsed is the graph less those bytes.
A caller that needs the weights can point the tensors at the same bytes as external data
(`as_external`): ONNX external data is any file, offset and length (onnx/docs/ExternalData.md).

Field numbers are onnx.proto's (ModelProto.graph 7, GraphProto.initializer 5, TensorProto.raw_data 9;
stable since IR version 3); wire types from protobuf's encoding guide (0 varint, 1 fixed64,
2 length-delimited, 5 fixed32). Protobuf parsers accept a message's fields in any order and append
repeated ones, which `length_delimited` writers rely on (export/onnx_export.py `inline_weights`).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
MIN_BYTES = 1024  # smaller raw_data stays in the parsed proto (onnx's own external-data threshold)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field: int, length: int) -> bytes:
    """The key and length prefix of a length-delimited field whose `length` payload bytes follow."""
    return varint(field << 3 | 2) + varint(length)


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("malformed protobuf: the bytes end inside a field")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf: a varint longer than 10 bytes")


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of the field's key, start of its payload, end of the field)."""
    pos = start
    while pos < end:
        key_start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _read_varint(buf, pos)
        elif wire == 1:
            after = pos + 8
        elif wire == 5:
            after = pos + 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            after = pos + length
        else:
            raise ValueError(f"malformed or unsupported protobuf: wire type {wire} (groups are not used by ONNX)")
        if after > end:
            raise ValueError("malformed protobuf: a field runs past its message")
        yield field, wire, key_start, pos, after
        pos = after


@dataclass(frozen=True)
class SkippedData:
    index: int  # position among graph.initializer
    offset: int  # of the raw bytes in the file
    length: int


def _rebuild(buf, start: int, end: int, field_of_interest: int, rewrite) -> bytes:
    """The message buf[start:end] with each `field_of_interest` entry's payload replaced by rewrite(payload start, end)."""
    out, copied = [], start
    for field, wire, key_start, payload, after in _fields(buf, start, end):
        if field == field_of_interest and wire == 2:
            out.append(bytes(buf[copied:key_start]))
            body = rewrite(payload, after)
            out.append(length_delimited(field, len(body)) + body)
            copied = after
    out.append(bytes(buf[copied:end]))
    return b"".join(out)


def read_without_weights(path: Path, min_bytes: int = MIN_BYTES):
    """An ONNX file -> (ModelProto without the raw_data of its initializers of `min_bytes` or more,
    [SkippedData for each of them]). The file is memory-mapped: only the graph's structure is read.

    Raises ValueError on bytes that are not a protobuf message."""
    import onnx

    skipped: list[SkippedData] = []
    if Path(path).stat().st_size == 0:
        raise ValueError("malformed protobuf: an empty file")
    counter = [0]  # initializers seen so far
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        def tensor(start, end):
            keep, copied = [], start
            for field, wire, key_start, payload, after in _fields(buf, start, end):
                if field == TENSOR_RAW_DATA and wire == 2 and after - payload >= min_bytes:
                    keep.append(bytes(buf[copied:key_start]))
                    skipped.append(SkippedData(counter[0], payload, after - payload))
                    copied = after
            counter[0] += 1
            keep.append(bytes(buf[copied:end]))
            return b"".join(keep)

        graph = lambda start, end: _rebuild(buf, start, end, GRAPH_INITIALIZER, tensor)
        model = onnx.ModelProto.FromString(_rebuild(buf, 0, len(buf), MODEL_GRAPH, graph))
    return model, skipped


def as_external(model, skipped: list[SkippedData], location: str) -> None:
    """Point the skipped initializers of `model` (from read_without_weights) at their bytes in
    `location` (the file they were read from, relative to the folder ONNX Runtime resolves it in)."""
    import onnx

    initializers = model.graph.initializer
    for item in skipped:
        tensor = initializers[item.index]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(item.offset)), ("length", str(item.length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


def skipped_arrays(path: Path, model, skipped: list[SkippedData]) -> dict:
    """The skipped initializers' values (from read_without_weights on `path`) as read-only numpy
    arrays over a memory map of the file, no copy: name -> array of the tensor's dtype and dims
    (ONNX raw_data is little-endian, as is every CPU this project builds on)."""
    import numpy as np
    from onnx import helper

    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for item in skipped:
        tensor = model.graph.initializer[item.index]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        out[tensor.name] = data[item.offset:item.offset + item.length].view(dtype).reshape(tuple(tensor.dims))
    return out
