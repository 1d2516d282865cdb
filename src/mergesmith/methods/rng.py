"""Order-free randomness: a counter-based generator keyed by (seed, model, tensor).

`uniform(key, start, n)` returns the uniforms of elements start..start+n-1 of a tensor's flattened stream. Each
value is a pure function of (key, element index): the same on any device, with any thread count, whatever order
tensors are processed in or however a tensor is split into row blocks. The mixer is SplitMix64's finalizer
(Steele, Lea and Flood, 2014), computed in wrapping int64 arithmetic; the top 24 bits become a float32 in [0, 1).
"""

from __future__ import annotations

import hashlib
import struct

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _i64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


def stream_key(seed: int, model: str, tensor: str) -> int:
    """A 64-bit key for one (seed, model, tensor) stream, stable across runs, platforms and Python versions."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", _i64(seed)))
    for part in (model, tensor):
        b = part.encode("utf-8")
        h.update(struct.pack("<I", len(b)) + b)
    return _i64(int.from_bytes(h.digest(), "little"))


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniform(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1) for elements start..start+n-1 of the stream `key`."""
    z = torch.arange(start, start + n, dtype=torch.int64, device=device)
    z.mul_(_i64(_GOLDEN)).add_(_i64(key))
    z = (z ^ _shr(z, 30)).mul_(_i64(_C1))
    z = (z ^ _shr(z, 27)).mul_(_i64(_C2))
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32).mul_(2.0 ** -24)


def uniform_like(key: int, shape: torch.Size, row_offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms for a block of rows of a 2-D view: element (r, c) is stream index (row_offset + r) * cols + c."""
    rows = shape[0] if len(shape) else 1
    cols = 1
    for s in shape[1:]:
        cols *= s
    return uniform(key, row_offset * cols, rows * cols, device).reshape(shape)
