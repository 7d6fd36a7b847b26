"""Read TensorFlow "tensor bundle" (V2) checkpoints, such as OpenAI's GPT-2 ``model.ckpt``, without TensorFlow.

A bundle with prefix ``model.ckpt`` is:

* ``model.ckpt.index``: an SSTable (LevelDB table format) mapping each variable name to a serialized
  ``BundleEntryProto`` (dtype, shape, shard, offset, size, crc32c). The entry with the empty key is a
  ``BundleHeaderProto`` (number of shards, endianness, version).
* ``model.ckpt.data-0000K-of-0000N``: the raw tensor bytes, one file per shard.

Only numpy is needed. Protobuf messages are decoded with a tiny wire-format reader using the field numbers
of TensorFlow's ``tensor_bundle.proto``, ``tensor_shape.proto`` and ``types.proto``.

Limits: block checksums of the index are verified, but the crc32c of each tensor's data is not (in pure
Python that would take minutes for a multi-GB checkpoint); a truncated data file is still detected.
Partitioned (sliced) variables and string tensors are not supported and raise ``CheckpointError``.
"""

from __future__ import annotations

import glob
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from gpt2fast.checkpoint.files import MAX_NAME_CHARS, inside_folder
from gpt2fast.errors import CheckpointError

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes, then the 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
_COMPRESSION_NAMES = {1: "snappy", 2: "zlib"}

# types.proto DataType -> numpy dtype. DT_BFLOAT16 is widened to float32 after reading (see _read_tensor).
_DTYPES = {
    1: np.dtype(np.float32),  # DT_FLOAT
    2: np.dtype(np.float64),  # DT_DOUBLE
    3: np.dtype(np.int32),  # DT_INT32
    4: np.dtype(np.uint8),  # DT_UINT8
    5: np.dtype(np.int16),  # DT_INT16
    6: np.dtype(np.int8),  # DT_INT8
    9: np.dtype(np.int64),  # DT_INT64
    10: np.dtype(np.bool_),  # DT_BOOL
    14: np.dtype(np.uint16),  # DT_BFLOAT16, stored as the top 16 bits of a float32
    17: np.dtype(np.uint16),  # DT_UINT16
    19: np.dtype(np.float16),  # DT_HALF
    22: np.dtype(np.uint32),  # DT_UINT32
    23: np.dtype(np.uint64),  # DT_UINT64
}
_DT_BFLOAT16 = 14


class _FormatError(Exception):
    """A malformed structure; read_tf_bundle adds the file name and turns it into CheckpointError."""


# --- protobuf wire format -------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise _FormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
    raise _FormatError("varint longer than 10 bytes")


