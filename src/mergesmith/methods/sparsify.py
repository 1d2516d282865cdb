"""Sparsification of task vectors (pure functions, float32 in, float32 out).

Each sparsifier takes one model's delta (`finetuned - base`) and returns it with some elements zeroed, optionally
rescaled. Ties in magnitude are broken by element index (stable sorts), so results never depend on the device or
the sort implementation. Random masks use `rng.uniform` keyed per (seed, model, tensor): element i is kept when
u_i < p_i, a Bernoulli(p_i) draw that does not depend on processing order.

Random sparsifiers also work on a block of rows (`row_offset` says where the block starts): the stream is indexed
by the element's place in the whole tensor, and the L1 rescale can be given the whole tensor's sums (`l1`), which
`l1_sums` computes block by block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mergesmith.methods import compiled
from mergesmith.methods.parallel import split
from mergesmith.methods.rng import uniform_like

L1Sums = Tuple[float, float]  # (sum |delta|, sum |kept delta|) over the whole tensor


def numpy_path(t: torch.Tensor) -> bool:
    """Whether a CPU fast path (numpy) serves `t`; on other devices torch's own ops compute the same values.
    tests/test_device_paths.py patches this (and rng.numpy_path) to run the device paths on the CPU."""
    return t.device.type == "cpu"


def compiled_serves(base: torch.Tensor, inputs: Sequence[torch.Tensor], stored: bool = False) -> bool:
    """Whether the compiled elementwise kernels serve a base and its inputs: float32 on the CPU (`numpy_path`), of
    one shape, not empty; with `stored`, all bfloat16 as stored too (for the kernels that widen it themselves)."""
    dtypes = compiled.WIDENED if stored else (torch.float32,)
    return (
        compiled.available()
        and numpy_path(base)
        and base.dtype in dtypes
        and all(t.dtype == base.dtype and t.shape == base.shape and t.device == base.device for t in inputs)
        and base.numel() > 0
    )


def kept(x: torch.Tensor, mask: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x where `mask`, +0.0 elsewhere (torch.where(mask, x, 0)), into `out` if given (may be x). On the CPU for
    float32 as a bitwise AND with the mask widened to all-ones words: the same bits, ~8x faster than torch.where
    on a scattered mask."""
    if not (numpy_path(x) and x.dtype == torch.float32 and x.is_contiguous() and mask.is_contiguous()):
        res = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return res if out is None else out.copy_(res)
    out = torch.empty_like(x) if out is None else out
    words = np.negative(mask.numpy().view(np.int8))  # True -> -1: all bits set once widened to int32
    np.bitwise_and(x.numpy().view(np.int32), words.reshape(x.shape), out=out.numpy().view(np.int32))
    return out


def sum64(a: torch.Tensor) -> float:
    """sum of `a`, accumulated in float64. On the CPU through numpy, whose buffered pairwise float64 sum is ~5x
    faster than torch's here."""
    if numpy_path(a) and a.dtype == torch.float32:
        return float(np.add.reduce(a.contiguous().numpy().reshape(-1), dtype=np.float64))
    return a.sum(dtype=torch.float64).item()


