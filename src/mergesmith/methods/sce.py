"""SCE (Wan et al., 2024, FuseChat): Select by variance, Calculate weights by energy, Erase sign conflicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from mergesmith.methods import compiled, sparsify
from mergesmith.methods.registry import Round, TwoPass, merge_method
from mergesmith.methods.sparsify import RadixSelect, RankCut, apply_cut, rank_range_mask, sign_consensus


VAR_CHUNK = 1 << 14  # elements per step of `variances`: its float64 working arrays stay in the CPU's cache


def variances(deltas: torch.Tensor) -> torch.Tensor:
    """Variance over the models of deltas [N, ...] (population form): the float32 values of torch.var(dim=0,
    unbiased=False). ATen's CPU kernel runs Welford's update in float64 over the models in order, one element at a
    time; here the same update runs on chunks of elements (~10x faster, and the same values on any device)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    n, m = flat.shape
    if compiled.available() and flat.device.type == "cpu" and flat.dtype == torch.float32 and n * m:
        return compiled.variances(list(flat)).reshape(deltas.shape[1:])  # the same update, compiled
    out = torch.empty(m, dtype=torch.float32, device=flat.device)
    bufs = torch.empty((4, min(m, VAR_CHUNK)), dtype=torch.float64, device=flat.device)
    for a in range(0, m, VAR_CHUNK):
        b = min(m, a + VAR_CHUNK)
        mean, m2, x, delta = bufs[:, : b - a]
        mean.copy_(flat[0, a:b]).add_(0.0)  # the kernel's first step, 0 + x / 1: -0.0 becomes +0.0
        m2.zero_()
        for i in range(1, n):
            torch.sub(x.copy_(flat[i, a:b]), mean, out=delta)
            mean.add_(delta / (i + 1))
            m2.add_(delta.mul_(x.sub_(mean)))  # delta * (x - new mean), each rounded once as in the kernel
        out[a:b] = m2.div_(n)
    return out.reshape(deltas.shape[1:])


