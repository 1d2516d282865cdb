"""Streaming safetensors writer.

A safetensors file is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`
(plus `__metadata__`), then the raw bytes, contiguous in header order. With every output tensor's name, dtype and
shape known before the first is computed, each shard's header is written first and each tensor's bytes are written
to their place (`os.pwrite`) as soon as they exist: no shard is ever held in memory, and tensors may arrive in any
order, from any thread.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from mergesmith.errors import MergeError
from mergesmith.io.index import ST_DTYPES, TORCH_TO_ST


@dataclass
class Slot:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    shard: int = 0
    offset: int = 0  # absolute byte offset in the shard file

    @property
    def nbytes(self) -> int:
        n = ST_DTYPES[TORCH_TO_ST[self.dtype]][1]
        for s in self.shape:
            n *= s
        return n


@dataclass
class Layout:
    """Where every output tensor goes: shard files, their headers, and each tensor's byte offset."""

    slots: Dict[str, Slot]
    files: List[str]
    headers: List[bytes]
    sizes: List[int] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())


def plan_layout(tensors: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], max_shard_bytes: int) -> Layout:
    """Greedy sharding in the given order (a tensor larger than the limit gets a shard of its own), HF file names."""
    groups: List[List[Slot]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        s = Slot(name, dtype, tuple(shape))
        if groups[-1] and size + s.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    n = len(groups)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    slots: Dict[str, Slot] = {}
    headers, sizes = [], []
    for i, group in enumerate(groups):
        hdr: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for s in group:
            hdr[s.name] = {"dtype": TORCH_TO_ST[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
            s.offset = pos
            pos += s.nbytes
        raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - (len(raw) + 8) % 8) % 8)  # keep tensor data 8-byte aligned
        head = len(raw).to_bytes(8, "little") + raw
        for s in group:
            s.shard = i
            s.offset += len(head)
            slots[s.name] = s
        headers.append(head)
        sizes.append(len(head) + pos)
    return Layout(slots=slots, files=files, headers=headers, sizes=sizes)


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def _sync_file_range():
    """libc's sync_file_range (Linux; Python has no binding), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint], ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def write_back(fd: int, offset: int, n: int) -> None:
    """Start writing bytes [offset, offset + n) of a file to disk, without waiting: the disk writes of a merge then
    overlap its compute, and the final fsync finds little left instead of the whole output (the kernel would keep
    gigabytes dirty until then). Only a hint: where it is missing or fails, the fsync at the end writes it all."""
    if _SYNC_FILE_RANGE is not None and n > 0:
        _SYNC_FILE_RANGE(fd, offset, n, SYNC_FILE_RANGE_WRITE)


class ShardWriter:
    """Creates the shard files of a Layout and writes tensors into their slots."""

    def __init__(self, folder: Path, layout: Layout, create: bool = True):
        self.folder, self.layout = folder, layout
        self.fds: List[int] = []
        for name, head, size in zip(layout.files, layout.headers, layout.sizes):
            path = folder / name
            flags = os.O_RDWR | (os.O_CREAT if create else 0)
            fd = os.open(path, flags, 0o644)
            self.fds.append(fd)
            if create:
                self._pwrite(fd, head, 0, name)
                os.ftruncate(fd, size)

    def _pwrite(self, fd: int, data, offset: int, what: str) -> None:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise MergeError(f"writing {what} failed: {e.strerror} (disk full?)") from None

    def write(self, name: str, tensor: torch.Tensor, row_offset: int = 0):
        """Write a tensor (or a block of its rows, starting at `row_offset`) into its slot; returns the bytes."""
        slot = self.layout.slots[name]
        if tensor.dtype != slot.dtype:
            raise AssertionError(f"{name}: dtype {tensor.dtype} != planned {slot.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        row_bytes = slot.nbytes // slot.shape[0] if slot.shape and slot.shape[0] else 0
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._pwrite(self.fds[slot.shard], data, slot.offset + row_offset * row_bytes, name)
        write_back(self.fds[slot.shard], slot.offset + row_offset * row_bytes, len(data))
        return data

    def read_back(self, name: str) -> bytes:
        slot = self.layout.slots[name]
        return os.pread(self.fds[slot.shard], slot.nbytes, slot.offset)

    def close(self, sync: bool = True) -> None:
        for fd in self.fds:
            if sync:
                os.fsync(fd)
            os.close(fd)
        self.fds = []


def write_index(folder: Path, layout: Layout) -> None:
    """model.safetensors.index.json for sharded outputs (none for a single file, as transformers does)."""
    if len(layout.files) == 1:
        return
    index = {
        "metadata": {"total_size": layout.total_bytes},
        "weight_map": {s.name: layout.files[s.shard] for s in layout.slots.values()},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# mergekit's counts (K, M, B = thousand, million, billion): its help calls them parameters, but its writer compares
# the number with each tensor's bytes, so `--out-shard-size 1M` gives shards of at most 1,000,000 bytes of tensor
# data there; the same count here gives the same shards. A byte unit (KB, MB, GB, TB, KiB, ...) says bytes.
_COUNTS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_BYTES = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """The most bytes of tensor data per shard: '5B' (mergekit's default, five billion) -> 5_000_000_000, '500M'
    -> 500_000_000, '5GB' -> 5_000_000_000, '2GiB' -> 2*1024**3, '1024' -> 1024."""
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    bad = (
        f"bad size {text!r}: give a count like 5B or 500M (as mergekit counts: billions, millions) or bytes "
        "like 5GB or 2GiB"
    )
    try:
        value = float(num) * {**_COUNTS, **_BYTES}[unit]
    except (ValueError, KeyError):
        raise MergeError(bad) from None
    if not math.isfinite(value) or value < 1:  # nan, inf, 1e400GB, 0, negative, or under a byte
        raise MergeError(bad)
    return int(value)
