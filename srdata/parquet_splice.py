"""Assemble parquet files from row groups encoded elsewhere, byte for byte, without decoding.

``srdata export`` encodes each disjoint part of the curriculum once and appends each of
its row groups to every cumulative stage file that holds it; re-encoding the same rows
for every stage cost about half of the export's CPU time at 10M rows.

A parquet file is b"PAR1", column chunks, a footer (FileMetaData in the Thrift compact
protocol), the footer's length and b"PAR1". Placing a row group in another file means
writing its column chunks' bytes there and its footer entry with the chunks' offsets
moved. The footer is decoded into a generic tree that re-encodes to the same bytes, so
fields this code does not know (statistics, encodings, newer additions) pass through
untouched. Bytes that no footer entry points at (alignment padding, a replaced chunk)
are allowed by the format and never read.
"""

from __future__ import annotations

import copy
import mmap
import os
import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COPY_BLOCK_BYTES = 8 << 20

_MAGIC = b"PAR1"
# Thrift compact protocol type ids.
_TRUE, _FALSE, _I8, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
# Field ids in parquet.thrift.
_FILE_NUM_ROWS, _FILE_ROW_GROUPS, _FILE_KEY_VALUE_METADATA = 3, 4, 5
GROUP_COLUMNS, _GROUP_BYTE_SIZE, GROUP_NUM_ROWS, _GROUP_FILE_OFFSET, _GROUP_COMPRESSED_SIZE, _GROUP_ORDINAL = 1, 2, 3, 5, 6, 7
_CHUNK_FILE_PATH, _CHUNK_FILE_OFFSET, _CHUNK_META = 1, 2, 3
_CHUNK_UNSUPPORTED = {4: "an offset index", 6: "a column index", 8: "encryption", 9: "encryption"}
_META_PATH, _META_UNCOMPRESSED, _META_COMPRESSED = 3, 6, 7
_META_OFFSETS = (9, 10, 11)  # data, index and dictionary page offsets
_META_DATA_PAGE, _META_DICTIONARY_PAGE, _META_BLOOM_FILTER = 9, 11, 14

Struct = list  # [[field_id, type, value], ...] in wire order


class ThriftReader:
    """Decodes a Thrift compact-protocol struct into a ``Struct`` tree."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def struct(self) -> Struct:
        fields, field_id = [], 0
        while header := self._byte():
            kind, delta = header & 0x0F, header >> 4
            field_id = field_id + delta if delta else self._zigzag()
            value = kind == _TRUE if kind in (_TRUE, _FALSE) else self._value(kind)
            fields.append([field_id, kind, value])
        return fields

    def _value(self, kind: int) -> Any:
        if kind == _STRUCT:
            return self.struct()
        if kind in (_LIST, _SET):
            header = self._byte()
            size = header >> 4 if header >> 4 != 15 else self._varint()
            element = header & 0x0F
            return (element, [self._element(element) for _ in range(size)])
        if kind in (_I16, _I32, _I64):
            return self._zigzag()
        if kind == _BINARY:
            size = self._varint()
            self.pos += size
            return self.data[self.pos - size : self.pos]
        if kind == _I8:
            return self._byte()
        if kind == _DOUBLE:
            self.pos += 8
            return self.data[self.pos - 8 : self.pos]
        raise ValueError(f"unsupported Thrift type {kind} in a parquet footer")

    def _element(self, kind: int) -> Any:
        return self._byte() if kind in (_TRUE, _FALSE) else self._value(kind)  # booleans in lists: one byte

    def _byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def _varint(self) -> int:
        result = shift = 0
        while True:
            byte = self._byte()
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    def _zigzag(self) -> int:
        n = self._varint()
        return (n >> 1) ^ -(n & 1)


class ThriftWriter:
    """Encodes a ``Struct`` tree back into the Thrift compact protocol."""

    def __init__(self) -> None:
        self.out = bytearray()

    def struct(self, fields: Struct) -> bytes:
        last = 0
        for field_id, kind, value in fields:
            wire = (_TRUE if value else _FALSE) if kind in (_TRUE, _FALSE) else kind
            if 0 < field_id - last <= 15:
                self.out.append((field_id - last) << 4 | wire)
            else:
                self.out.append(wire)
                self._zigzag(field_id)
            last = field_id
            if kind not in (_TRUE, _FALSE):
                self._value(kind, value)
        self.out.append(0)
        return bytes(self.out)

    def _value(self, kind: int, value: Any) -> None:
        if kind == _STRUCT:
            self.struct(value)
        elif kind in (_LIST, _SET):
            element, items = value
            if len(items) < 15:
                self.out.append(len(items) << 4 | element)
            else:
                self.out.append(0xF0 | element)
                self._varint(len(items))
            for item in items:
                self.out.append(item) if element in (_TRUE, _FALSE, _I8) else self._value(element, item)
        elif kind in (_I16, _I32, _I64):
            self._zigzag(value)
        elif kind == _BINARY:
            self._varint(len(value))
            self.out += value
        elif kind == _I8:
            self.out.append(value)
        elif kind == _DOUBLE:
            self.out += value

    def _varint(self, n: int) -> None:
        while n > 0x7F:
            self.out.append(n & 0x7F | 0x80)
            n >>= 7
        self.out.append(n)

    def _zigzag(self, n: int) -> None:
        self._varint((n << 1) ^ (n >> 63))


def _field(fields: Struct, field_id: int) -> list | None:
    return next((f for f in fields if f[0] == field_id), None)


def get_field(fields: Struct, field_id: int, default: Any = None) -> Any:
    found = _field(fields, field_id)
    return default if found is None else found[2]


def _set(fields: Struct, field_id: int, value: Any) -> None:
    found = _field(fields, field_id)
    if found is not None:
        found[2] = value


@dataclass(frozen=True)
class Footer:
    """A parquet file's decoded footer and the byte offset where it starts."""

    fields: Struct
    start: int


