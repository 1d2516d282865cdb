"""Arcee Fusion: keep the base except where the other model's change is important enough."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mergesmith.methods import compiled, sparsify
from mergesmith.methods.registry import Round, TwoPass, merge_method
from mergesmith.methods.sparsify import RadixRanks

QUARTILES = (0.25, 0.5, 0.75)


def row_divergence(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(softmax(other) || softmax(base)) along the last dimension: one per row (kept as a dimension of 1)."""
    a, b = base.float(), other.float()
    p = F.softmax(b, dim=-1) + 1e-8
    q = F.softmax(a, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_importance(base: torch.Tensor, other: torch.Tensor, kl: Optional[torch.Tensor] = None) -> torch.Tensor:
    """|other - base| * KL(softmax(other) || softmax(base)), the KL taken along the last dimension (per row);
    `kl`: the rows' divergences where already known."""
    kl = row_divergence(base, other) if kl is None else kl
    fast = compiled.fusion_importance(base, other, kl)
    return fast if fast is not None else (other.float() - base.float()).abs() * kl


def quartile_ranks(n: int) -> List[int]:
    """Ascending ranks floor(q (n - 1)) of the first quartile, the median and the third quartile of n values."""
    return [int(q * (n - 1)) for q in QUARTILES]


def order_statistics(flat: torch.Tensor, ranks: Sequence[int]) -> List[float]:
    """The values at ascending `ranks` of a flat tensor (NaN last): a selection on the CPU, a sort elsewhere."""
    if sparsify.numpy_path(flat):
        part = np.partition(flat.numpy(), ranks)
        return [part[k].item() for k in ranks]
    s = torch.sort(flat).values
    return [s[k].item() for k in ranks]


def fusion_threshold(q1: float, med: float, q3: float) -> torch.Tensor:
    """median + 1.5 (q3 - q1), in float32 arithmetic on the float32 quartiles."""
    q1_, med_, q3_ = (torch.tensor(v, dtype=torch.float32) for v in (q1, med, q3))
    return med_ + 1.5 * (q3_ - q1_)


@dataclass
class Fusion:
    """What pass 1 learns over the row blocks: each block's row divergences (a row's own, so round 2 and the merge
    reuse them), the importances' radix ranks, then the threshold."""

    kl: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    blocks: Dict[int, Tuple[int, torch.Size]] = field(default_factory=dict)  # first row -> (start in kl, shape)
    used: int = 0
    high: Optional[np.ndarray] = None
    n: int = 0
    ranks: Optional[RadixRanks] = None
    threshold: Optional[torch.Tensor] = None

    def keep(self, row: int, kl: torch.Tensor) -> None:
        """Append a block's divergences (in block order) to one buffer grown by doubling: a small tensor kept per
        block would sit between the blocks' large freed buffers and keep the allocator from reusing them."""
        need = self.used + kl.numel()
        if need > self.kl.numel():
            grown = torch.empty(max(need, 2 * self.kl.numel()), dtype=kl.dtype, device=kl.device)
            grown[: self.used] = self.kl[: self.used]
            self.kl = grown
        self.kl[self.used : need] = kl.reshape(-1)
        self.blocks[row] = (self.used, kl.shape)
        self.used = need

    def of(self, row: int) -> torch.Tensor:
        """The divergences of the block whose first row is `row`."""
        start, shape = self.blocks[row]
        return self.kl[start : start + shape.numel()].reshape(shape)


@dataclass(frozen=True)
class FusionShare:
    threshold: torch.Tensor
    kl: torch.Tensor


def _keys(base, inputs, kl: torch.Tensor) -> np.ndarray:
    """This block's importances as RadixRanks keys (rows are whole, so they are the whole tensor's)."""
    return RadixRanks.keys(fusion_importance(base, inputs[0], kl).reshape(-1).cpu().numpy())


def _count_high(base, inputs, row_offset):
    kl = row_divergence(base, inputs[0])
    k = _keys(base, inputs, kl)
    return row_offset, kl, RadixRanks.high_counts(k), k.size


def _add_high(total: Optional[Fusion], part) -> Fusion:
    row, kl, high, n = part
    total = total if total is not None else Fusion(high=np.zeros(1 << 16, dtype=np.int64))
    total.keep(row, kl)
    total.high += high
    total.n += n
    return total


def _ranks(stat: Fusion) -> Fusion:
    stat.ranks, stat.high = RadixRanks(stat.high, quartile_ranks(stat.n)), None
    return stat


def _count_low(base, inputs, row_offset, stat: Fusion):
    return stat.ranks.low_counts(_keys(base, inputs, stat.of(row_offset)))


def _add_low(stat: Fusion, part) -> Fusion:
    stat.ranks.add_low(part)
    return stat


def _threshold(stat: Fusion) -> Fusion:
    stat.threshold, stat.ranks = fusion_threshold(*stat.ranks.values()), None
    return stat


def _share(stat: Fusion, k: int) -> FusionShare:
    return FusionShare(stat.threshold, stat.of(list(stat.blocks)[k]))


# The threshold's quartiles are over the whole tensor: pass 1 finds them by radix selection on the blocks'
# importances (two reads, memory of one block), pass 2 compares each block's importances with the threshold. The
# rows' divergences (two softmaxes a row) are taken once, in the first read.
QUARTILE_THRESHOLD = TwoPass(
    (Round(_count_high, _add_high, _ranks), Round(_count_low, _add_low, _threshold)), share=_share
)


@merge_method(
    "arcee_fusion", pretty="Arcee Fusion", url="https://arcee.ai", inputs=(1, 1), streaming=QUARTILE_THRESHOLD
)
def arcee_fusion(
    base: torch.Tensor, inputs: Sequence[torch.Tensor], stat: Optional[FusionShare] = None
) -> torch.Tensor:
    """Keep the base except where the other model's change is important (|delta| x KL above a quartile threshold).

    other where importance >= median + 1.5 * (q3 - q1), else base (mergekit `arcee_fusion`).

    Quantiles are the sorted importances at index floor(q (n - 1)). mergekit estimates them from 1,000,000
    elements drawn with an unseeded generator when a tensor is larger; here they are always exact, so the result
    is reproducible (and equal to mergekit's for tensors up to 1M elements). A block of rows of a larger tensor
    gets the whole tensor's threshold and its rows' divergences as `stat`.
    """
    other = inputs[0]
    if stat is not None:
        imp, thr = fusion_importance(base, other, stat.kl), stat.threshold
    else:
        imp = fusion_importance(base, other)
        thr = fusion_threshold(*order_statistics(imp.reshape(-1), quartile_ranks(imp.numel())))
    # where(mask, other, base) is mergekit's base + (other - base) * mask without its rounding: taken elements
    # are exactly the other model's
    return torch.where(imp >= thr, other.float(), base.float())