def _parse_message(buf: bytes) -> dict[int, list[int | bytes]]:
    """Decode one message into {field number: [values]}: ints for varint/fixed fields, bytes otherwise."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            if pos + width > len(buf):
                raise _FormatError("truncated fixed-width protobuf field")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise _FormatError("truncated length-delimited protobuf field")
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise _FormatError(f"unsupported protobuf wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def _int_field(fields: dict[int, list[int | bytes]], number: int, default: int = 0) -> int:
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]  # protobuf semantics: the last occurrence wins
    if not isinstance(value, int):
        raise _FormatError(f"protobuf field {number} should be an integer")
    return value - (1 << 64) if value >= 1 << 63 else value  # int64 negatives are 10-byte varints


def _bytes_fields(fields: dict[int, list[int | bytes]], number: int) -> list[bytes]:
    values = fields.get(number, [])
    if not all(isinstance(v, bytes) for v in values):
        raise _FormatError(f"protobuf field {number} should be a message")
    return values  # type: ignore[return-value]


# --- SSTable (LevelDB table format) ---------------------------------------------------------------------


def _make_crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    # Index blocks are a few KB, so a table-driven pure-Python crc is fast enough.
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    # LevelDB masks stored crcs so that a crc of data containing crcs is not degenerate.
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_block(table: bytes, handle: bytes) -> bytes:
    offset, pos = _read_varint(handle, 0)
    size, _ = _read_varint(handle, pos)
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(table):
        raise _FormatError(f"block at offset {offset} (size {size}) runs past the end of the file")
    # The crc covers the compression byte too, so check it first: a flipped byte is corruption, not compression.
    (stored_crc,) = struct.unpack_from("<I", table, end + 1)
    if _masked_crc32c(table[offset : end + 1]) != stored_crc:
        raise _FormatError(f"checksum mismatch in block at offset {offset}")
    compression = table[end]
    if compression != 0:
        name = _COMPRESSION_NAMES.get(compression, f"unknown type {compression}")
        raise _FormatError(f"block at offset {offset} is compressed ({name}); only uncompressed tables are supported")
    return table[offset:end]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) pairs; keys share a prefix with the previous key to save space."""
    if len(block) < 4:
        raise _FormatError("block too short for its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    entries_end = len(block) - 4 - 4 * num_restarts
    if entries_end < 0:
        raise _FormatError("block restart array larger than the block")
    key, pos = b"", 0
    while pos < entries_end:
        shared, pos = _read_varint(block, pos)
        unshared, pos = _read_varint(block, pos)
        value_len, pos = _read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > entries_end:
            raise _FormatError("corrupt block entry")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _table_entries(table: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(table) < _FOOTER_SIZE:
        raise _FormatError(f"file is {len(table)} bytes, too short for a table footer")
    footer = table[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
    if magic != _TABLE_MAGIC:
        raise _FormatError(f"bad table magic {magic:#018x} (expected {_TABLE_MAGIC:#018x}); not a TF index file?")
    _, pos = _read_varint(footer, 0)  # the metaindex block is unused by tensor bundles
    _, pos = _read_varint(footer, pos)
    index_handle = footer[pos:]
    for _, data_handle in _block_entries(_read_block(table, index_handle)):
        yield from _block_entries(_read_block(table, data_handle))


# --- tensor bundle --------------------------------------------------------------------------------------


class _Entry(NamedTuple):
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int


def _parse_header(value: bytes) -> tuple[int, str]:
    fields = _parse_message(value)
    num_shards = _int_field(fields, 1, default=1)
    endianness = _int_field(fields, 2)
    min_consumer = _int_field(_parse_message(b"".join(_bytes_fields(fields, 3))), 2)
    if num_shards < 1 or endianness not in (0, 1):
        raise _FormatError(f"invalid bundle header (num_shards={num_shards}, endianness={endianness})")
    if min_consumer > 1:  # TensorFlow's own reader understands bundle version 1 only
        raise _FormatError(f"bundle format version needs a reader of version {min_consumer}; only 1 is supported")
    return num_shards, "<" if endianness == 0 else ">"


def _parse_entry(name: str, value: bytes) -> _Entry:
    fields = _parse_message(value)
    if _bytes_fields(fields, 7):
        raise _FormatError(f"tensor {name!r} is a partitioned (sliced) variable, which is not supported")
    shape_fields = _parse_message(b"".join(_bytes_fields(fields, 2)))
    shape = tuple(_int_field(_parse_message(dim), 1) for dim in _bytes_fields(shape_fields, 2))
    if _int_field(shape_fields, 3) or any(d < 0 for d in shape):
        raise _FormatError(f"tensor {name!r} has an unknown shape")
    return _Entry(_int_field(fields, 1), shape, _int_field(fields, 3), _int_field(fields, 4), _int_field(fields, 5))


def _read_index(index_path: Path) -> tuple[int, str, dict[str, _Entry]]:
    """Return (num_shards, numpy byte order, {name: entry}) from the .index file."""
    try:
        table = index_path.read_bytes()  # small: about 100 bytes per tensor
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read index file: {e.strerror or e}") from None
    header, entries = None, {}
    try:
        for key, value in _table_entries(table):
            if key == b"":
                header = _parse_header(value)
            else:
                name = key.decode("utf-8", errors="replace")
                entries[name] = _parse_entry(name, value)
    except _FormatError as e:
        raise CheckpointError(f"{index_path}: {e}") from None
    if header is None:
        raise CheckpointError(f"{index_path}: no bundle header (empty key); not a TF V2 checkpoint index?")
    num_shards = header[0]
    for name, entry in entries.items():
        if not 0 <= entry.shard_id < num_shards:
            raise CheckpointError(f"{index_path}: tensor {name!r} is in shard {entry.shard_id} of {num_shards}")
    return num_shards, header[1], entries


def _read_tensor(file: BinaryIO, data_path: Path, name: str, entry: _Entry, byte_order: str) -> np.ndarray:
    if entry.dtype not in _DTYPES:
        raise CheckpointError(f"{data_path}: tensor {name!r} has unsupported TensorFlow dtype enum {entry.dtype}")
    dtype = _DTYPES[entry.dtype].newbyteorder(byte_order)
    count = math.prod(entry.shape)
    if entry.size != count * dtype.itemsize:
        expected = count * dtype.itemsize
        raise CheckpointError(
            f"{data_path}: tensor {name!r} has {entry.size} bytes, expected {expected} for {entry.shape}"
        )
    file_size = os.fstat(file.fileno()).st_size
    if entry.offset < 0 or entry.offset + entry.size > file_size:
        raise CheckpointError(
            f"{data_path}: tensor {name!r} spans bytes {entry.offset}..{entry.offset + entry.size} "
            f"but the file has only {file_size} bytes (truncated?)"
        )
    file.seek(entry.offset)
    # np.fromfile reads straight into the array's memory: no intermediate bytes object for multi-GB files.
    array = np.fromfile(file, dtype=dtype, count=count) if count else np.empty(0, dtype)
    if array.size != count:
        raise CheckpointError(f"{data_path}: short read for tensor {name!r}")
    array = array.astype(dtype.newbyteorder("="), copy=False).reshape(entry.shape)
    if entry.dtype == _DT_BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is the top half of a float32
    return array


def read_tf_bundle(
    prefix: str | Path, check_shapes: Callable[[dict[str, tuple[int, ...]]], None] | None = None
) -> dict[str, np.ndarray]:
    """Read every variable of a TensorFlow V2 checkpoint into numpy arrays, keyed by variable name.

    ``prefix`` is the path without extension (``model.ckpt`` for ``model.ckpt.index`` and
    ``model.ckpt.data-00000-of-00001``). Arrays keep the checkpoint's shape and dtype, except that
    bfloat16 tensors are returned as float32 (exactly; numpy has no bfloat16). Big-endian bundles
    are converted to native byte order. Names come back in the index's (sorted) order.
    ``check_shapes``, if given, sees every name and shape from the index before any data is read.

    Raises ``CheckpointError`` naming the file for any missing, truncated or unsupported input.

    Example:
        >>> tensors = read_tf_bundle("models/124M/model.ckpt")  # doctest: +SKIP
        >>> tensors["model/wte"].shape  # doctest: +SKIP
        (50257, 768)
    """
    prefix = Path(prefix)
    index_path = prefix.with_name(prefix.name + ".index")
    num_shards, byte_order, entries = _read_index(index_path)
    if check_shapes is not None:
        check_shapes({name: entry.shape for name, entry in entries.items()})
    tensors = {}
    for shard_id in sorted({entry.shard_id for entry in entries.values()}):
        data_path = prefix.with_name(f"{prefix.name}.data-{shard_id:05d}-of-{num_shards:05d}")
        try:
            with open(data_path, "rb") as file:
                for name, entry in entries.items():
                    if entry.shard_id == shard_id:
                        tensors[name] = _read_tensor(file, data_path, name, entry, byte_order)
        except OSError as e:
            raise CheckpointError(f"{data_path}: cannot read data file: {e.strerror or e}") from None
    return {name: tensors[name] for name in entries}


# --- the "checkpoint" state file ------------------------------------------------------------------------

_CHECKPOINT_LINE = re.compile(rb'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', re.MULTILINE)
_ESCAPE = re.compile(rb"\\([0-7]{1,3}|x[0-9a-fA-F]{1,2}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r"}


def _c_unescape(raw: bytes) -> bytes:
    # Text-format protobuf strings are C-escaped, with non-ASCII bytes written as octal (\303\251).
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code[0] in b"01234567":
            return bytes([int(code, 8) & 0xFF])
        if code[0] == ord("x") and len(code) > 1:
            return bytes([int(code[1:], 16)])
        return _SIMPLE_ESCAPES.get(code, code)

    return _ESCAPE.sub(one, raw)


def find_checkpoint_prefix(folder: str | Path) -> Path:
    """Find the checkpoint prefix in a folder as OpenAI ships it (``checkpoint``, ``model.ckpt.*``).

    Reads ``model_checkpoint_path`` from the text file ``folder/checkpoint``; a relative path is taken
    relative to ``folder``. TF writes absolute paths by default, which go stale when a folder is copied
    or moved, so for an absolute path a prefix of the same name inside ``folder`` is preferred. A name that
    leads outside ``folder`` (``..``, an absolute path elsewhere, a symlink) is refused. Without a
    ``checkpoint`` file, falls back to ``folder/model.ckpt`` when ``model.ckpt.index`` exists.
    Raises ``CheckpointError`` if no prefix with an index file is found.

    Example:
        >>> find_checkpoint_prefix("models/124M")  # doctest: +SKIP
        PosixPath('models/124M/model.ckpt')
    """
    folder = Path(folder)
    state_path = folder / "checkpoint"
    if not state_path.exists():
        if (folder / "model.ckpt.index").exists():
            return folder / "model.ckpt"
        raise CheckpointError(f"{state_path}: no 'checkpoint' file and no model.ckpt.index in {folder}")
    try:
        match = _CHECKPOINT_LINE.search(state_path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{state_path}: cannot read checkpoint state file: {e.strerror or e}") from None
    if match is None:
        raise CheckpointError(f"{state_path}: no model_checkpoint_path line")
    text = os.fsdecode(_c_unescape(match.group(1)))
    if len(text) <= MAX_NAME_CHARS and "\0" not in text and Path(text).is_absolute():  # else inside_folder refuses
        if os.path.exists(f"{folder / Path(text).name}.index"):
            text = Path(text).name  # TF writes absolute paths, stale once the folder moves: take the one here
        elif Path(text).resolve().is_relative_to(folder.resolve()):
            text = str(Path(text).resolve().relative_to(folder.resolve()))
    prefix = inside_folder(folder, text, state_path)
    if not os.path.exists(f"{prefix}.index"):  # os.path.exists: False, not OSError, for names the OS refuses
        raise CheckpointError(f"{state_path}: names {text!r}, but {prefix}.index does not exist")
    for path in (Path(f"{prefix}.index"), *prefix.parent.glob(glob.escape(prefix.name) + ".data-*")):
        inside_folder(folder, str(path.relative_to(folder)), state_path)  # no link out of the folder either
    return prefix
