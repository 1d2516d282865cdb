"""The compiled kernels (mergesmith/_kernels.c) of the CPU paths, through ctypes.

`keep_masks`: DARE and DELLA MagPrune masks in one pass per row (DELLA needs no sort: a histogram of the magnitudes
settles nearly every element's keep probability, and only the few draws it leaves open need an exact rank);
`high_counts` and `low_counts`: the two reads of sparsify.RadixSelect; `masked_sum`: the second pass of an
L1-rescaled DARE/DELLA sum (from bfloat16 blocks as stored: `masked_sum16`, widened where read); `cut_keep`: a
block's magnitude trim by its tensor's rank cut; `consensus`: the TIES disjoint merge; `gram_chunks`: float64 Gram
matrices in chunks (of float32 or bfloat16 as stored); `stock_merge`: Model Stock's interpolation; `variances`,
`cut_mask`, `selected_squares` and `sce_merge`: sce's selection key, selection, energies and merge, without stacking
the deltas (from float32 or bfloat16 as stored); `ram_merge` and `ram_counts`: RAM and RAM+ in one pass; `widen`:
the inputs' bfloat16 to float32 conversion, checked for NaN and Inf in the same pass (`nonfinite`: the check alone,
for blocks kept as stored; `delta`: a model's float32 delta from its base), and `narrow` the output's conversion
back; `masked_delta`: a block's L1-rescaled DARE/DELLA delta from pass 1's mask; `order_keys`: RadixRanks' keys of
signed values; `fusion_importance`: Arcee Fusion's importance; `weighted_sum64` and `weighted_sum32`: karcher's and
multislerp's weighted sums, with torch's fused multiply-adds (used where torch's kernels fuse:
`fused_multiply_add()`). Each gives the bits of the numpy or torch path it replaces (tests/test_compiled.py),
gram_chunks the same float64 products summed in another fixed order; the numpy/torch paths run instead where the
extension was not built (`available()` is False).
"""

from __future__ import annotations

import ctypes
import importlib.util
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from mergesmith.methods.parallel import both, split

IN_ORDER = 4  # torch's sum over up to 4 stacked models adds them in model order; over more, in an order set by shape
SUM_RANGE = 1 << 15  # elements of masked_sum's running sum kept in cache while every model adds to it
MAX_COLS = 1 << 24  # the kernel's scratch is ~50 bytes an element of one row: longer rows take the numpy path


def _load() -> Optional[ctypes.CDLL]:
    try:
        spec = importlib.util.find_spec("mergesmith._kernels")
        if spec is None or not spec.origin:
            return None
        lib = ctypes.CDLL(spec.origin)
        f, g, v, hc, lc = lib.keep_masks, lib.masked_add, lib.variances, lib.high_counts, lib.low_counts
        c, ck, gc = lib.consensus, lib.cut_keep, lib.gram_chunks
        cm, sq, sm = lib.cut_mask, lib.selected_squares, lib.sce_merge
        rm, rc, wb = lib.ram_merge, lib.ram_counts, lib.widen_bf16
        fs, ws, w32, nb = lib.finish_sum, lib.weighted_sum64, lib.weighted_sum32, lib.narrow_bf16
        ms16, nf, md16 = lib.masked_sum16, lib.nonfinite_bf16, lib.masked_delta16
        st, db, ok, fi = lib.stock_merge, lib.delta_bf16, lib.order_keys, lib.fusion_importance
        ab = lib.add_base16
    except (ImportError, OSError, AttributeError):  # not built, or built from an older source: the numpy path
        return None
    f.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_uint64, ptr, ctypes.c_float, ptr, ptr, ctypes.c_int]
    ms16.restype = md16.restype = None
    ms16.argtypes = [ptr, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float, ctypes.c_float]
    md16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float]
    nf.restype = ctypes.c_int
    nf.argtypes = [ptr, i64]
    g.restype = None
    g.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    v.restype = None
    v.argtypes = [ptr, i64, ptr, i64, ctypes.c_int, ptr]
    hc.restype = lc.restype = None
    hc.argtypes = [ptr, ptr, i64, ptr, ctypes.c_int]
    lc.argtypes = [ptr, ptr, i64, ctypes.c_uint32, ctypes.c_uint32, ptr, ptr, ctypes.c_int]
    c.restype = None
    c.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ctypes.c_int, ptr]
    ck.restype = None
    ck.argtypes = [ptr, ptr, i64, ctypes.c_int, ctypes.c_float, ctypes.c_float, ptr, ptr, ptr, i64, ptr]
    gc.restype = None
    gc.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr]
    st.restype = db.restype = None
    db.argtypes = [ptr, ptr, i64, ptr]
    ok.restype = fi.restype = None
    fi.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    ok.argtypes = [ptr, i64, ptr]
    st.argtypes = [ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_float, ptr]
    cm.restype = sm.restype = None
    cm.argtypes = [ptr, i64, ctypes.c_float, ctypes.c_float, ptr, ptr, ptr, i64, ptr]
    sq.restype = ctypes.c_double
    sq.argtypes = [ptr, ptr, ptr, i64, ctypes.c_int]
    sm.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ctypes.c_int, ptr]
    rm.restype = rc.restype = None
    rm.argtypes = [ptr, i64, ptr, ctypes.c_float, ptr, i64, ptr]
    rc.argtypes = [ptr, i64, ptr, ctypes.c_float, i64, ptr]
    wb.restype = ctypes.c_int
    fs.restype = None
    fs.argtypes = [ptr, ptr, i64, ctypes.c_float, ctypes.c_float]
    ab.restype = None
    ab.argtypes = [ptr, ptr, i64]
    wb.argtypes = nb.argtypes = [ptr, i64, ptr]
    nb.restype = ctypes.c_int
    ws.restype = w32.restype = None
    ws.argtypes = w32.argtypes = [ptr, ptr, i64, i64, ctypes.c_int, ptr]
    return lib


