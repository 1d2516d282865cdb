"""Order-free randomness: a counter-based generator keyed by (seed, model, tensor).

`uniform(key, start, n)` returns the uniforms of elements start..start+n-1 of a tensor's flattened stream. Each
value is a pure function of (key, element index): the same on any device, with any thread count, whatever order
tensors are processed in or however a tensor is split into row blocks. The mixer is SplitMix64's finalizer
(Steele, Lea and Flood, 2014), computed in wrapping int64 arithmetic; the top 24 bits become a float32 in [0, 1).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

import torch

from mergesmith.methods.parallel import split

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


_CHUNK = 1 << 16  # elements hashed at a time: the temporaries stay in cache


def _mix_(z: torch.Tensor, t: torch.Tensor) -> None:
    """SplitMix64's finalizer, in place on int64 `z` (wrapping), with `t` as scratch."""
    for shift, mult in ((30, _C1), (27, _C2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)  # logical shift: torch's >> is arithmetic
        z.bitwise_xor_(t)
        if mult is not None:
            z.mul_(_i64(mult))


_MASK64 = (1 << 64) - 1
_STRIDES = None


def _strides() -> "np.ndarray":
    """i * golden (wrapping) for i < _CHUNK, computed once."""
    global _STRIDES
    if _STRIDES is None:
        _STRIDES = np.arange(_CHUNK, dtype=np.uint64) * np.uint64(_GOLDEN)
    return _STRIDES


def _uniform_np(key: int, start: int, out: "np.ndarray") -> None:
    """The same stream with numpy's native uint64 arithmetic (wrapping multiply, logical shifts): fewer passes
    than torch's int64 emulation and it releases the GIL, so chunks run on several cores."""
    z = np.empty(min(_CHUNK, out.size), dtype=np.uint64)
    t = np.empty_like(z)
    c1, c2 = np.uint64(_C1), np.uint64(_C2)
    for a in range(0, out.size, _CHUNK):
        b = min(out.size, a + _CHUNK)
        zz, tt = z[: b - a], t[: b - a]
        # (start + a + i) * golden + key, wrapping: a per-chunk constant plus a table of i * golden
        np.add(_strides()[: b - a], np.uint64(((start + a) * _GOLDEN + key) & _MASK64), out=zz)
        for shift, mult in ((30, c1), (27, c2), (31, None)):
            np.right_shift(zz, np.uint64(shift), out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            if mult is not None:
                np.multiply(zz, mult, out=zz)
        np.right_shift(zz, np.uint64(40), out=zz)
        np.multiply(zz, 2.0**-24, out=out[a:b], casting="unsafe")


def numpy_path(device: torch.device | str) -> bool:
    """Whether the numpy SplitMix64 serves this device (the CPU); elsewhere the same integer arithmetic runs in
    torch on the device. tests/test_device_paths.py patches this to run the device path on the CPU."""
    return torch.device(device).type == "cpu"


def uniform(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1) for elements start..start+n-1 of the stream `key`."""
    if numpy_path(device):
        res = torch.empty(n, dtype=torch.float32)
        out = res.numpy()
        split(lambda a, b: _uniform_np(key, start + a, out[a:b]), n, grain=16 * _CHUNK)
        return res
    out = torch.empty(n, dtype=torch.float32, device=device)
    step = _CHUNK if torch.device(device).type == "cpu" else max(n, 1)
    z = torch.empty(min(step, n), dtype=torch.int64, device=device)
    t = torch.empty_like(z)
    for a in range(0, n, step):
        b = min(n, a + step)
        zz, tt = z[: b - a], t[: b - a]
        torch.arange(start + a, start + b, dtype=torch.int64, device=device, out=zz)
        zz.mul_(_i64(_GOLDEN)).add_(_i64(key))
        _mix_(zz, tt)
        torch.bitwise_right_shift(zz, 40, out=tt)
        tt.bitwise_and_((1 << 24) - 1)
        out[a:b] = tt
    return out.mul_(2.0**-24)


def uniform_like(key: int, shape: torch.Size, row_offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms for a block of rows of a 2-D view: element (r, c) is stream index (row_offset + r) * cols + c."""
    rows = shape[0] if len(shape) else 1
    cols = 1
    for s in shape[1:]:
        cols *= s
    return uniform(key, row_offset * cols, rows * cols, device).reshape(shape)
