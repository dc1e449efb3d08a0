"""Streaming safetensors reading and writing in numpy, BF16 included.

The `safetensors` numpy API cannot hold BF16 and loads whole files; checkpoints here are read one
tensor at a time through a memory map (peak memory ~ one tensor) and written through a spool file,
so a shard never has to sit in memory. BF16 travels as raw uint16 bits (see `to_float32`).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CodecError, unique_keys

# safetensors dtype name -> numpy storage dtype (BF16 is stored as its raw 16 bits).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "F16", "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One safetensors file, validated up front; tensors are memory-mapped on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse_header()

    def _parse_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CodecError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CodecError(f"{self.path}: corrupt or truncated safetensors header (says {n} bytes, "
                                     f"file has {size})")
                raw = f.read(n)
        except OSError as e:
            raise CodecError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CodecError(f"{self.path}: corrupt safetensors header ({e})") from None
        data_start = 8 + n
        data_len = size - data_start
        for name, spec in header.items():
            if name == "__metadata__":
                if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                    raise CodecError(f"{self.path}: __metadata__ must map names to strings")
                self.metadata = dict(spec)
                continue
            dtype, shape, (b, e) = self._entry(name, spec)
            want = int(np.prod(shape, dtype=object)) * STORAGE_DTYPES[dtype].itemsize  # Python ints: no overflow
            if not (0 <= b <= e) or e - b != want:
                raise CodecError(f"{self.path}: tensor '{name}' has data offsets [{b}, {e}) that do not match "
                                 f"its shape {list(shape)} and dtype {dtype}")
            if e > data_len:
                raise CodecError(f"{self.path}: truncated: tensor '{name}' ends at byte {data_start + e}, "
                                 f"file has {size}")
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + b, data_start + e)

    def _entry(self, name: str, spec) -> tuple[str, tuple[int, ...], tuple[int, int]]:
        """(dtype, shape, data offsets) of a header entry, each checked for type and sign."""
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not isinstance(spec, dict):
            raise CodecError(f"{self.path}: tensor '{name}' has a malformed header entry")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
            raise CodecError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype!r} "
                             f"(supported: {', '.join(STORAGE_DTYPES)})")
        if not isinstance(shape, list) or not all(whole(d) for d in shape):
            raise CodecError(f"{self.path}: tensor '{name}' has a malformed shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets):
            raise CodecError(f"{self.path}: tensor '{name}' has malformed data offsets {offsets!r}")
        return dtype, tuple(shape), (offsets[0], offsets[1])

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> np.ndarray:
        """The tensor in its storage dtype (BF16 as uint16 bits), memory-mapped read-only."""
        info = self.tensors[name]
        dt = STORAGE_DTYPES[info.dtype]
        if info.end == info.begin:
            return np.zeros(info.shape, dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=info.begin, shape=info.shape)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32 values (BF16 bits are shifted into the high half of a float32)."""
    if dtype == "BF16":
        return (np.asarray(array, np.uint32) << 16).view(np.float32)
    return np.asarray(array, np.float32)


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32/float64 values -> storage array of `dtype` with round-to-nearest-even (BF16 included)."""
    if dtype == "BF16":
        values = np.asarray(values)
        f32 = values.astype(np.float32)
        bits = f32.view(np.uint32).copy()
        if values.dtype == np.float64:
            # float64 -> float32 -> bf16 can round twice; where float32 landed exactly on a bf16 tie,
            # nudge it one float32 ulp towards the true value so the result is the single rounding.
            tie = ((bits & np.uint32(0xFFFF)) == np.uint32(0x8000)) & (f32 != values)
            away = np.abs(values) > np.abs(f32)
            bits[tie & away] += np.uint32(1)
            bits[tie & ~away] -= np.uint32(1)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
        out = (rounded >> 16).astype(np.uint16)
        out[np.isnan(f32)] = np.uint16(0x7FC0)
        return out
    return np.asarray(values).astype(STORAGE_DTYPES[dtype])


def dtype_name(array: np.ndarray) -> str:
    for name, dt in STORAGE_DTYPES.items():
        if name != "BF16" and array.dtype == dt:
            return name
    raise CodecError(f"arrays of numpy dtype {array.dtype} cannot be written to safetensors")


class ShardWriter:
    """Writes one safetensors file tensor by tensor: data goes to a spool file, the header last."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._spool = tempfile.TemporaryFile(dir=self.path.parent)
        self._header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray, dtype: str | None = None) -> None:
        """Append a tensor; `dtype` overrides the safetensors dtype (needed for BF16 bit arrays)."""
        if name in self._header:
            raise CodecError(f"{self.path}: tensor '{name}' written twice")
        arr = np.ascontiguousarray(array)
        dtype = dtype or dtype_name(arr)
        data = arr.astype(STORAGE_DTYPES[dtype].newbyteorder("<"), copy=False).tobytes()
        self._header[name] = {"dtype": dtype, "shape": list(arr.shape),
                              "data_offsets": [self.nbytes, self.nbytes + len(data)]}
        self._spool.write(data)
        self.nbytes += len(data)

    def close(self, metadata: dict[str, str] | None = None) -> None:
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            self._spool.seek(0)
            shutil.copyfileobj(self._spool, out, 16 << 20)
        self._spool.close()


def iter_checkpoint_files(src: Path) -> Iterator[Path]:
    """The safetensors files of a Hugging Face checkpoint dir (sharded via its index, or single)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CodecError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (src / f).exists():
                raise CodecError(f"{index}: lists shard '{f}', which is missing from {src}")
        yield from (src / f for f in files)
        return
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CodecError(f"{src}: no *.safetensors weights found (PyTorch .bin checkpoints are not supported; "
                         "convert them with save_pretrained(safe_serialization=True))")
    yield from files