def sce_mask(
    deltas: torch.Tensor, select_topk: float, cut: Optional[RankCut] = None, before: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """Keep the fraction `select_topk` of elements (of those with nonzero variance) whose variance across the
    models' deltas is largest: k = int(count_nonzero(var) * select_topk). Ties go to the lower element index.

    For a block of rows of a larger tensor, `cut` (the whole tensor's, from pass 1) and `before` (members of its
    boundary tie groups in earlier blocks) say which of the block's elements are kept."""
    if select_topk >= 1:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    var = variances(deltas).reshape(-1)
    if cut is not None:
        return apply_cut(var, cut, before).reshape(deltas.shape[1:])
    k = int(int(torch.count_nonzero(var)) * select_topk)
    # a selection, not a sort: rank_range_mask keeps the same elements as a stable descending sort's first k
    return rank_range_mask(var, 0, k, largest_first=True).reshape(deltas.shape[1:])


def selected_deltas(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    select_topk: float,
    cut: Optional[RankCut] = None,
    before: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """The models' deltas [N, ...] times sce_mask (so -0.0 where a negative delta is dropped, as in mergekit)."""
    deltas = torch.stack([x.float() for x in inputs]).sub_(base.float())
    if select_topk < 1:
        deltas.mul_(sce_mask(deltas, select_topk, cut, before))
    return deltas


def block_mask(
    base: torch.Tensor, inputs: Sequence[torch.Tensor], select_topk: float, cut: Optional[RankCut], before
) -> Optional[torch.Tensor]:
    """sce_mask of a block on the compiled path, flat (None: all kept); with 0 < select_topk < 1 it takes the
    whole tensor's `cut`."""
    if select_topk >= 1:
        return None
    if select_topk <= 0 or cut.empty:
        return torch.zeros(base.numel(), dtype=torch.bool)
    var = compiled.variances(inputs, base)
    return compiled.cut_mask(var, cut.low, cut.high, sparsify.block_groups(cut, before))


def energy_weights(energy: torch.Tensor) -> torch.Tensor:
    """w_i = energy_i / sum_j energy_j from float64 energies, in float32 (1/N each when the sum is < 1e-6)."""
    total = float(energy.sum())
    return (torch.full_like(energy, 1.0 / len(energy)) if abs(total) < 1e-6 else energy / total).float()


def sum_squares64(d: torch.Tensor) -> float:
    """sum of d^2, squared and added in float64 (numpy's pairwise sum on the CPU: the same on any thread count)."""
    if sparsify.numpy_path(d):
        a = d.reshape(-1).numpy().astype(np.float64)
        return float(np.add.reduce(np.square(a, out=a)))
    return d.double().square_().sum().item()


# ---------------------------------------------------------------------------------------------------------------
# whole-tensor statistics of row blocks


@dataclass
class Pass1:
    """What pass 1 learns over the row blocks: each block's first row, the variances' radix selection, then the
    whole tensor's cut and per block the members of its boundary tie groups in earlier blocks, then the models'
    float64 sums of squared selected deltas (in block order) and their energy weights."""

    rows: List[int] = field(default_factory=list)
    n: int = 0
    nonzero: int = 0
    high: Optional[np.ndarray] = None
    select: Optional[RadixSelect] = None
    cut: Optional[RankCut] = None
    before: List[List[int]] = field(default_factory=list)
    squares: Optional[List[float]] = None
    squared: int = 0  # the elements those sums run over
    weights: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SceShare:
    cut: Optional[RankCut]
    before: Optional[Sequence[int]]
    weights: torch.Tensor


def _variances(base, inputs) -> np.ndarray:
    if sparsify.compiled_serves(base, inputs, stored=True):
        return compiled.variances(inputs, base).numpy()
    return variances(torch.stack([x.float() for x in inputs]).sub_(base.float())).reshape(-1).cpu().numpy()


def _count_high(base, inputs, row_offset):
    v = _variances(base, inputs)
    return row_offset, RadixSelect.high_counts(v), int(np.count_nonzero(v)), v.size


def _add_high(total: Optional[Pass1], part) -> Pass1:
    row, high, nonzero, n = part
    total = total if total is not None else Pass1(high=np.zeros(1 << 16, dtype=np.int64))
    total.rows.append(row)
    total.high += high
    total.nonzero += nonzero
    total.n += n
    return total


def _select(stat: Pass1, select_topk: float) -> Pass1:
    k = int(stat.nonzero * select_topk)
    stat.select, stat.high = RadixSelect(stat.high, stat.n, 0, k, largest_first=True), None
    return stat


def _count_low(base, inputs, stat: Pass1):
    return stat.select.low_counts(_variances(base, inputs)) if not stat.select.empty else {}


def _add_low(stat: Pass1, part) -> Pass1:
    stat.select.add_low(part)
    return stat


def _cut(stat: Pass1) -> Pass1:
    """The cut, and per block how many members of each boundary tie group come before it."""
    stat.cut, counts = stat.select.result()
    stat.select = None
    running = [0] * len(stat.cut.groups)
    for c in counts:
        stat.before.append(list(running))
        running = [r + x for r, x in zip(running, c)]
    return stat


def _compiled_block(base, inputs, select_topk: float, cut: tuple) -> bool:
    """Whether the compiled kernels take a block (CPU tensors of one shape, all float32 or all bfloat16 as stored),
    and its selection known (the tensor's cut, or no selection at all)."""
    return sparsify.compiled_serves(base, inputs, stored=True) and bool(cut or not 0 < select_topk < 1)


def _sum_squares(base, inputs, row_offset, select_topk, stat: Optional[Pass1]) -> Tuple[int, List[float]]:
    cut = () if stat is None or stat.cut is None else (stat.cut, stat.before[stat.rows.index(row_offset)])
    if _compiled_block(base, inputs, select_topk, cut):
        mask = block_mask(base, inputs, select_topk, *(cut or (None, None)))
        return base.numel(), [compiled.selected_squares(x, base, mask) for x in inputs]
    deltas = selected_deltas(base, inputs, select_topk, *cut)
    return deltas[0].numel(), [sum_squares64(d) for d in deltas]


def _add_squares(total: Optional[Pass1], part: Tuple[int, List[float]]) -> Pass1:
    n, squares = part
    total = total if total is not None else Pass1()
    total.squares = squares if total.squares is None else [a + b for a, b in zip(total.squares, squares)]
    total.squared += n
    return total


def _weights(stat: Pass1) -> Pass1:
    """Energy_i = mean of model i's squared selected deltas over the whole tensor (sum / n, as torch's mean)."""
    stat.weights = energy_weights(torch.tensor(stat.squares, dtype=torch.float64) / stat.squared)
    return stat


def _share(stat: Pass1, k: int) -> SceShare:
    return SceShare(stat.cut, stat.before[k] if stat.cut is not None else None, stat.weights)


# The energies are over the whole tensor, and with select_topk in (0, 1) so is the variance cut: pass 1 finds the
# cut by radix selection on the blocks' variances (two reads, as MAGNITUDE_CUTS does for TIES), then adds up each
# block's sums of squared selected deltas; pass 2 merges each block with the cut and the weights.
# Both passes take bfloat16 blocks as stored: the compiled kernels widen them where they read them.
ENERGY = Round(_sum_squares, _add_squares, _weights)
SCE_WEIGHTS = TwoPass((ENERGY,), share=_share, stored_inputs=True, stored_merge=True)
SCE_SELECTION = TwoPass(
    (Round(_count_high, _add_high, _select), Round(_count_low, _add_low, _cut), ENERGY),
    share=_share,
    stored_inputs=True,
    stored_merge=True,
)


@merge_method(
    "sce",
    pretty="SCE",
    url="https://arxiv.org/abs/2408.07990",
    ranges={"select_topk": (0, 1)},
    streaming=lambda select_topk: SCE_SELECTION if 0 < select_topk < 1 else SCE_WEIGHTS,
)
def sce(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    stat: Optional[SceShare] = None,
) -> torch.Tensor:
    """Select high-variance elements, weight task vectors by energy, erase sign conflicts.

    base + sum_i(m_i w_i d_i) / max(sum_i m_i w_i, 1e-6) (mergekit `sce`).

    d_i = (x_i - base) masked by `sce_mask`; w_i = mean(d_i^2) / sum_j mean(d_j^2) (1/N each when that sum is
    < 1e-6); m_i = TIES sign agreement of d_i with the sign of sum_j d_j. A block of rows of a larger tensor gets
    the whole tensor's variance cut and weights as `stat`.

    Args:
        select_topk: fraction of elements kept by variance across models
        int8_mask: accepted for compatibility (masks are booleans here)
    """
    if not inputs:
        return base.float().clone()
    cut = () if stat is None or stat.cut is None else (stat.cut, stat.before)
    fits = len(inputs) <= compiled.IN_ORDER  # the compiled merge adds in model order, as torch does up to there
    if stat is not None and fits and _compiled_block(base, inputs, select_topk, cut):
        mask = block_mask(base, inputs, select_topk, *(cut or (None, None)))
        return compiled.sce_merge(base, inputs, mask, stat.weights).reshape(base.shape)
    b = base.float()
    deltas = selected_deltas(b, inputs, select_topk, *cut)
    if stat is not None:
        w = stat.weights
    else:  # float64 squares, squared in place: one float64 copy of the deltas, not two
        energy = deltas.double().square_().reshape(len(inputs), -1).mean(dim=1)
        w = energy_weights(energy)
    w = w.reshape((-1,) + (1,) * base.dim())
    erased = w * sign_consensus(deltas, "sum")
    den = erased.sum(dim=0).clamp(min=1e-6)
    return b + deltas.mul_(erased).sum(dim=0) / den  # the products in place of the deltas: one [N, ...] less
