"""The task-arithmetic family (task_arithmetic, ties, dare_*, della*, breadcrumbs*): one pure kernel, registered
under eight names, and the two whole-tensor statistics its row blocks need (`L1_SUMS`, `MAGNITUDE_CUTS`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from mergesmith.methods.exact import integer_weights
from mergesmith.methods.registry import PerModel, Round, Streaming, TwoPass, merge_method
from mergesmith.methods import compiled
from mergesmith.methods import sparsify as sparsifiers  # its numpy_path switch, patched by the device-path tests
from mergesmith.methods.sparsify import (
    L1Sums,
    RadixSelect,
    RankCut,
    compiled_serves,
    cut_kept,
    kept,
    l1_factor,
    l1_sums,
    magnitude_range,
    sparsify,
)


def generalized_task_arithmetic(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Optional[Sequence[int]] = None,
    sparsification: Optional[str] = None,
    consensus: Optional[str] = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    epsilons: Optional[Sequence[float]] = None,
    gammas: Optional[Sequence[float]] = None,
    rescale_mode: str = "l1",
    rank_scope: str = "row",
    row_offset: int = 0,
    stat: Any = None,
) -> torch.Tensor:
    """base + lambda * combine_i(w_i * sparsify(x_i - base)), all in float32.

    combine is a plain sum, or with `consensus` the TIES disjoint merge: only elements whose sign agrees with the
    elected sign are summed. With `normalize` the sum is divided by the sum of the weights that contributed
    (per element under consensus; |sum| < 1e-8 or 0 counts as 1), as in mergekit.

    For a block of rows of a larger tensor, `row_offset` places the block (random streams) and `stat` is its share
    of a whole-tensor statistic (`L1Share` or `CutShare`: `stat.model(i, delta)` gives sparsify's extra arguments).
    """
    if not inputs:
        return base
    masked = [_masked_of(stat, i, densities[i], rescale, rescale_mode) for i in range(len(inputs))]
    # every model's block from pass 1's mask, or trimmed by its tensor's cut, in the compiled kernels, which take
    # bfloat16 as stored (L1_SUMS, MAGNITUDE_CUTS)
    served = all(masked) and _fused(base, inputs, stat, rescale, rescale_mode)
    trimmed = not served and _trimmed(base, inputs, stat, sparsification, densities, rescale)
    if not (served or trimmed) and any(t.dtype != torch.float32 for t in (base, *inputs)):
        base, inputs = base.float(), [x.float() for x in inputs]

    def sparse(i: int, x: torch.Tensor) -> torch.Tensor:
        if masked[i] and (served or compiled_serves(base, [x])):
            return compiled.masked_delta(x, base, stat.masks[i], l1_factor(*stat.sums[i]))  # pass 1's mask, in C
        extra: Dict[str, Any] = stat.model(i, x) if stat is not None else {}
        if _trim_of(extra, sparsification, densities[i], rescale):  # the trim takes x - base itself
            return cut_kept(x.reshape(-1), extra["cut"], extra["offsets"], base=base.reshape(-1)).reshape_as(x)
        delta = x - base
        if epsilons is not None:
            extra["epsilon"] = epsilons[i]
        if gammas is not None:
            extra["gamma"] = gammas[i]
        return sparsify(
            delta,
            sparsification,
            densities[i],
            key=keys[i] if keys is not None else 0,
            rescale=rescale,
            rescale_mode=rescale_mode,
            rank_scope=rank_scope,
            row_offset=row_offset,
            **extra,
        )

    # w_i = nums_i / den exactly: products and small sums stay exact in float32 (see methods/exact.py)
    nums, den = integer_weights(weights)
    if consensus:
        mixed = _consensus(base, inputs, sparse, nums, den, consensus, normalize)
    elif served:
        factors = [l1_factor(*stat.sums[i]) for i in range(len(inputs))]
        return compiled.masked_sum(base, inputs, stat.masks, factors, nums, _divisor(nums, den, normalize), lambda_)
    else:
        mixed = _weighted_sum(inputs, sparse, nums, den, normalize)
    if lambda_ != 1:
        mixed = mixed * lambda_
    added = compiled.add_base(mixed, base)  # mixed is this call's own: added to in place
    return added if added is not None else base.float() + mixed


def _consensus(base, inputs, sparse, nums, den, consensus: str, normalize: bool) -> torch.Tensor:
    """TIES disjoint merge (no stack of N deltas, no float sign tensors): elect the sign from the sum (or count) of
    the weighted deltas, then add the deltas that agree with it, in recipe order. One compiled pass for float32 on
    the CPU (the same float32 operations)."""
    if consensus not in ("sum", "count"):
        raise ValueError(consensus)
    wd = [sparse(i, x) for i, x in enumerate(inputs)]
    if compiled.available() and all(sparsifiers.numpy_path(d) and d.dtype == torch.float32 for d in wd):
        mixed = compiled.consensus(wd, nums, consensus == "count", normalize)
        return mixed / den if den != 1 and not normalize else mixed
    votes = None
    for i, d in enumerate(wd):
        if nums[i] != 1:
            d.mul_(nums[i])
        v = d if consensus == "sum" else d.sign()
        votes = v.clone() if votes is None else votes.add_(v)
    positive = votes >= 0
    negative = ~positive
    del votes
    mixed = divisor = None
    for i, d in enumerate(wd):
        # torch.where(positive, d > 0, d < 0), and d where it agrees: boolean ops and a masked select, ~5x faster
        # on the CPU than two torch.where over scattered masks
        agree = (d > 0).logical_and_(positive).logical_or_((d < 0).logical_and_(negative))
        term = kept(d, agree)
        mixed = term if mixed is None else mixed.add_(term)
        if normalize:
            c = agree.to(base.dtype).mul_(nums[i])
            divisor = c if divisor is None else divisor.add_(c)
        wd[i] = None
    if normalize:  # in units of 1/den, like mixed: den cancels
        return mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed / den if den != 1 else mixed


def _weighted_sum(inputs, sparse, nums, den, normalize: bool) -> torch.Tensor:
    """One model at a time, summed in recipe order (the same order on every device; no stack of N deltas)."""
    mixed = None
    for i, x in enumerate(inputs):
        d = sparse(i, x)  # always a fresh tensor (x - base, sparsified): safe to scale in place
        if nums[i] != 1:
            d.mul_(nums[i])
        mixed = d if mixed is None else mixed.add_(d)
    return _divided(mixed, nums, den, normalize)


def _trim_of(extra: Dict[str, Any], sparsification: Optional[str], density: float, rescale: bool) -> bool:
    """Whether a block's sparsification is the plain trim by its tensor's rank cut (TIES, breadcrumbs)."""
    return (
        sparsification in ("magnitude", "magnitude_outliers")
        and extra.get("cut") is not None
        and 0 < density < 1
        and not rescale
    )


def _trimmed(base: torch.Tensor, inputs, stat: Any, sparsification: Optional[str], densities, rescale: bool) -> bool:
    """Whether every model's block is the trim by its tensor's rank cut in the compiled kernel (cut_kept), which
    takes the block's bfloat16 as stored."""
    return (
        isinstance(stat, CutShare)
        and compiled_serves(base, inputs, stored=True)
        and all(_trim_of(stat.model(i, x), sparsification, densities[i], rescale) for i, x in enumerate(inputs))
    )


def _masked_of(stat: Any, i: int, density: float, rescale: bool, rescale_mode: str) -> bool:
    """Whether model i's sparsification in a block is pass 1's DARE/DELLA mask with the tensor's L1 rescale."""
    return (
        isinstance(stat, L1Share) and stat.masks[i] is not None and 0 < density < 1 and rescale and rescale_mode == "l1"
    )


def _fused(base: torch.Tensor, inputs, stat: Any, rescale: bool, rescale_mode: str) -> bool:
    """Whether pass 2 of an L1-rescaled DARE/DELLA merge runs in the compiled kernels (one fused sum, or each
    model's masked delta under the consensus; the same float32 operations)."""
    like = (base.device.type, base.dtype, base.shape)
    return (
        isinstance(stat, L1Share)
        and rescale
        and rescale_mode == "l1"
        and all(m is not None for m in stat.masks)
        and compiled.available()
        and like[0] == "cpu"
        and like[1] in compiled.WIDENED
        and all((x.device.type, x.dtype, x.shape) == like for x in inputs)
    )


def _divisor(nums, den, normalize: bool):
    """What the weighted sum of numerators is divided by: their sum under `normalize` (unless ~0), else den."""
    return sum(nums) if normalize and abs(sum(nums) / den) >= 1e-8 else den


def _divided(mixed: torch.Tensor, nums, den, normalize: bool) -> torch.Tensor:
    divisor = _divisor(nums, den, normalize)
    return mixed / divisor if divisor != 1 else mixed


# ---------------------------------------------------------------------------------------------------------------
# whole-tensor statistics of row blocks


@dataclass
class L1Stat:
    """Per model, the whole tensor's (sum |delta|, sum |kept delta|), and per block its keep masks (1 bit per
    element, numpy-packed), drawn in pass 1 and reused in pass 2."""

    sums: List[L1Sums]
    masks: List[List[Optional[np.ndarray]]]


@dataclass(frozen=True)
class L1Share:
    sums: Sequence[L1Sums]
    masks: Sequence[Optional[np.ndarray]]

    def model(self, i: int, like: torch.Tensor) -> Dict[str, Any]:
        m = self.masks[i]
        if m is not None:
            m = torch.from_numpy(np.unpackbits(m, count=like.numel()).view(np.bool_)).reshape(like.shape)
        return {"l1": self.sums[i], "mask": None if m is None else m.to(like.device)}


def _l1_collect(sparsification: str):
    def collect(base, inputs, keys, row_offset, density, epsilon=None, rank_scope="row"):
        res = [
            l1_sums(
                x,
                sparsification,
                density[i],
                keys[i],
                row_offset=row_offset,
                rank_scope=rank_scope,
                base=base,
                **({} if epsilon is None else {"epsilon": epsilon[i]}),
            )
            for i, x in enumerate(inputs)
        ]
        return [r[0] for r in res], [None if m is None else np.packbits(m.reshape(-1).cpu().numpy()) for _, m in res]

    return collect


def _l1_add(total: Optional[L1Stat], part) -> L1Stat:
    sums, masks = part
    if total is None:
        return L1Stat(list(sums), [masks])
    total.sums = [(s0 + p0, s1 + p1) for (s0, s1), (p0, p1) in zip(total.sums, sums)]
    total.masks.append(masks)
    return total


def _l1_share(stat: L1Stat, k: int) -> L1Share:
    masks, stat.masks[k] = stat.masks[k], []  # each block's masks are read once: free them
    return L1Share(stat.sums, masks)


# DARE/DELLA's L1 rescale over the whole tensor: pass 1 adds each block's sums and keeps its masks. Both passes
# take bfloat16 blocks as stored: the mask kernel and the fused sum widen them in cache (l1_sums and
# generalized_task_arithmetic widen them first where those do not serve).
L1_SUMS = {
    s: TwoPass(
        (Round(_l1_collect(s), _l1_add),), share=_l1_share, keeps_state=True, stored_inputs=True, stored_merge=True
    )
    for s in ("random", "della_magprune")
}


@dataclass(frozen=True)
class CutShare:
    cuts: Sequence[Optional[RankCut]]
    offsets: Sequence[Sequence[int]]  # per model: members of each boundary tie group in earlier blocks

    def model(self, i: int, like: torch.Tensor) -> Dict[str, Any]:
        return {"cut": self.cuts[i], "offsets": self.offsets[i]}


def _magnitudes(base, inputs, density) -> Iterator[Optional[Tuple[Any, Any]]]:
    """Per model, one at a time, this block's (x_i, base) (flat float32 arrays, or bfloat16 tensors as stored)
    whose magnitudes |x_i - base| the radix counts take, or (|x_i - base|, None) where those do not serve them (on
    another device); None where the model keeps all or nothing."""
    cpu = sparsifiers.numpy_path(base)
    b = base.reshape(-1).numpy() if cpu and base.dtype == torch.float32 else None
    stored = cpu and base.dtype == torch.bfloat16 and compiled.available()
    for x, d in zip(inputs, density):
        if not 0 < d < 1:
            yield None
        elif b is not None and x.dtype == torch.float32:
            yield x.reshape(-1).numpy(), b
        elif stored and x.dtype == torch.bfloat16:
            yield x.reshape(-1), base.reshape(-1)
        else:
            yield (x.float() - base.float()).abs_().reshape(-1).cpu().numpy(), None


def _count_high(base, inputs, density):
    return [None if a is None else RadixSelect.high_counts(*a) for a in _magnitudes(base, inputs, density)], inputs[
        0
    ].numel()


def _add_high(total, part):
    counts, n = part
    if total is None:
        return [None if c is None else c.astype(np.int64) for c in counts], n
    for acc, c in zip(total[0], counts):
        if acc is not None:
            acc += c
    return total[0], total[1] + n


def _select(sparsification: str):
    def finish(stat, density, gamma=None) -> List[Optional[RadixSelect]]:
        counts, n = stat
        sels = []
        for i, (c, d) in enumerate(zip(counts, density)):
            lo, hi, largest = magnitude_range(n, sparsification, d, *(() if gamma is None else (gamma[i],)))
            sels.append(None if c is None else RadixSelect(c, n, lo, hi, largest))
        return sels

    return finish


def _count_low(base, inputs, density, stat):
    return [
        None if s is None or a is None else s.low_counts(*a) for s, a in zip(stat, _magnitudes(base, inputs, density))
    ]


def _add_low(sels: List[Optional[RadixSelect]], part):
    for s, counts in zip(sels, part):
        if s is not None:
            s.add_low(counts)
    return sels


def _cuts(stat: List[Optional[RadixSelect]]) -> Tuple[List[Optional[RankCut]], List[Optional[List[List[int]]]]]:
    """Per model its cut, and per block the members of each boundary tie group that come before the block."""
    cuts, offsets = [], []
    for s in stat:
        cut, counts = s.result() if s is not None else (None, None)
        cuts.append(cut)
        running, before = [0] * len(cut.groups) if cut is not None else [], []
        for c in counts or []:
            before.append(list(running))
            running = [r + x for r, x in zip(running, c)]
        offsets.append(before if counts is not None else None)
    return cuts, offsets


def _cut_share(stat, k: int) -> CutShare:
    cuts, offsets = stat
    return CutShare(cuts, [[] if o is None else o[k] for o in offsets])


# TIES/breadcrumbs trims over the whole tensor: per model, two reads of the blocks find its cut by radix
# selection (sparsify.RadixSelect: memory of one block, not of the tensor) and how many members of the boundary
# tie groups each block holds, so block k knows how many come before it.
MAGNITUDE_CUTS = {
    s: TwoPass(
        (Round(_count_high, _add_high, _select(s)), Round(_count_low, _add_low, _cuts)),
        share=_cut_share,
        stored_inputs=True,  # the radix counts and the merge's trims widen bfloat16 in registers
        stored_merge=True,
    )
    for s in ("magnitude", "magnitude_outliers")
}


# ---------------------------------------------------------------------------------------------------------------
# the registered methods

DOCS = {
    "weight": "this model's weight",
    "density": "fraction of the delta to keep",
    "int8_mask": "accepted for compatibility (masks are booleans here)",
    "normalize": "divide by the sum of contributing weights",
    "rescale": "rescale kept deltas after sparsification",
    "lambda": "scale of the merged delta",
    "gamma": "fraction of largest-magnitude outliers to drop",
    "epsilon": "half-width of the keep-probability range around density",
    "rank_scope": "rank magnitudes per row (mergekit) or over the whole tensor (paper)",
    "rescale_mode": "l1: match the delta's L1 norm (mergekit); inverse_prob: divide by keep probability",
}
DENSITY = {"density": (0, 1)}
RescaleMode = Literal["l1", "inverse_prob"]


def _magnitude_streaming(sparsification: str):
    """Magnitude trims are over the whole tensor: row blocks get its cut from pass 1 (but not the L1 rescale)."""
    return lambda rescale: Streaming.WHOLE if rescale else MAGNITUDE_CUTS[sparsification]


def _random_streaming(rescale, rescale_mode):
    return L1_SUMS["random"] if rescale and rescale_mode == "l1" else Streaming.ROWS


def _della_streaming(rescale, rescale_mode, rank_scope):
    if rank_scope != "row":
        return Streaming.WHOLE
    return L1_SUMS["della_magprune"] if rescale and rescale_mode == "l1" else Streaming.ROWS


def _della_check(density, epsilon):
    for i, (d, e) in enumerate(zip(density, epsilon)):
        if 0 < d < 1 and (d - e <= 0 or d + e >= 1):
            return (
                "density",
                (
                    f"density {d:g} with epsilon {e:g} gives keep probabilities from {d - e:g} to "
                    f"{d + e:g}; density - epsilon and density + epsilon must both lie in (0, 1)"
                ),
                i,
            )
    return None


@merge_method(
    "task_arithmetic",
    pretty="Task Arithmetic",
    url="https://arxiv.org/abs/2212.04089",
    docs=DOCS,
    ranges=DENSITY,
    streaming=Streaming.ELEMENTWISE,
)
def task_arithmetic(
    base,
    inputs,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    int8_mask: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
):
    """base + lambda * sum of weighted task vectors."""
    return generalized_task_arithmetic(
        base, inputs, weight, density, normalize=normalize, rescale=rescale, lambda_=lambda_
    )


@merge_method(
    "ties",
    pretty="TIES",
    url="https://arxiv.org/abs/2306.01708",
    docs=DOCS,
    ranges=DENSITY,
    streaming=_magnitude_streaming("magnitude"),
)
def ties(
    base,
    inputs,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    int8_mask: bool = False,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    stat: Optional[CutShare] = None,
):
    """Trim task vectors by magnitude, elect signs, merge the agreeing parts."""
    return generalized_task_arithmetic(
        base,
        inputs,
        weight,
        density,
        sparsification="magnitude",
        consensus="sum",
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        stat=stat,
    )


@merge_method(
    "dare_ties",
    pretty="DARE TIES",
    url="https://arxiv.org/abs/2311.03099",
    docs=DOCS,
    ranges=DENSITY,
    randomized=True,
    streaming=_random_streaming,
)
def dare_ties(
    base,
    inputs,
    keys,
    row_offset,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    int8_mask: bool = False,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    rescale_mode: RescaleMode = "l1",
    stat: Optional[L1Share] = None,
):
    """Random drop-and-rescale of task vectors, then TIES sign consensus."""
    return generalized_task_arithmetic(
        base,
        inputs,
        weight,
        density,
        keys,
        "random",
        "sum",
        normalize,
        rescale,
        lambda_,
        rescale_mode=rescale_mode,
        row_offset=row_offset,
        stat=stat,
    )


@merge_method(
    "dare_linear",
    pretty="Linear DARE",
    url="https://arxiv.org/abs/2311.03099",
    docs=DOCS,
    ranges=DENSITY,
    randomized=True,
    streaming=_random_streaming,
)
def dare_linear(
    base,
    inputs,
    keys,
    row_offset,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    int8_mask: bool = False,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    rescale_mode: RescaleMode = "l1",
    stat: Optional[L1Share] = None,
):
    """Random drop-and-rescale of task vectors, then a weighted sum."""
    return generalized_task_arithmetic(
        base,
        inputs,
        weight,
        density,
        keys,
        "random",
        None,
        normalize,
        rescale,
        lambda_,
        rescale_mode=rescale_mode,
        row_offset=row_offset,
        stat=stat,
    )


@merge_method(
    "breadcrumbs",
    pretty="Model Breadcrumbs",
    url="https://arxiv.org/abs/2312.06795",
    docs=DOCS,
    ranges={**DENSITY, "gamma": (0, 1)},
    streaming=_magnitude_streaming("magnitude_outliers"),
)
def breadcrumbs(
    base,
    inputs,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    int8_mask: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    gamma: PerModel[float] = 0.01,
    stat: Optional[CutShare] = None,
):
    """Drop the largest outliers and the smallest deltas, then a weighted sum."""
    return generalized_task_arithmetic(
        base,
        inputs,
        weight,
        density,
        None,
        "magnitude_outliers",
        None,
        normalize,
        rescale,
        lambda_,
        gammas=gamma,
        stat=stat,
    )


@merge_method(
    "breadcrumbs_ties",
    pretty="Model Breadcrumbs with TIES",
    url="https://arxiv.org/abs/2312.06795",
    docs=DOCS,
    ranges={**DENSITY, "gamma": (0, 1)},
    streaming=_magnitude_streaming("magnitude_outliers"),
)
def breadcrumbs_ties(
    base,
    inputs,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    int8_mask: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    gamma: PerModel[float] = 0.01,
    stat: Optional[CutShare] = None,
):
    """Breadcrumbs sparsification with TIES sign consensus."""
    return generalized_task_arithmetic(
        base,
        inputs,
        weight,
        density,
        None,
        "magnitude_outliers",
        "sum",
        normalize,
        rescale,
        lambda_,
        gammas=gamma,
        stat=stat,
    )


@merge_method(
    "della",
    pretty="DELLA",
    url="https://arxiv.org/abs/2406.11617",
    docs=DOCS,
    randomized=True,
    ranges={**DENSITY, "epsilon": (0, None)},
    check=_della_check,
    streaming=_della_streaming,
)
def della(
    base,
    inputs,
    keys,
    row_offset,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    int8_mask: bool = False,
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    epsilon: PerModel[float] = 0.15,
    rank_scope: Literal["row", "tensor"] = "row",
    rescale_mode: RescaleMode = "l1",
    stat: Optional[L1Share] = None,
):
    """Magnitude-ranked random pruning (MagPrune), rescale, TIES sign consensus."""
    return generalized_task_arithmetic(
        base,
        inputs,
        weight,
        density,
        keys,
        "della_magprune",
        "sum",
        normalize,
        rescale,
        lambda_,
        epsilon,
        None,
        rescale_mode,
        rank_scope,
        row_offset,
        stat,
    )


@merge_method(
    "della_linear",
    pretty="Linear DELLA",
    url="https://arxiv.org/abs/2406.11617",
    docs=DOCS,
    randomized=True,
    ranges={**DENSITY, "epsilon": (0, None)},
    check=_della_check,
    streaming=_della_streaming,
)
def della_linear(
    base,
    inputs,
    keys,
    row_offset,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    int8_mask: bool = False,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    epsilon: PerModel[float] = 0.15,
    rank_scope: Literal["row", "tensor"] = "row",
    rescale_mode: RescaleMode = "l1",
    stat: Optional[L1Share] = None,
):
    """Magnitude-ranked random pruning (MagPrune), rescale, weighted sum."""
    return generalized_task_arithmetic(
        base,
        inputs,
        weight,
        density,
        keys,
        "della_magprune",
        None,
        normalize,
        rescale,
        lambda_,
        epsilon,
        None,
        rescale_mode,
        rank_scope,
        row_offset,
        stat,
    )