def read_footer(path: Path) -> Footer:
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(size - 8)
        tail = handle.read(8)
        if size < 12 or tail[4:] != _MAGIC:
            raise ValueError(f"{path} is not a parquet file")
        start = size - 8 - int.from_bytes(tail[:4], "little")
        handle.seek(start)
        return Footer(ThriftReader(handle.read(size - 8 - start)).struct(), start)


def footer_from_bytes(data: bytes) -> Footer:
    """The footer at the end of a whole parquet file's bytes (``start`` relative to them)."""
    if len(data) < 12 or data[-4:] != _MAGIC:
        raise ValueError("not the end of a parquet file")
    start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    return Footer(ThriftReader(data[start:-8]).struct(), start)


def without_key_value_metadata(footer: Footer) -> Struct:
    """The footer's fields but its key-value metadata (where pyarrow keeps ``ARROW:schema``)."""
    return [f for f in footer.fields if f[0] != _FILE_KEY_VALUE_METADATA]


def row_groups(footer: Footer) -> list[Struct]:
    return get_field(footer.fields, _FILE_ROW_GROUPS, (_STRUCT, []))[1]


def chunk_index(group: Struct, column: str) -> int:
    """Position of a top-level primitive column's chunk in a row group (chunks are per leaf)."""
    paths = [get_field(get_field(chunk, _CHUNK_META), _META_PATH)[1] for chunk in get_field(group, GROUP_COLUMNS)[1]]
    return paths.index([column.encode()])


def chunk_bytes_range(chunk: Struct) -> tuple[int, int]:
    """Start and length of a column chunk's bytes (dictionary page first, when there is one)."""
    for field_id, what in _CHUNK_UNSUPPORTED.items():
        if _field(chunk, field_id) is not None:
            raise ValueError(f"cannot copy a parquet column chunk with {what}")
    if get_field(chunk, _CHUNK_FILE_PATH) is not None:
        raise ValueError("cannot copy a parquet column chunk stored in another file")
    meta = get_field(chunk, _CHUNK_META)
    if _field(meta, _META_BLOOM_FILTER) is not None:
        raise ValueError("cannot copy a parquet column chunk with a bloom filter")
    offsets = [o for o in (get_field(meta, _META_DICTIONARY_PAGE), get_field(meta, _META_DATA_PAGE)) if o]
    return min(offsets), get_field(meta, _META_COMPRESSED)


def moved_chunk(chunk: Struct, shift: int) -> Struct:
    """A copy of a column chunk's footer entry with its offsets moved by ``shift`` bytes."""
    moved = copy.deepcopy(chunk)
    if get_field(moved, _CHUNK_FILE_OFFSET):
        _set(moved, _CHUNK_FILE_OFFSET, get_field(moved, _CHUNK_FILE_OFFSET) + shift)
    meta = get_field(moved, _CHUNK_META)
    for field_id in _META_OFFSETS:
        if get_field(meta, field_id):
            _set(meta, field_id, get_field(meta, field_id) + shift)
    return moved


def with_chunks(group: Struct, chunks: list[Struct], ordinal: int) -> Struct:
    """A row group's footer entry with its column chunks replaced (same columns, new places)."""
    old_chunks = get_field(group, GROUP_COLUMNS)[1]
    moved = copy.deepcopy([f for f in group if f[0] != GROUP_COLUMNS])
    moved.append([GROUP_COLUMNS, _LIST, (_STRUCT, chunks)])
    moved.sort(key=lambda f: f[0])
    # Sizes change only by what a replaced chunk brings: keep the writer's own convention.
    for field_id, meta_id in ((_GROUP_BYTE_SIZE, _META_UNCOMPRESSED), (_GROUP_COMPRESSED_SIZE, _META_COMPRESSED)):
        change = sum(get_field(get_field(new, _CHUNK_META), meta_id) - get_field(get_field(old, _CHUNK_META), meta_id) for new, old in zip(chunks, old_chunks))
        if get_field(moved, field_id) is not None:
            _set(moved, field_id, get_field(moved, field_id) + change)
    _set(moved, _GROUP_FILE_OFFSET, min(chunk_bytes_range(chunk)[0] for chunk in chunks))
    _set(moved, _GROUP_ORDINAL, ordinal)
    return moved


