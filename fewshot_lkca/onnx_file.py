"""Read and rewrite an exported ONNX model's head and metadata without the ``onnx`` package (device side).

A device that adapts a model holds onnxruntime, numpy and Pillow, not ``onnx``. What adaptation changes is small: one
fp32 initializer (the head matrix, named in the model's metadata) and the ``metadata_props``. Both are fields of the
protobuf an ``.onnx`` file is, so this module walks the protobuf wire format (varint tags, length-delimited fields)
far enough to find them, and copies every other byte through unchanged:

* ``ModelProto``: field 7 ``graph``, field 14 ``metadata_props`` (``StringStringEntryProto``: 1 key, 2 value).
* ``GraphProto``: field 5 ``initializer`` (``TensorProto``).
* ``TensorProto``: 1 ``dims`` (int64, packed or not), 2 ``data_type`` (1 = FLOAT), 4 ``float_data``, 8 ``name``,
  9 ``raw_data`` (little-endian).

Field numbers are those of onnx/onnx.proto (stable since IR version 3).

Example:
    >>> model = OnnxFile.read('model.onnx')  # doctest: +SKIP
    >>> head = model.initializer('fewshot_lkca_head')  # doctest: +SKIP
    >>> props = dict(model.metadata, classes='["a", "b", "c"]')  # doctest: +SKIP
    >>> new_bytes = model.rewrite({'fewshot_lkca_head': head[:, :3]}, props)  # doctest: +SKIP
"""
import os
from pathlib import Path

import numpy as np

__all__ = ['OnnxFileError', 'OnnxFile']

_MODEL_GRAPH, _MODEL_METADATA = 7, 14
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_FLOATS, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 4, 8, 9
_FLOAT = 1
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class OnnxFileError(ValueError):
    """The bytes are not an ONNX model this module can read, or the asked-for initializer is not in it."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise OnnxFileError('truncated or malformed protobuf (a varint runs past the end)')
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf writes negative int64 as ten bytes of two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _fields(buf: bytes):
    """(field number, wire type, value, start, end) of each field of one message; value is an int or a memoryview
    of the payload for length-delimited fields; start..end spans the whole field (tag included)."""
    pos, view = 0, memoryview(buf)
    while pos < len(buf):
        start = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise OnnxFileError('truncated or malformed protobuf (a field runs past the end)')
            value, pos = view[pos:pos + length], pos + length
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            value, pos = bytes(view[pos:pos + size]), pos + size
        else:
            raise OnnxFileError(f'not an ONNX model (protobuf wire type {wire} at byte {start})')
        if number == 0:
            raise OnnxFileError(f'not an ONNX model (field number 0 at byte {start})')
        yield number, wire, value, start, pos


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _tensor_name(payload) -> str | None:
    for number, wire, value, _, _ in _fields(bytes(payload)):
        if number == _TENSOR_NAME and wire == _LEN:
            return bytes(value).decode('utf-8')
    return None


def _decode_tensor(payload: bytes) -> np.ndarray:
    dims, dtype, raw, floats = [], None, None, []
    for number, wire, value, _, _ in _fields(payload):
        if number == _TENSOR_DIMS:
            if wire == _LEN:  # packed
                pos, packed = 0, bytes(value)
                while pos < len(packed):
                    dim, pos = _varint(packed, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif number == _TENSOR_TYPE:
            dtype = value
        elif number == _TENSOR_RAW:
            raw = bytes(value)
        elif number == _TENSOR_FLOATS:
            floats.append(np.frombuffer(bytes(value), '<f4') if wire == _LEN else np.frombuffer(value, '<f4'))
    if dtype != _FLOAT:
        raise OnnxFileError(f'the head initializer is not float32 (ONNX data type {dtype})')
    data = np.frombuffer(raw, '<f4') if raw is not None else np.concatenate(floats or [np.zeros(0, '<f4')])
    if data.size != int(np.prod(dims)):
        raise OnnxFileError(f'the head initializer holds {data.size} values for dims {dims}')
    return data.reshape(dims).astype(np.float32)


def _encode_tensor(name: str, array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype='<f4')
    out = b''.join(_encode_varint(_TENSOR_DIMS << 3 | _VARINT) + _encode_varint(d) for d in array.shape)
    out += _encode_varint(_TENSOR_TYPE << 3 | _VARINT) + _encode_varint(_FLOAT)
    return out + _field(_TENSOR_NAME, name.encode('utf-8')) + _field(_TENSOR_RAW, array.tobytes())


def _encode_metadata(props: dict[str, str]) -> bytes:
    return b''.join(_field(_MODEL_METADATA, _field(1, k.encode('utf-8')) + _field(2, v.encode('utf-8')))
                    for k, v in props.items())


class OnnxFile:
    """An ONNX model's bytes, with its metadata and fp32 initializers readable and replaceable.

    Raises:
        OnnxFileError: The bytes are not a protobuf ONNX model (no graph).
    """

    def __init__(self, data: bytes, source: str = 'the model'):
        self.data, self.source = data, source
        self.metadata: dict[str, str] = {}
        self._graph = None
        try:
            for number, wire, value, start, end in _fields(data):
                if number == _MODEL_GRAPH and wire == _LEN:
                    self._graph = (start, end, value)
                elif number == _MODEL_METADATA and wire == _LEN:
                    entry = {n: bytes(v).decode('utf-8') for n, w, v, _, _ in _fields(bytes(value)) if w == _LEN}
                    self.metadata[entry.get(1, '')] = entry.get(2, '')
        except UnicodeDecodeError:
            raise OnnxFileError(f'{source}: not an ONNX model (metadata is not text)') from None
        except OnnxFileError as e:
            raise OnnxFileError(f'{source}: {e}') from None
        if self._graph is None:
            raise OnnxFileError(f'{source}: not an ONNX model (no graph)')

    @classmethod
    def read(cls, path: str | os.PathLike) -> 'OnnxFile':
        return cls(Path(path).read_bytes(), str(path))

    def _initializers(self):
        start, end, graph = self._graph
        for number, wire, value, s, e in _fields(bytes(graph)):
            if number == _GRAPH_INITIALIZER and wire == _LEN:
                yield _tensor_name(value), value, s, e

    def initializer(self, name: str) -> np.ndarray:
        """The fp32 initializer ``name`` as an array (a copy)."""
        for found, payload, _, _ in self._initializers():
            if found == name:
                return _decode_tensor(bytes(payload))
        raise OnnxFileError(f"{self.source}: no initializer named '{name}'")

    def rewrite(self, initializers: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
        """The model's bytes with ``initializers`` replaced (each must exist, any shape) and ``metadata`` as its
        whole ``metadata_props``; every other field is copied through byte for byte."""
        start, end, graph = self._graph
        graph, parts, last, seen = bytes(graph), [], 0, set()
        for name, _, s, e in self._initializers():
            if name in initializers:
                parts += [graph[last:s], _field(_GRAPH_INITIALIZER, _encode_tensor(name, initializers[name]))]
                last = e
                seen.add(name)
        missing = set(initializers) - seen
        if missing:
            raise OnnxFileError(f"{self.source}: no initializer named {', '.join(sorted(missing))}")
        new_graph = b''.join(parts) + graph[last:]
        body, last = [], 0
        for number, _, _, s, e in _fields(self.data):
            if number == _MODEL_METADATA:
                body.append(self.data[last:s])
                last = e
            elif number == _MODEL_GRAPH:
                body += [self.data[last:s], _field(_MODEL_GRAPH, new_graph)]
                last = e
        body.append(self.data[last:])
        return b''.join(body) + _encode_metadata(metadata)