def abs_sum(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """sum |x| (over the elements where `mask`), accumulated in float64."""
    a = x.abs()
    if mask is not None:
        kept(a, mask, out=a)
    return sum64(a)


def l1_factor(before: float, after: float, eps: float = 1e-7) -> float:
    """The L1 rescale factor: before / after, or 1 when either is ~0."""
    return 1.0 if before < eps or after < eps else before / after


def rescale_l1(delta: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals `delta`'s (mergekit's `rescale: true`); unchanged if either is ~0."""
    before = abs_sum(delta)
    after = abs_sum(masked)
    f = l1_factor(before, after, eps)
    return masked if f == 1.0 else masked * f


@dataclass(frozen=True)
class RankCut:
    """Which elements of a tensor a rank range keeps: values strictly between `low` and `high`, and at each boundary
    value the members of its tie group with group rank (index order) in [first, last)."""

    low: float
    high: float
    groups: Tuple[Tuple[float, int, int], ...]
    empty: bool = False


def rank_cut(a: "np.ndarray | torch.Tensor", lo: int, hi: int, largest_first: bool = False) -> RankCut:
    """The RankCut of ranks [lo, hi) of flat non-negative `a` (ascending, or descending with `largest_first`; ties by
    lower index either way). A selection (np.partition / kthvalue), not a sort."""
    n = a.numel() if isinstance(a, torch.Tensor) else a.size
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return RankCut(0.0, 0.0, (), empty=True)
    ks = [n - hi, n - 1 - lo] if largest_first else [lo, hi - 1]
    if isinstance(a, torch.Tensor) and not numpy_path(a):
        vl, vh = (torch.kthvalue(a, k + 1).values.item() for k in ks)

        def count(f):
            return int(f(a).sum())
    else:
        part = np.partition(a.numpy() if isinstance(a, torch.Tensor) else a, ks)
        vl, vh = part[ks[0]].item(), part[ks[1]].item()

        def count(f):
            return int(np.count_nonzero(f(part)))

    groups = []
    for v in (vl, vh) if vl != vh else (vl,):
        before = count(lambda t: t > v) if largest_first else count(lambda t: t < v)
        groups.append((v, max(0, lo - before), max(0, hi - before)))
    return RankCut(vl, vh, tuple(groups))


class RadixSelect:
    """rank_cut of a flat non-negative float32 array of n elements given block by block, in O(block) memory: a
    radix selection on the float32 bit patterns, which order non-negative floats as integers. Read 1 counts the
    high 16 bits of every element (`high_counts` of each block, added up); read 2 counts the low 16 bits inside
    the one or two buckets that hold the boundary ranks (`low_counts` of each block, given to `add_low` in block
    order). `result` is the same RankCut as rank_cut on the whole array, and for each block how many members of
    each boundary tie group it holds (what apply_cut's offsets add up)."""

    def __init__(self, high: "np.ndarray", n: int, lo: int, hi: int, largest_first: bool = False):
        self.lo, self.hi = max(0, lo), min(n, hi)
        self.n, self.largest_first = n, largest_first
        self.empty = self.lo >= self.hi
        self.ks = [n - self.hi, n - 1 - self.lo] if largest_first else [self.lo, self.hi - 1]
        self.high_cum = np.cumsum(high)
        self.buckets = (
            [] if self.empty else sorted({int(np.searchsorted(self.high_cum, k, side="right")) for k in self.ks})
        )
        self.low = {b: np.zeros(1 << 16, dtype=np.int64) for b in self.buckets}
        self.per_block: List[dict] = []

    @staticmethod
    def high_counts(a: "np.ndarray", base: "Optional[np.ndarray]" = None) -> "np.ndarray":
        """Read 1 of one block `a` (with `base`: of the magnitudes |a - base|)."""
        if compiled.available():
            return compiled.high_counts(a, base)
        a = a if base is None else np.abs(a - base)
        return np.bincount(a.view(np.uint32) >> 16, minlength=1 << 16)

    def low_counts(self, a: "np.ndarray", base: "Optional[np.ndarray]" = None) -> dict:
        """{bucket: (low bits, counts)} of one block (with `base`: of |a - base|)."""
        if compiled.available():
            return compiled.low_counts(a, self.buckets, base)
        a = a if base is None else np.abs(a - base)
        u = a.view(np.uint32)
        top = u >> 16
        return {b: np.unique(u[top == b] & 0xFFFF, return_counts=True) for b in self.buckets}

    def add_low(self, counts: dict) -> None:
        seen = {}
        for b, (vals, c) in counts.items():
            self.low[b][vals] += c
            seen[b] = dict(zip(vals.tolist(), c.tolist()))
        self.per_block.append(seen)

    def _locate(self, k: int) -> Tuple[int, int, int, int]:
        """(bucket, low bits, elements below the value, elements equal to it) of ascending rank k."""
        b = int(np.searchsorted(self.high_cum, k, side="right"))
        below_bucket = int(self.high_cum[b - 1]) if b else 0
        low_cum = np.cumsum(self.low[b])
        lb = int(np.searchsorted(low_cum, k - below_bucket, side="right"))
        return b, lb, below_bucket + (int(low_cum[lb - 1]) if lb else 0), int(self.low[b][lb])

    def result(self) -> Tuple[RankCut, List[List[int]]]:
        if self.empty:
            return RankCut(0.0, 0.0, (), empty=True), [[] for _ in self.per_block]
        found = [self._locate(k) for k in self.ks]
        groups, members = [], []
        for b, lb, below, equal in found if found[0][:2] != found[1][:2] else found[:1]:
            v = np.array([(b << 16) | lb], dtype=np.uint32).view(np.float32)[0].item()
            before = self.n - below - equal if self.largest_first else below
            groups.append((v, max(0, self.lo - before), max(0, self.hi - before)))
            members.append((b, lb))
        vl, vh = groups[0][0], groups[-1][0]
        counts = [[seen[b].get(lb, 0) for b, lb in members] for seen in self.per_block]
        return RankCut(vl, vh, tuple(groups)), counts


class RadixRanks(RadixSelect):
    """The values at ascending ranks `ks` of a flat float32 array of any sign given block by block, in O(block)
    memory: RadixSelect's two reads (high_counts, then low_counts and add_low) made on `keys(a)` of each block,
    32-bit keys that order like the values (negative below positive, NaN last, as torch.sort orders them)."""

    def __init__(self, high: "np.ndarray", ks: Sequence[int]):  # the rank machinery of RadixSelect, not its cut
        self.ks = list(ks)
        self.high_cum = np.cumsum(high)
        self.buckets = sorted({int(np.searchsorted(self.high_cum, k, side="right")) for k in self.ks})
        self.low = {b: np.zeros(1 << 16, dtype=np.int64) for b in self.buckets}

    @staticmethod
    def keys(a: "np.ndarray") -> "np.ndarray":
        """Order-preserving uint32 keys of float32 `a`: the sign bit set on non-negative floats, every bit flipped
        on negative ones (larger magnitude, smaller key); every NaN the largest key."""
        if compiled.available():
            return compiled.order_keys(a)
        u = a.view(np.uint32)
        k = np.where(u >= 0x80000000, ~u, u | np.uint32(0x80000000))
        k[np.isnan(a)] = 0xFFFFFFFF
        return k

    def add_low(self, counts: dict) -> None:
        for b, (vals, c) in counts.items():
            self.low[b][vals] += c

    def values(self) -> List[float]:
        """The values at the ranks `ks` (a NaN where a rank falls among NaNs)."""
        out = []
        for k in self.ks:
            b, lb = self._locate(k)[:2]
            key = (b << 16) | lb
            bits = key & 0x7FFFFFFF if key >= 0x80000000 else ~key & 0xFFFFFFFF
            out.append(np.array([bits], dtype=np.uint32).view(np.float32)[0].item())
        return out


def rank_cut_blocks(
    read: Callable[[int], "np.ndarray"], n_blocks: int, n: int, lo: int, hi: int, largest_first: bool = False
) -> Tuple[RankCut, List[List[int]]]:
    """RadixSelect over blocks `read(k)` (block k, 1-D float32): (RankCut, per block its boundary group counts)."""
    high = np.zeros(1 << 16, dtype=np.int64)
    if max(0, lo) < min(n, hi):
        for k in range(n_blocks):
            high += RadixSelect.high_counts(read(k))
    sel = RadixSelect(high, n, lo, hi, largest_first)
    for k in range(n_blocks):
        sel.add_low(sel.low_counts(read(k)) if not sel.empty else {})
    return sel.result()


def apply_cut(a: torch.Tensor, cut: RankCut, offsets: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Mask of a flat block `a` (of the tensor the cut was taken on); `offsets[g]`: members of group g in earlier
    blocks."""
    mask = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    if cut.empty:
        return mask
    mask |= (a > cut.low) & (a < cut.high)
    for g, (v, first, last) in enumerate(cut.groups):
        # the tied members' places, ascending (numpy's flatnonzero is ~3x torch.nonzero's speed on the CPU)
        eq = a == v
        members = torch.from_numpy(np.flatnonzero(eq.numpy())) if numpy_path(a) else torch.nonzero(eq).flatten()
        off = offsets[g] if offsets is not None else 0
        mask[members[max(0, first - off) : max(0, last - off)]] = True
    return mask


def cut_kept(
    flat: torch.Tensor, cut: RankCut, offsets: Optional[Sequence[int]] = None, base: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """kept(d, apply_cut(|d|, cut, offsets)) of d = flat (minus `base`, flat, where given), float32: one compiled
    pass on the CPU, which takes the difference itself (from float32, or bfloat16 as stored)."""
    if cut.empty or not compiled_serves(flat, [] if base is None else [base], stored=True):
        d = flat.float() if base is None else flat.float() - base.float()
        return kept(d, apply_cut(d.abs(), cut, offsets))
    return compiled.cut_keep(flat, cut.low, cut.high, block_groups(cut, offsets), base=base)


def block_groups(cut: RankCut, offsets: Optional[Sequence[int]]) -> List[Tuple[float, int, int]]:
    """The cut's boundary groups as (value, skip, take) of one block: its members [skip, take) of the group in
    index order are kept; `offsets[g]`: the members of group g in earlier blocks."""
    offs = [offsets[g] if offsets is not None else 0 for g in range(len(cut.groups))]
    return [(v, max(0, first - off), max(0, last - off)) for (v, first, last), off in zip(cut.groups, offs)]


def rank_range_mask(a: torch.Tensor, lo: int, hi: int, largest_first: bool = False) -> torch.Tensor:
    """Mask of the elements of flat non-negative `a` whose rank lies in [lo, hi), ranks ascending by value (or
    descending with `largest_first`), ties by lower index in both cases. Found by selecting the boundary values
    and placing the tied elements at each boundary by index: O(n) time and a few bytes per element, where a stable
    argsort of a whole embedding would need 12 bytes per element and O(n log n)."""
    return apply_cut(a, rank_cut(a, lo, hi, largest_first))


def magnitude_range(n: int, method: str, density: float, gamma: float = 0.01) -> Tuple[int, int, bool]:
    """(lo, hi, largest_first) of the ranks a magnitude sparsifier keeps in a tensor of n elements."""
    if method == "magnitude":
        return 0, max(1, int(density * n)), True
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    return n_bot, n_bot + target, False


def magnitude(
    delta: torch.Tensor,
    density: float,
    rescale: bool = False,
    cut: Optional[RankCut] = None,
    offsets: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """TIES trim: keep the k = max(1, floor(density * n)) largest-magnitude elements (ties by lower index).

    For a row block of a larger tensor, `cut` (from the whole tensor) and `offsets` (tie-group members in earlier
    blocks) say which of the block's elements are kept."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    n = flat.numel()
    if cut is not None:
        out = cut_kept(flat, cut, offsets).reshape_as(delta)
    else:
        lo, hi, largest = magnitude_range(n, "magnitude", density)
        out = kept(flat, rank_range_mask(flat.abs(), lo, hi, largest_first=largest)).reshape_as(delta)
    return rescale_l1(delta, out) if rescale else out


def magnitude_outliers(
    delta: torch.Tensor,
    density: float,
    gamma: float = 0.01,
    rescale: bool = False,
    cut: Optional[RankCut] = None,
    offsets: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Model Breadcrumbs: drop the top `gamma` fraction by magnitude, then the smallest, keeping floor(density*n).

    When density + gamma > 1, fewer outliers are dropped so that floor(density * n) elements remain. Ranks are
    ascending by magnitude, ties by lower index.
    """
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.numel()
    if cut is not None:
        out = cut_kept(flat, cut, offsets).reshape_as(delta)
    else:
        lo, hi, _ = magnitude_range(n, "magnitude_outliers", density, gamma)
        out = kept(flat, rank_range_mask(flat.abs(), lo, hi)).reshape_as(delta)
    return rescale_l1(delta, out) if rescale else out


def _radix_argsort_rows(keys: "np.ndarray") -> "np.ndarray":
    """Stable argsort of each row of non-negative float32 bit patterns (uint32), as two stable 16-bit radix passes
    (numpy sorts 16-bit integers by radix): low half first, then high half. Same order as a stable sort of the
    floats: for non-negative floats, bit patterns order like values."""
    low = (keys & 0xFFFF).astype(np.uint16)
    high = (keys >> 16).astype(np.uint16)
    if not low.any():
        return np.argsort(high, axis=1, kind="stable")
    order = np.argsort(low, axis=1, kind="stable")
    order2 = np.argsort(np.take_along_axis(high, order, axis=1), axis=1, kind="stable")
    return np.take_along_axis(order, order2, axis=1)


def _packed_argsort_into(keys: "np.ndarray", out: "np.ndarray") -> None:
    """Stable argsort of each row of non-negative float32 bit patterns, written to `out` (int64): sort the values
    (bits << b | column), which are unique, so any sort is stable (numpy sorts int64 with SIMD quicksort); the low b
    bits of the sorted values are then the column order."""
    cols = keys.shape[1]
    b = max(1, (cols - 1).bit_length())
    out[...] = keys
    out <<= b
    out |= np.arange(cols, dtype=np.int64)
    out.sort(axis=1)
    out &= (1 << b) - 1


def stable_argsort_rows(mag: torch.Tensor) -> torch.Tensor:
    """Indices that sort each row of a non-negative float32 matrix ascending, ties by index (device-independent)."""
    if not numpy_path(mag) or mag.dtype != torch.float32:
        return torch.sort(mag, dim=1, stable=True).indices
    keys = mag.contiguous().view(torch.int32).numpy().view(np.uint32)
    rows, cols = keys.shape
    if (cols - 1).bit_length() > 32:
        return torch.from_numpy(_radix_argsort_rows(keys))
    result = torch.empty((rows, cols), dtype=torch.int64)
    out = result.numpy()
    split(lambda a, b: _packed_argsort_into(keys[a:b], out[a:b]), rows, grain=64)
    return result


def _della_rows(delta: torch.Tensor, rank_scope: str) -> torch.Tensor:
    return delta.reshape(1, -1) if (delta.dim() < 2 or rank_scope == "tensor") else delta.reshape(delta.shape[0], -1)


def _della_steps(n: int, density: float, epsilon: float, device) -> torch.Tensor:
    """Keep probability of rank r = 0..n-1: density - epsilon + 2 epsilon r/(n-1), non-decreasing in r."""
    if n == 1:
        return torch.full((1,), density, dtype=torch.float32, device=device)
    steps = torch.arange(n, device=device, dtype=torch.float32).mul_(2 * epsilon / (n - 1))
    return steps.add_(density - epsilon)


def della_keep_probabilities(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rank_scope: str = "row",
    magnitudes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DELLA MagPrune keep probabilities, shaped like `delta` viewed as 2-D rows.

    Magnitudes are ranked (ascending, ties by index) within each row (`rank_scope="row"`, mergekit) or over the
    whole tensor (`"tensor"`, the paper); rank r in 0..n-1 maps linearly to p = density - epsilon + 2 epsilon r/(n-1),
    so the smallest magnitude is kept with density - epsilon and the largest with density + epsilon. A row of one
    element gets p = density. One sort per row; the ranks are scattered from it.
    """
    rows = _della_rows(delta, rank_scope)
    order = stable_argsort_rows(rows.abs() if magnitudes is None else magnitudes.reshape(rows.shape))
    steps = _della_steps(rows.shape[1], density, epsilon, rows.device)
    p = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    p.scatter_(1, order, steps.expand_as(order))
    return p


def _fast_masks(
    delta: torch.Tensor,
    method: str,
    density: float,
    key: int,
    epsilon: float,
    rank_scope: str,
    row_offset: int,
    base: Optional[torch.Tensor] = None,
) -> Optional[Tuple[torch.Tensor, float, float]]:
    """(mask, sum |delta|, sum |kept delta|) from the compiled kernel, or None where it does not serve (the kernel
    assumes keep probabilities that grow with rank: epsilon >= 0, which recipes enforce). With `base`, `delta` is a
    model's tensor and the kernel takes its deltas delta - base itself."""
    if delta.dim() < 2 or delta.numel() == 0 or (method == "della_magprune" and epsilon < 0):
        return None

    def as_rows(t: torch.Tensor) -> torch.Tensor:
        return _della_rows(t, rank_scope) if method == "della_magprune" else t.reshape(t.shape[0], -1)

    rows = as_rows(delta)
    whole = method == "della_magprune" and rank_scope == "tensor"  # one row: the stream's rows are the tensor's
    if not compiled.usable(rows) or (whole and row_offset):
        return None
    if base is not None and not (base.shape == delta.shape and compiled.usable(as_rows(base))):
        return None
    steps = _della_steps(rows.shape[1], density, epsilon, rows.device) if method == "della_magprune" else None
    mask, before, after = compiled.keep_masks(
        rows, key, row_offset, steps, density, as_rows(base) if base is not None else None
    )
    return mask.reshape(delta.shape), before, after


def keep_mask(
    delta: torch.Tensor,
    method: str,
    density: float,
    key: int,
    epsilon: float = 0.15,
    rank_scope: str = "row",
    row_offset: int = 0,
    magnitudes: Optional[torch.Tensor] = None,
    need_p: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mask, keep probability) of a random sparsifier for rows starting at `row_offset` of the whole tensor.

    The probability is None for DARE (it is `density` everywhere) and when not `need_p`; `magnitudes` is |delta|
    where the caller has it.
    """
    fast = _fast_masks(delta, method, density, key, epsilon, rank_scope, row_offset) if not need_p else None
    if fast is not None:
        return fast[0], None
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    u = uniform_like(key, rows.shape, row_offset=row_offset, device=delta.device)
    if method == "random":
        return (u < density).reshape(delta.shape), None
    p = della_keep_probabilities(delta, density, epsilon, rank_scope, magnitudes)
    return (u.reshape(p.shape) < p).reshape(delta.shape), p.reshape(delta.shape)


def random_sparsify(
    delta: torch.Tensor,
    method: str,
    density: float,
    key: int,
    rescale: bool = True,
    rescale_mode: str = "l1",
    epsilon: float = 0.15,
    rank_scope: str = "row",
    row_offset: int = 0,
    l1: Optional[L1Sums] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DARE (`method="random"`, keep with probability density) or DELLA MagPrune (`"della_magprune"`).

    Rescale: `l1` (mergekit) scales the kept elements so the tensor's L1 norm is unchanged (over the whole tensor:
    pass its sums as `l1` when `delta` is a block of it); `inverse_prob` (the papers) divides each kept element by its
    own keep probability. A `mask` computed before (by `l1_sums`, for this block) is used as given.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    p = None
    need_p = rescale and rescale_mode == "inverse_prob"
    if mask is None or need_p:
        mask, p = keep_mask(delta, method, density, key, epsilon, rank_scope, row_offset, need_p=need_p)
    out = kept(delta, mask.reshape(delta.shape))
    if not rescale:
        return out
    if rescale_mode == "inverse_prob":
        return out / (p if p is not None else density)
    if l1 is None:
        return rescale_l1(delta, out)
    f = l1_factor(*l1)
    return out if f == 1.0 else out * f


def l1_sums(
    delta: torch.Tensor,
    method: str,
    density: float,
    key: int,
    epsilon: float = 0.15,
    rank_scope: str = "row",
    row_offset: int = 0,
    base: Optional[torch.Tensor] = None,
) -> Tuple[L1Sums, Optional[torch.Tensor]]:
    """This block's (sum |delta|, sum |kept delta|), in float64, for a whole-tensor L1 rescale, and its mask. With
    `base`, `delta` is a model's tensor and the deltas are delta - base (taken in the compiled pass where it
    serves; bfloat16 tensors as stored are widened to float32 first where it does not)."""
    if base is not None:
        fast = None
        if 0 < density < 1 and delta.dtype == base.dtype:
            fast = _fast_masks(delta, method, density, key, epsilon, rank_scope, row_offset, base)
        if fast is not None:
            return fast[1:], fast[0]
        delta = delta.float() - base.float()
    else:
        delta = delta.float()  # a bfloat16 tensor as stored: its arithmetic in float32
    if density >= 1 or density <= 0:
        s = abs_sum(delta)
        return (s, (s if density >= 1 else 0.0)), None
    fast = _fast_masks(delta, method, density, key, epsilon, rank_scope, row_offset)
    if fast is not None:
        return fast[1:], fast[0]
    a = delta.abs()
    mask, _ = keep_mask(delta, method, density, key, epsilon, rank_scope, row_offset, magnitudes=a)
    before = sum64(a)
    return (before, sum64(kept(a, mask, out=a))), mask


def sign_consensus(weighted: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election over stacked weighted deltas [N, ...]: mask of elements agreeing with the majority sign.

    "sum" elects the sign of the summed weighted deltas, "count" the sign held by more models (ties go to +).
    Zero elements never agree.
    """
    sign = weighted.sign()
    if method == "sum":
        majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    elif method == "count":
        majority = torch.where(sign.sum(dim=0) >= 0, 1.0, -1.0)
    else:
        raise ValueError(method)
    return sign == majority.to(sign.dtype)


def sparsify(
    delta: torch.Tensor,
    method: Optional[str],
    density: float,
    key: int = 0,
    rescale: bool = False,
    epsilon: float = 0.15,
    gamma: float = 0.01,
    rescale_mode: str = "l1",
    rank_scope: str = "row",
    row_offset: int = 0,
    l1: Optional[L1Sums] = None,
    mask: Optional[torch.Tensor] = None,
    cut: Optional[RankCut] = None,
    offsets: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Dispatch to one of the sparsifiers above by mergekit's name for it."""
    if method is None:
        return delta
    if method == "magnitude":
        return magnitude(delta, density, rescale, cut, offsets)
    if method == "magnitude_outliers":
        return magnitude_outliers(delta, density, gamma, rescale, cut, offsets)
    if method in ("random", "della_magprune"):
        return random_sparsify(
            delta, method, density, key, rescale, rescale_mode, epsilon, rank_scope, row_offset, l1, mask
        )
    raise ValueError(f"unknown sparsification {method}")