_LIB = _load()


def available() -> bool:
    """Whether the compiled kernel is loaded (tests switch it off to compare with the numpy path)."""
    return _LIB is not None


def usable(rows: torch.Tensor) -> bool:
    """Whether the kernel serves this 2-D view of a delta: float32 (or bfloat16 as stored) on the CPU, rows no
    longer than MAX_COLS."""
    return available() and rows.device.type == "cpu" and rows.dtype in WIDENED and rows.shape[1] <= MAX_COLS


WIDENED = (torch.float32, torch.bfloat16)  # bfloat16 inputs are widened by the kernels where they read them


def keep_masks(
    rows: torch.Tensor,
    key: int,
    row_offset: int,
    steps: Optional[torch.Tensor],
    density: float,
    base: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, float, float]:
    """(mask, sum |delta|, sum |kept delta|) of a block of rows of deltas (rows - base, taken here, when `base` is
    given) starting at `row_offset` of its tensor: DARE when `steps` is None (keep when u < density), else DELLA
    with keep probability steps[rank]. Sums in float64."""
    rows = rows.contiguous()
    if rows.dtype not in WIDENED or (base is not None and base.dtype != rows.dtype):
        raise TypeError("keep_masks takes float32 (or bfloat16) rows and a base of one dtype")
    b = None if base is None else base.contiguous()
    n, cols = rows.shape
    mask = np.empty((n, cols), dtype=np.uint8)
    sums = np.zeros((n, 2), dtype=np.float64)
    st = None if steps is None else steps.contiguous().numpy()
    row_bytes = cols * rows.element_size()

    def run(a: int, z: int) -> None:
        if z > a:
            rc = _LIB.keep_masks(
                rows.data_ptr() + a * row_bytes,
                None if b is None else b.data_ptr() + a * row_bytes,
                z - a,
                cols,
                row_offset + a,
                key & ((1 << 64) - 1),
                None if st is None else st.ctypes.data,
                ctypes.c_float(density),
                mask[a:z].ctypes.data,
                sums[a:z].ctypes.data,
                rows.dtype == torch.bfloat16,
            )
            if rc != 0:
                raise MemoryError("out of memory in the keep-mask kernel")

    split(run, n, grain=64)
    before, after = sums.sum(axis=0).tolist()
    return torch.from_numpy(mask.view(np.bool_)), before, after


