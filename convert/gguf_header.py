"""A GGUF file's header, metadata and tensor table, read without turning the vocabulary into Python objects.

gguf-py's GGUFReader makes a numpy view for every part of every array element (~4 million views and 8 s for a 256k
vocabulary); verification needs a string or two, the file type and the weight count. This reads the same layout (GGUF
v2 and v3) from a mapped file and steps over arrays by their lengths; tests/unit/test_gguf_header.py checks it
against GGUFReader.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from core.errors import InvalidInput
from core.paths import require_file

MAGIC = b"GGUF"
# gguf-py's own table of the scalar value types (GGUFReader reads them with it); STRING and ARRAY are
# variable-sized and handled apart.
SCALARS = {int(t): np.dtype(d).newbyteorder("<") for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
STRING, ARRAY = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class GGUFFormatError(ValueError):
    """The bytes are not a (complete) GGUF header."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as stored: fastest-varying dimension first
    type: int  # ggml type number (gguf.GGMLQuantizationType)
    offset: int  # of its data, from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, object] = field(default_factory=dict)  # arrays as "[N items]"
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)


class _Cursor:
    """Reads little-endian values from a buffer, failing with GGUFFormatError past its end."""

    def __init__(self, buf) -> None:
        self.buf, self.off, self.size = buf, 0, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or self.off + n > self.size:
            raise GGUFFormatError(f"ends at byte {self.size}, a value at byte {self.off} needs {n} more")
        start = self.off
        self.off += n
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype in SCALARS:
            return np.frombuffer(self.buf, SCALARS[vtype], 1, self.take(SCALARS[vtype].itemsize))[0].item()
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item, count = self.u32(), self.u64()
            self.skip_array(item, count)
            return f"[{count} items]"
        raise GGUFFormatError(f"unknown value type {vtype} at byte {self.off - 4}")

    def skip_array(self, item: int, count: int) -> None:
        if item in SCALARS:
            self.take(SCALARS[item].itemsize * count)
        elif item == STRING:
            buf, off, size = self.buf, self.off, self.size
            for _ in range(count):  # the vocabulary: length, bytes, length, bytes, ...
                if off + 8 > size:
                    raise GGUFFormatError(f"ends at byte {size}, inside an array of {count} strings")
                off += 8 + _U64.unpack_from(buf, off)[0]
            self.take(off - self.off)
        elif item == ARRAY:
            for _ in range(count):
                self.skip_array(self.u32(), self.u64())
        else:
            raise GGUFFormatError(f"unknown array item type {item} at byte {self.off - 12}")


def parse(buf) -> GGUFHeader:
    """The header in `buf` (a whole file: bytes or mapped); GGUFFormatError if it is not a complete GGUF header,
    or a tensor's data would lie past the end of `buf`."""
    cur = _Cursor(buf)
    if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
        raise GGUFFormatError(f"it starts with {bytes(buf[:4])!r}, not {MAGIC!r}")
    cur.take(4)
    version = cur.u32()
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} (this reads versions 2 and 3, as llama.cpp does)")
    n_tensors, n_kv = cur.u64(), cur.u64()
    header = GGUFHeader(version)
    for _ in range(n_kv):
        key = cur.string()
        header.metadata[key] = cur.value(cur.u32())
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > 8:
            raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.u64() for _ in range(n_dims))
        header.tensors.append(TensorInfo(name, shape, cur.u32(), cur.u64()))
    # every tensor's bytes lie inside the file (a file cut in its tensor data has a whole header)
    alignment = header.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1:
        raise GGUFFormatError(f"general.alignment is {alignment!r}")
    data_start = -(-cur.off // alignment) * alignment
    for t in header.tensors:
        if t.type not in gguf.GGML_QUANT_SIZES:
            raise GGUFFormatError(f"tensor {t.name!r} has unknown ggml type {t.type}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type)]
        end = data_start + t.offset + t.n_elements // block * block_bytes
        if end > len(buf):
            raise GGUFFormatError(f"tensor {t.name!r} ends at byte {end}, past the end of the file ({len(buf)} bytes)")
    return header


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF at `path`; InvalidInput (exit 2) naming the file when it is missing, not a file,
    or not a complete GGUF (a text file named .gguf, an empty or truncated file)."""
    full = require_file(path, "GGUF file", "give the path of a .gguf file (python -m convert info FILE.gguf)")
    with open(full, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return parse(mapped)
        except (GGUFFormatError, ValueError) as e:  # ValueError: mmap of an empty file
            if f.read(4) == MAGIC:  # a GGUF cut short or overwritten: what made it can make it again
                what, fix = (
                    "truncated or damaged (its header is a GGUF's)",
                    "export it again (python -m convert export)",
                )
            else:
                what, fix = "not a GGUF file (wrong magic)", "give the path of a .gguf file that llama.cpp wrote"
            raise InvalidInput(f"{path}: {what}: {e}.\n  fix: {fix}") from None
