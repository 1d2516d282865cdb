"""Streaming safetensors writer.

A safetensors file is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`
(plus `__metadata__`), then the raw bytes, contiguous in header order. With every output tensor's name, dtype and
shape known before the first is computed, each shard's header is written first and each tensor's bytes are written
to their place (`os.pwrite`) as soon as they exist: no shard is ever held in memory, and tensors may arrive in any
order, from any thread.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
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


PAGE = 4096  # O_DIRECT's alignment of offsets, lengths and memory (512 on some disks; 4096 suits all)
STAGE = 8 << 20  # bytes copied to an aligned buffer and written directly at a time


def _open_direct(path: Path) -> Optional[int]:
    """A second descriptor of a shard that writes around the page cache (O_DIRECT), or None where there is none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:  # a file system without it (tmpfs on older kernels)
        return None


class ShardWriter:
    """Creates the shard files of a Layout and writes tensors into their slots. The whole pages of each write go
    around the page cache (O_DIRECT) from a reused buffer, where the file system allows: an output is new memory in
    the page cache, and on a VM whose host takes freed memory back, each first touch of it is a host fault. The
    partial pages at a write's ends, which neighbouring writes share, go through the page cache; a page is only ever
    written one way."""

    def __init__(self, folder: Path, layout: Layout, create: bool = True):
        self.folder, self.layout = folder, layout
        self.fds: List[int] = []
        self.direct: List[Optional[int]] = []
        self._opened: List[int] = []  # the direct descriptors, closed by close()
        self._stage = threading.local()
        for name, head, size in zip(layout.files, layout.headers, layout.sizes):
            path = folder / name
            flags = os.O_RDWR | (os.O_CREAT if create else 0)
            fd = os.open(path, flags, 0o644)
            self.fds.append(fd)
            if create:
                self._pwrite(fd, head, 0, name)
                os.ftruncate(fd, size)
            direct = _open_direct(path)
            self.direct.append(direct)
            if direct is not None:
                self._opened.append(direct)

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
        self._place(slot.shard, data, slot.offset + row_offset * row_bytes, name)
        return data

    def _place(self, shard: int, data, at: int, what: str) -> None:
        """Bytes `data` at offset `at` of a shard: its whole pages directly (where the shard allows), the rest
        through the page cache and handed to the disk (write_back)."""
        fd, end = self.fds[shard], at + len(data)
        a, z = -(-at // PAGE) * PAGE, end // PAGE * PAGE  # the whole pages: [a, z)
        if self.direct[shard] is None or z - a < PAGE:
            a = z = end  # all of it through the page cache
        for lo, hi in ((at, a), (z, end)):  # the partial pages at either end
            if hi > lo:
                self._pwrite(fd, data[lo - at : hi - at], lo, what)
                write_back(fd, lo, hi - lo)
        for lo in range(a, z, STAGE):
            self._direct(shard, data[lo - at : min(z, lo + STAGE) - at], lo, what)

    def _direct(self, shard: int, part, at: int, what: str) -> None:
        """Page-aligned bytes written around the page cache, copied first to this thread's aligned buffer; where the
        file system refuses (EINVAL), this shard's writes go through the page cache from then on."""
        buf = getattr(self._stage, "buf", None)
        if buf is None:
            raw = np.empty(STAGE + PAGE, dtype=np.uint8)
            self._stage.buf = buf = raw[-raw.ctypes.data % PAGE :][:STAGE]
        view = buf[: len(part)]
        np.copyto(view, np.frombuffer(part, dtype=np.uint8))
        fd, done = self.direct[shard], 0  # None: another thread found the file system refusing since _place
        try:
            while fd is not None and done < len(view):
                got = os.pwrite(fd, view[done:], at + done)
                if got <= 0 or got % PAGE:
                    break  # left for the page cache below
                done += got
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise MergeError(f"writing {what} failed: {e.strerror} (disk full?)") from None
            self.direct[shard] = None  # its descriptor stays open until close(): another thread may be using it
        if done < len(view):
            self._pwrite(self.fds[shard], view[done:], at + done, what)
            write_back(self.fds[shard], at + done, len(view) - done)

    def read_back(self, name: str) -> bytes:
        slot = self.layout.slots[name]
        return os.pread(self.fds[slot.shard], slot.nbytes, slot.offset)

    def close(self, sync: bool = True) -> None:
        for fd in self._opened:
            os.close(fd)
        self.direct, self._opened = [], []
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