def masked_sum(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    masks: Sequence[np.ndarray],
    factors: Sequence[float],
    nums: Sequence[float],
    divisor: float = 1.0,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """base + ((sum_i (kept(x_i - base, mask_i) * factor_i) * num_i) / divisor) * lambda_, the sum in recipe order,
    float32, each operation rounded as sparsify's L1 rescale and task_arithmetic round them; masks are pass 1's
    packed bits. Ranges of SUM_RANGE elements at a time: the running sum stays in cache between the models."""
    b = base.contiguous().reshape(-1)
    acc = torch.empty(b.shape, dtype=torch.float32)
    xs = [x.contiguous().reshape(-1) for x in inputs]
    if any(x.dtype != b.dtype for x in xs) or b.dtype not in WIDENED:
        raise TypeError("masked_sum takes float32 (or bfloat16) inputs and base of one dtype")
    if b.dtype == torch.bfloat16:
        return _masked_sum16(acc, b, xs, masks, factors, nums, divisor, lambda_).reshape(base.shape)
    ptrs = [t.data_ptr() for t in (acc, b)]

    def run(a0: int, z0: int) -> None:
        for a in range(a0, z0, SUM_RANGE):
            z = min(z0, a + SUM_RANGE)
            for i, x in enumerate(xs):
                f, num, p = ctypes.c_float(factors[i]), ctypes.c_float(nums[i]), masks[i].ctypes.data
                _LIB.masked_add(ptrs[0] + 4 * a, x.data_ptr() + 4 * a, ptrs[1] + 4 * a, p, a, z - a, f, num, i == 0)
            _LIB.finish_sum(ptrs[0] + 4 * a, ptrs[1] + 4 * a, z - a, divisor, lambda_)

    split(run, b.numel(), grain=1 << 18)
    return acc.reshape(base.shape)


def _masked_sum16(acc, b, xs, masks, factors, nums, divisor: float, lambda_: float) -> torch.Tensor:
    """masked_sum of bfloat16 inputs and base (all of it in one kernel call a thread: it widens where it reads)."""
    k = len(xs)
    f, num = np.asarray(factors, dtype=np.float32), np.asarray(nums, dtype=np.float32)
    packed = (ctypes.c_void_p * k)(*(m.ctypes.data for m in masks))

    def run(a: int, z: int) -> None:
        ptrs = (ctypes.c_void_p * k)(*(x.data_ptr() + 2 * a for x in xs))
        _LIB.masked_sum16(
            acc.data_ptr() + 4 * a, ptrs, k, b.data_ptr() + 2 * a, packed, a, z - a, f.ctypes.data, num.ctypes.data,
            divisor, lambda_,
        )  # fmt: skip

    split(run, b.numel(), grain=1 << 18)
    return acc


def nonfinite(x: torch.Tensor) -> Optional[bool]:
    """Whether a bfloat16 CPU tensor holds NaN or Inf (one read of its bytes), else None (not served)."""
    if not (available() and x.dtype == torch.bfloat16 and x.device.type == "cpu"):
        return None
    src, bad = x.contiguous(), []
    p = src.data_ptr()
    split(lambda a, b: bad.append(_LIB.nonfinite_bf16(p + 2 * a, b - a)), src.numel(), grain=1 << 18)
    return any(bad)


def masked_delta(x: torch.Tensor, base: torch.Tensor, mask: np.ndarray, factor: float) -> torch.Tensor:
    """kept(x - base, mask) * factor (skipped when the float32 factor is 1) of float32 CPU tensors of one shape
    (or bfloat16 as stored: widened where read), the mask pass 1's packed bits: sparsify's L1-rescaled DARE/DELLA
    delta of a block, in one pass, in float32."""
    b, xf = base.contiguous().reshape(-1), x.contiguous().reshape(-1)
    if xf.dtype != b.dtype or b.dtype not in WIDENED:
        raise TypeError("masked_delta takes float32 (or bfloat16) x and base of one dtype")
    out = torch.empty(b.shape, dtype=torch.float32)
    o, xp, bp, f, one = out.data_ptr(), xf.data_ptr(), b.data_ptr(), ctypes.c_float(factor), ctypes.c_float(1.0)
    if b.dtype == torch.bfloat16:
        split(lambda a, z: _LIB.masked_delta16(o + 4 * a, xp + 2 * a, bp + 2 * a, mask.ctypes.data, a, z - a, f),
              b.numel(), grain=1 << 18)  # fmt: skip
        return out.reshape(x.shape)
    split(lambda a, z: _LIB.masked_add(o + 4 * a, xp + 4 * a, bp + 4 * a, mask.ctypes.data, a, z - a, f, one, 1),
          b.numel(), grain=1 << 18)  # fmt: skip
    return out.reshape(x.shape)


def fused_multiply_add() -> bool:
    """Whether torch's CPU kernels here add with alpha as one fused multiply-add (its AVX2 and AVX-512 builds do),
    so that kernels doing the same give its bits."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def weighted_sum64(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i weights[i] * xs[i] of equally shaped CPU tensors (float32, or all bfloat16 as stored), summed in float64
    in model order (each step a fused multiply-add, as torch's add_ with alpha; zero weights skipped) and rounded once
    to float32."""
    return _weighted(_LIB.weighted_sum64, xs, np.asarray(weights, dtype=np.float64))


def weighted_sum32(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i weights[i] * xs[i] of equally shaped CPU tensors (float32, or all bfloat16 as stored) in float32, in model
    order from zeros, each step a fused multiply-add with the weight in float32: torch's zeros then add_ with alpha on
    the float32 values, in one pass."""
    return _weighted(_LIB.weighted_sum32, xs, np.asarray(weights, dtype=np.float32))


def _weighted(kernel, xs: Sequence[torch.Tensor], w: np.ndarray) -> torch.Tensor:
    flat, stored16 = _same(xs)
    out = torch.empty(flat[0].numel(), dtype=torch.float32)
    k, size = len(flat), flat[0].element_size()

    def run(a: int, z: int) -> None:
        ptrs = (ctypes.c_void_p * k)(*(f.data_ptr() + size * a for f in flat))
        kernel(ptrs, w.ctypes.data, k, z - a, stored16, out.data_ptr() + 4 * a)

    split(run, out.numel(), grain=1 << 18)
    return out.reshape(xs[0].shape)


def stored(*ts: Optional[torch.Tensor]) -> bool:
    """Whether the compiled kernels that take bfloat16 as stored take these tensors as they are: on the CPU, all
    float32 or all bfloat16 (None skipped)."""
    given = [t for t in ts if t is not None]
    return (
        available()
        and bool(given)
        and all(t.device.type == "cpu" and t.dtype == given[0].dtype for t in given)
        and given[0].dtype in WIDENED
    )


def cut_keep(
    flat: torch.Tensor,
    low: float,
    high: float,
    groups: Sequence[Tuple[float, int, int]],
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Flat float32 d = `flat` (minus `base`, flat and of its size, where given; CPU tensors, all float32 or all
    bfloat16 as stored) where low < |d| < high or where |d| is a group's value and the element is among the group's
    members [skip, take) in index order, +0.0 elsewhere (groups: (value, skip, take))."""
    (flat, b), stored16 = _same([flat, base])
    out = torch.empty(flat.numel(), dtype=torch.float32)
    values = np.array([g[0] for g in groups], dtype=np.float32)
    skip, take = (np.array([g[i] for g in groups], dtype=np.int64) for i in (1, 2))
    tables = (values.ctypes.data, skip.ctypes.data, take.ctypes.data, len(groups), out.data_ptr())
    _LIB.cut_keep(flat.data_ptr(), None if b is None else b.data_ptr(), flat.numel(), stored16, low, high, *tables)
    return out


def consensus(deltas: Sequence[torch.Tensor], nums: Sequence[float], count: bool, normalize: bool) -> torch.Tensor:
    """TIES disjoint merge of sparsified float32 CPU deltas of one shape, weighted by integer `nums`: the bits of
    task_arithmetic._consensus before its division by the weights' denominator (normalize: by the agreeing nums)."""
    ds = [d.contiguous().reshape(-1) for d in deltas]
    if any(d.shape != ds[0].shape for d in ds):
        raise ValueError("consensus takes deltas of one shape")
    out = torch.empty_like(ds[0])
    k, o = len(ds), out.data_ptr()
    w = np.asarray(nums, dtype=np.float32)

    def run(a: int, b: int) -> None:
        ptrs = (ctypes.c_void_p * k)(*(d.data_ptr() + 4 * a for d in ds))
        _LIB.consensus(ptrs, k, b - a, w.ctypes.data, int(count), int(normalize), o + 4 * a)

    split(run, out.numel(), grain=1 << 16)
    return out.reshape(deltas[0].shape)


def _same(xs: Sequence[Optional[torch.Tensor]]) -> Tuple[list, int]:
    """Contiguous flat views of equally sized CPU tensors, all float32 or all bfloat16, and whether bfloat16."""
    flat = [None if x is None else x.contiguous().reshape(-1) for x in xs]
    given = [f for f in flat if f is not None]
    same = all(f.numel() == given[0].numel() and f.dtype == given[0].dtype and f.device.type == "cpu" for f in given)
    if not same or given[0].dtype not in WIDENED:
        raise ValueError("the kernel takes CPU tensors of one size, all float32 or all bfloat16")
    return flat, int(given[0].dtype == torch.bfloat16)


def gram_chunks(xs: Sequence[torch.Tensor], chunk: int, base: Optional[torch.Tensor] = None) -> np.ndarray:
    """[chunks, pairs] float64 sums of x_i * x_j (of the float32 differences x_i - base, where a base is given) over
    each chunk of `chunk` elements (a multiple of 8) of equally shaped CPU tensors (float32, or all bfloat16 as
    stored), pairs i <= j in row order; each chunk's sum in a fixed order."""
    (*flat, b), stored16 = _same([*xs, base])
    k, n, size = len(flat), flat[0].numel(), flat[0].element_size()
    if chunk % 8:
        raise ValueError("gram_chunks takes chunks of a multiple of 8 elements")
    chunks = -(-n // chunk)
    out = np.zeros((chunks, k * (k + 1) // 2), dtype=np.float64)

    def run(a: int, z: int) -> None:
        ptrs = (ctypes.c_void_p * k)(*(f.data_ptr() + size * a * chunk for f in flat))
        bp = None if b is None else b.data_ptr() + size * a * chunk
        rows = np.empty(k * chunk, dtype=np.float32)  # the kernel's scratch: one chunk of every model
        count = min(n, z * chunk) - a * chunk
        _LIB.gram_chunks(ptrs, bp, k, count, chunk, stored16, rows.ctypes.data, out[a:z].ctypes.data)

    split(run, chunks, grain=16)
    return out


def stock_merge(xs: Sequence[torch.Tensor], base: torch.Tensor, t: float) -> torch.Tensor:
    """t * mean(xs) + (1 - t) * base, float32, of equally shaped CPU tensors (float32, or all bfloat16 as stored):
    the bits of model_stock's torch expression up to IN_ORDER models, t given in float32."""
    (*flat, b), stored16 = _same([*xs, base])
    k, size = len(flat), b.element_size()
    out = torch.empty(b.numel(), dtype=torch.float32)

    def run(a: int, z: int) -> None:
        ptrs = (ctypes.c_void_p * k)(*(f.data_ptr() + size * a for f in flat))
        _LIB.stock_merge(ptrs, b.data_ptr() + size * a, k, z - a, stored16, t, out.data_ptr() + 4 * a)

    split(run, out.numel(), grain=1 << 16)
    return out.reshape(base.shape)


def _flat(xs: Sequence[torch.Tensor]) -> list:
    """Contiguous flat views of equally sized float32 CPU tensors."""
    flat = [x.contiguous().reshape(-1) for x in xs]
    if any(f.numel() != flat[0].numel() or f.dtype != torch.float32 for f in flat):
        raise ValueError("the RAM kernels take float32 tensors of one size")
    return flat


def _addr(t: Optional[torch.Tensor], offset: int) -> Optional[int]:
    return None if t is None else t.data_ptr() + t.element_size() * offset


def variances(xs: Sequence[torch.Tensor], base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Population variance over the models of xs_i - base (float32 differences; no base: xs_i), float32: the values
    of torch.var(torch.stack(xs) - base, dim=0, unbiased=False) (Welford in float64, in model order), flat. CPU
    tensors, all float32 or all bfloat16 as stored."""
    (*xs, b), stored16 = _same([*xs, base])
    out = torch.empty(xs[0].numel(), dtype=torch.float32)

    def run(a: int, z: int) -> None:
        ptrs = (ctypes.c_void_p * len(xs))(*(_addr(x, a) for x in xs))
        _LIB.variances(ptrs, len(xs), _addr(b, a), z - a, stored16, _addr(out, a))

    split(run, out.numel(), grain=1 << 16)
    return out


def cut_mask(a: torch.Tensor, low: float, high: float, groups: Sequence[Tuple[float, int, int]]) -> torch.Tensor:
    """sparsify.apply_cut of flat float32 CPU `a` with its groups' members as (value, skip, take) of this block."""
    a = a.contiguous()
    mask = torch.empty(a.numel(), dtype=torch.uint8)
    values = np.array([g[0] for g in groups], dtype=np.float32)
    skip, take = (np.array([g[i] for g in groups], dtype=np.int64) for i in (1, 2))
    args = (values.ctypes.data, skip.ctypes.data, take.ctypes.data, len(groups), mask.data_ptr())
    _LIB.cut_mask(a.data_ptr(), a.numel(), low, high, *args)
    return mask.view(torch.bool)


def selected_squares(x: torch.Tensor, base: torch.Tensor, mask: Optional[torch.Tensor]) -> float:
    """Float64 sum of ((x - base) * mask)^2 (CPU tensors, float32 or both bfloat16 as stored), squared exactly and
    added in numpy's pairwise order (the value of np.add.reduce over the float64 squares): the two halves of its
    first split on two threads."""
    (x, base), stored16 = _same([x, base])
    m = None if mask is None else mask.contiguous().reshape(-1)
    n = x.numel()
    if n <= 128:
        return 0.0 + _LIB.selected_squares(_addr(x, 0), _addr(base, 0), _addr(m, 0), n, stored16)
    half = n // 2 - (n // 2) % 8
    lo, hi = both(
        lambda: _LIB.selected_squares(_addr(x, 0), _addr(base, 0), _addr(m, 0), half, stored16),
        lambda: _LIB.selected_squares(_addr(x, half), _addr(base, half), _addr(m, half), n - half, stored16),
    )
    return 0.0 + (lo + hi)


def sce_merge(
    base: torch.Tensor, xs: Sequence[torch.Tensor], mask: Optional[torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    """sce's merge of CPU inputs (float32, or all bfloat16 as stored) given the selection mask (None: all kept) and
    the energy weights: the float32 values of methods/sce.py's torch path, flat."""
    (b, *xs), stored16 = _same([base, *xs])
    m = None if mask is None else mask.contiguous().reshape(-1)
    w = np.ascontiguousarray(weights.cpu().numpy(), dtype=np.float32)
    out = torch.empty(b.numel(), dtype=torch.float32)

    def run(a: int, z: int) -> None:
        ptrs = (ctypes.c_void_p * len(xs))(*(_addr(x, a) for x in xs))
        _LIB.sce_merge(ptrs, len(xs), _addr(b, a), _addr(m, a), w.ctypes.data, z - a, stored16, _addr(out, a))

    split(run, out.numel(), grain=1 << 16)
    return out


def ram_merge(
    base: torch.Tensor, xs: Sequence[torch.Tensor], epsilon: float, boosts: Optional[Sequence[float]]
) -> torch.Tensor:
    """RAM (boosts None) or RAM+ tensor-local of float32 CPU inputs: the float32 values of methods/ram.py's torch
    ops, flat."""
    flat = _flat([base] + list(xs))
    b, xs = flat[0], flat[1:]
    w = None if boosts is None else np.asarray(boosts, dtype=np.float32)
    out = torch.empty_like(b)

    def run(a: int, z: int) -> None:
        ptrs = (ctypes.c_void_p * len(xs))(*(_addr(x, a) for x in xs))
        boost = None if w is None else w.ctypes.data
        _LIB.ram_merge(ptrs, len(xs), _addr(b, a), epsilon, boost, z - a, _addr(out, a))

    split(run, out.numel(), grain=1 << 16)
    return out


def ram_counts(base: torch.Tensor, xs: Sequence[torch.Tensor], epsilon: float) -> List[Tuple[int, int]]:
    """Per model (its changed elements other models changed too, those it alone changed), as
    ramplus_tl.overlap_counts counts them."""
    flat = _flat([base] + list(xs))
    b, xs = flat[0], flat[1:]
    parts = []

    def run(a: int, z: int) -> None:
        counts = np.zeros(2 * len(xs), dtype=np.int64)
        ptrs = (ctypes.c_void_p * len(xs))(*(_addr(x, a) for x in xs))
        _LIB.ram_counts(ptrs, len(xs), _addr(b, a), epsilon, z - a, counts.ctypes.data)
        parts.append(counts)

    split(run, b.numel(), grain=1 << 16)
    total = np.sum(parts, axis=0)
    return [(int(total[2 * i]), int(total[2 * i + 1])) for i in range(len(xs))]


def widen(x: torch.Tensor) -> Optional[Tuple[torch.Tensor, bool]]:
    """(x in float32, whether every value is finite) for a bfloat16 CPU tensor, else None (torch converts it)."""
    return _converted(x, torch.bfloat16, torch.float32, "widen_bf16")


def delta(x: torch.Tensor, base: torch.Tensor) -> Optional[torch.Tensor]:
    """x.float() - base.float() of bfloat16 CPU tensors of one shape as stored, in one pass; None for others (torch
    takes them)."""
    if not (available() and x.dtype == base.dtype == torch.bfloat16 and x.device.type == base.device.type == "cpu"):
        return None
    if x.shape != base.shape:
        raise ValueError("delta takes a model and a base of one shape")
    xs, bs = x.contiguous(), base.contiguous()
    out = torch.empty(xs.shape, dtype=torch.float32)
    s, b, o = xs.data_ptr(), bs.data_ptr(), out.data_ptr()
    split(lambda i, z: _LIB.delta_bf16(s + 2 * i, b + 2 * i, z - i, o + 4 * i), xs.numel(), grain=1 << 18)
    return out


def add_base(acc: torch.Tensor, base: torch.Tensor) -> Optional[torch.Tensor]:
    """base.float() + acc, into acc (a contiguous float32 CPU tensor the caller owns), for a bfloat16 CPU base of its
    shape: torch's bits in one pass, without a float32 copy of the base; None for others (torch adds them)."""
    cpu = base.device.type == acc.device.type == "cpu"
    if not (available() and cpu and base.dtype == torch.bfloat16 and acc.dtype == torch.float32):
        return None
    if acc.shape != base.shape or not acc.is_contiguous():
        return None
    b = base.contiguous()
    a, bp = acc.data_ptr(), b.data_ptr()
    split(lambda i, z: _LIB.add_base16(a + 4 * i, bp + 2 * i, z - i), acc.numel(), grain=1 << 18)
    return acc


def order_keys(a: np.ndarray) -> np.ndarray:
    """sparsify.RadixRanks.keys of a contiguous float32 array, in one pass."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty(a.shape, dtype=np.uint32)
    s, o = a.ctypes.data, out.ctypes.data
    split(lambda i, z: _LIB.order_keys(s + 4 * i, z - i, o + 4 * i), a.size, grain=1 << 18)
    return out


def fusion_importance(base: torch.Tensor, other: torch.Tensor, kl: torch.Tensor) -> Optional[torch.Tensor]:
    """|other - base| * kl of float32 CPU tensors, kl one value a row (of base's rows, its last dimension a row):
    torch's (other - base).abs() * kl in one pass; None for other dtypes or devices (torch takes them)."""
    ts = (base, other, kl)
    if not (available() and base.numel() and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)):
        return None
    rows = kl.numel()
    if other.shape != base.shape or rows == 0 or base.numel() % rows:
        raise ValueError("fusion_importance takes two tensors of one shape and one divergence a row")
    b, o, k = base.contiguous(), other.contiguous(), kl.contiguous()
    out = torch.empty(base.shape, dtype=torch.float32)
    cols = base.numel() // rows
    bp, op, kp, yp = b.data_ptr(), o.data_ptr(), k.data_ptr(), out.data_ptr()
    split(
        lambda a, z: _LIB.fusion_importance(
            bp + 4 * a * cols, op + 4 * a * cols, kp + 4 * a, z - a, cols, yp + 4 * a * cols
        ),
        rows,
        grain=max(1, (1 << 16) // cols),
    )
    return out


def narrow(x: torch.Tensor) -> Optional[Tuple[torch.Tensor, bool]]:
    """(x in bfloat16, whether every value is finite) for a float32 CPU tensor, else None (torch converts it). The
    bfloat16 values are torch's where all are finite."""
    return _converted(x, torch.float32, torch.bfloat16, "narrow_bf16")


def _converted(x: torch.Tensor, source: torch.dtype, target: torch.dtype, kernel: str):
    """x converted by a kernel(src, n, dst) that returns nonzero where it met NaN or Inf, and whether all were
    finite; None unless x is a `source` CPU tensor."""
    if not (available() and x.dtype == source and x.device.type == "cpu"):
        return None
    src = x.contiguous()
    out = torch.empty(src.shape, dtype=target)
    fn, bad = getattr(_LIB, kernel), []
    s, o, si, oi = src.data_ptr(), out.data_ptr(), src.element_size(), out.element_size()
    split(lambda a, b: bad.append(fn(s + si * a, b - a, o + oi * a)), src.numel(), grain=1 << 18)
    return out, not any(bad)


def _words(a: np.ndarray) -> np.ndarray:
    """`a` (float32 values or uint32 keys) as one contiguous run of 32-bit words."""
    if a.dtype not in (np.float32, np.uint32):
        raise TypeError(f"radix counts take float32 or uint32 arrays, not {a.dtype}")
    return np.ascontiguousarray(a).reshape(-1).view(np.uint32)


def _base(base: Optional[np.ndarray], a: np.ndarray) -> Optional[int]:
    """The address of `base` (float32 values beside float32 `a`), or None."""
    if base is None:
        return None
    if a.dtype != np.float32 or base.dtype != np.float32 or base.size != a.size or not base.flags.c_contiguous:
        raise TypeError("radix counts of |a - base| take contiguous float32 arrays of one size")
    return base.ctypes.data


def _keys(a, base) -> Tuple[object, int, Optional[int], int, bool]:
    """(the words, their address, base address or None, length, bfloat16) of the radix counts' input: float32 or
    uint32 numpy arrays, or a flat bfloat16 CPU tensor as stored with its bfloat16 base (the kernel widens them).
    The caller holds the words while the kernel reads them (they may be a contiguous copy of `a`)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(base, torch.Tensor) and a.dtype == base.dtype == torch.bfloat16):
            raise TypeError("radix counts take bfloat16 tensors only as stored, with their base")
        if not (a.device.type == base.device.type == "cpu" and a.is_contiguous() and base.is_contiguous()):
            raise TypeError("radix counts take bfloat16 tensors only as stored, contiguous, with their base")
        if base.numel() != a.numel():
            raise TypeError("radix counts of |a - base| take a base of a's size")
        return a, a.data_ptr(), base.data_ptr(), a.numel(), True
    x = _words(a)
    return x, x.ctypes.data, _base(base, a), x.size, False


def high_counts(a, base=None) -> np.ndarray:
    """How many words of `a` have each high 16 bits: np.bincount(a.view(np.uint32) >> 16, minlength=65536); with
    `base`, of the float32 magnitudes |a - base| (`a` and `base` numpy arrays, or bfloat16 tensors: _keys)."""
    _held, x, b, n, stored = _keys(a, base)
    counts = np.zeros(1 << 16, dtype=np.int64)
    _LIB.high_counts(x, b, n, counts.ctypes.data, stored)
    return counts


def low_counts(a, buckets: Sequence[int], base=None) -> dict:
    """{bucket: (low 16 bits present, their counts)} of the words of `a` (with `base`: of |a - base|) whose high 16
    bits are each bucket, as np.unique(..., return_counts=True) gives them. Two buckets a pass."""
    (_held, x, bp, n, stored), out = _keys(a, base), {}
    bs = [int(b) for b in buckets]
    if any(not 0 <= b <= 0xFFFF for b in bs) or len(set(bs)) != len(bs):
        raise ValueError(f"buckets must be distinct 16-bit values: {bs}")
    for i in range(0, len(bs), 2):
        pair = bs[i : i + 2]
        counts = [np.zeros(1 << 16, dtype=np.int64) for _ in pair]
        b1 = pair[1] if len(pair) == 2 else 1 << 16  # no word's high half: the second count stays unused
        _LIB.low_counts(x, bp, n, pair[0], b1, counts[0].ctypes.data, counts[-1].ctypes.data, stored)
        for b, c in zip(pair, counts):
            present = np.flatnonzero(c)
            out[b] = (present, c[present])
    return out