def footer_bytes(template: Footer, groups: list[Struct]) -> bytes:
    """A file's end: a footer like ``template`` listing ``groups``, its length and the magic."""
    footer = copy.deepcopy([f for f in template.fields if f[0] != _FILE_ROW_GROUPS])
    _set(footer, _FILE_NUM_ROWS, sum(get_field(g, GROUP_NUM_ROWS) for g in groups))
    footer.append([_FILE_ROW_GROUPS, _LIST, (_STRUCT, groups)])
    footer.sort(key=lambda f: f[0])
    encoded = ThriftWriter().struct(footer)
    return encoded + len(encoded).to_bytes(4, "little") + _MAGIC


def copy_bytes(source: int, dest: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``source`` from ``offset`` to ``dest``, in the kernel when it can."""
    while length > 0:
        try:
            copied = os.copy_file_range(source, dest, min(length, COPY_BLOCK_BYTES * 16), offset)
        except (AttributeError, OSError):  # no copy_file_range here: copy through memory
            os.lseek(source, offset, os.SEEK_SET)
            copied = _write_all(dest, os.read(source, min(length, COPY_BLOCK_BYTES)))
        if copied == 0:
            raise OSError(f"unexpected end of a parquet file while copying {length} bytes at offset {offset}")
        offset += copied
        length -= copied


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


ALIGNMENT = 4096  # O_DIRECT needs file offsets, lengths and memory aligned to the device's block size


class AlignedBuffer:
    """A page-aligned, growable byte buffer (anonymous mmap), reused so its pages stay mapped."""

    def __init__(self, capacity: int = 32 << 20) -> None:
        self._map = mmap.mmap(-1, _aligned(capacity))
        self.size = 0

    def append(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self.size + len(view) > len(self._map):
            grown = mmap.mmap(-1, _aligned(max(2 * len(self._map), self.size + len(view))))
            grown[: self.size] = self._map[: self.size]
            self._map.close()
            self._map = grown
        self._map[self.size : self.size + len(view)] = view
        self.size += len(view)

    def padded(self) -> memoryview:
        """The content, zero-padded to a multiple of ``ALIGNMENT`` (the view is valid until the next append)."""
        end = _aligned(self.size)
        self._map[self.size : end] = bytes(end - self.size)
        return memoryview(self._map)[:end]

    def content(self) -> bytes:
        return self._map[: self.size]

    def clear(self) -> None:
        self.size = 0


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class BlockFile:
    """A file written in ``ALIGNMENT``-aligned blocks, bypassing the page cache (O_DIRECT) where it can.

    Writing GBs through the page cache costs several CPU-seconds of kernel time per GB on
    a VM whose memory is reclaimed by the host (measured 3x slower than O_DIRECT for
    1 GB); a file written for a trainer to read later gains nothing from being cached.
    Falls back to ordinary writes where O_DIRECT is refused (tmpfs, some network file
    systems), and uses them always when ``SRDATA_DIRECT_IO=0`` is set. Threads may append
    concurrently: each append reserves its own range. It starts with parquet's magic in
    its first block; ``finish`` writes the unaligned tail.
    """

    def __init__(self, path: Path, direct: bool | None = None) -> None:
        if direct is None:
            direct = os.environ.get("SRDATA_DIRECT_IO", "1") != "0"
        self.path = path
        self._lock = threading.Lock()
        self.fd = self._open(path, direct)
        self.end = 0
        first = AlignedBuffer(ALIGNMENT)
        first.append(_MAGIC)
        self.append(first.padded())

    def _open(self, path: Path, direct: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self.direct = direct and hasattr(os, "O_DIRECT")
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError:
                self.direct = False
        return os.open(path, flags, 0o644)

    def append(self, block: memoryview) -> int:
        """Write aligned ``block`` after everything appended before; return its offset."""
        offset = self.reserve(len(block))
        self.write_at(block, offset)
        return offset

    def reserve(self, length: int) -> int:
        """The offset of ``length`` bytes after everything reserved before (written later with ``write_at``)."""
        with self._lock:
            offset = self.end
            self.end += length
        return offset

    def write_at(self, block: memoryview, offset: int) -> None:
        try:
            _pwrite_all(self.fd, block, offset)
        except OSError:
            if not self.direct:
                raise
            self._reopen_buffered()  # O_DIRECT accepted at open, refused at write
            _pwrite_all(self.fd, block, offset)

    def _reopen_buffered(self) -> None:
        with self._lock:
            if self.direct:
                fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
                os.close(self.fd)
                self.fd, self.direct = fd, False

    def finish(self, tail: bytes) -> None:
        """Write ``tail`` (the unaligned end: footer, length, magic) after the blocks, then close."""
        self.close()
        fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            _pwrite_all(fd, memoryview(tail), self.end)
        finally:
            os.close(fd)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with suppress(OSError):
                os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
