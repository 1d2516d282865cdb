"""The task-arithmetic family (task_arithmetic, ties, dare_*, della*, breadcrumbs*) as one pure kernel."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from mergesmith.methods.exact import integer_weights
from mergesmith.methods.sparsify import L1Sums, RankCut, l1_sums, magnitude_range, rank_cut_blocks, sparsify


def generalized_task_arithmetic(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Sequence[int],
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
    l1: Optional[Sequence[L1Sums]] = None,
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    cuts: Optional[Sequence[Optional[RankCut]]] = None,
    offsets: Optional[Sequence[Sequence[int]]] = None,
) -> torch.Tensor:
    """base + lambda * combine_i(w_i * sparsify(x_i - base)), all in float32.

    combine is a plain sum, or with `consensus` the TIES disjoint merge: only elements whose sign agrees with the
    elected sign are summed. With `normalize` the sum is divided by the sum of the weights that contributed
    (per element under consensus; |sum| < 1e-8 or 0 counts as 1), as in mergekit.

    For a block of rows of a larger tensor, `row_offset` places the block (random streams) and `l1` gives each
    model's whole-tensor L1 sums and `masks` this block's keep masks (see `task_vector_l1_sums`).
    """
    if not inputs:
        return base
    n = len(inputs)
    epsilons = epsilons or [0.15] * n
    gammas = gammas or [0.01] * n
    def sparse(i: int, x: torch.Tensor) -> torch.Tensor:
        return sparsify(x - base, sparsification, densities[i], key=keys[i], rescale=rescale, epsilon=epsilons[i],
                        gamma=gammas[i], rescale_mode=rescale_mode, rank_scope=rank_scope, row_offset=row_offset,
                        l1=l1[i] if l1 is not None else None, mask=masks[i] if masks is not None else None,
                        cut=cuts[i] if cuts is not None else None, offsets=offsets[i] if offsets is not None else None)

    # w_i = nums_i / den exactly: products and small sums stay exact in float32 (see methods/exact.py)
    nums, den = integer_weights(weights)
    if consensus:
        # TIES disjoint merge, one model at a time (no stack of N deltas, no float sign tensors): elect the sign
        # from the sum (or count) of the weighted deltas, then add the deltas that agree with it, in recipe order
        wd = []
        votes = None
        for i, x in enumerate(inputs):
            d = sparse(i, x)
            if nums[i] != 1:
                d.mul_(nums[i])
            wd.append(d)
            v = d if consensus == "sum" else d.sign()
            votes = v.clone() if votes is None else votes.add_(v)
        if consensus not in ("sum", "count"):
            raise ValueError(consensus)
        positive = votes >= 0
        del votes
        zero = torch.zeros((), dtype=base.dtype, device=base.device)
        mixed = divisor = None
        for i, d in enumerate(wd):
            agree = torch.where(positive, d > 0, d < 0)
            term = torch.where(agree, d, zero)
            mixed = term if mixed is None else mixed.add_(term)
            if normalize:
                c = agree.to(base.dtype).mul_(nums[i])
                divisor = c if divisor is None else divisor.add_(c)
            wd[i] = None
        if normalize:  # in units of 1/den, like mixed: den cancels
            mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        elif den != 1:
            mixed = mixed / den
    else:
        # one model at a time, summed in recipe order (the same order on every device; no stack of N deltas)
        mixed = None
        for i, x in enumerate(inputs):
            d = sparse(i, x)  # always a fresh tensor (x - base, sparsified): safe to scale in place
            if nums[i] != 1:
                d.mul_(nums[i])
            mixed = d if mixed is None else mixed.add_(d)
        total = sum(nums) / den
        divisor = sum(nums) if normalize and abs(total) >= 1e-8 else den
        if divisor != 1:
            mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


def task_vector_l1_sums(base: torch.Tensor, inputs: Sequence[torch.Tensor], densities: Sequence[float],
                        keys: Sequence[int], sparsification: str, epsilons: Optional[Sequence[float]] = None,
                        rank_scope: str = "row", row_offset: int = 0
                        ) -> Tuple[List[L1Sums], List[Optional[torch.Tensor]]]:
    """Per model, this block's (sum |delta|, sum |kept delta|) (add them over blocks for the whole tensor's) and
    its keep mask (so the second pass need not draw it again)."""
    epsilons = epsilons or [0.15] * len(inputs)
    res = [l1_sums(x - base, sparsification, densities[i], keys[i], epsilons[i], rank_scope, row_offset)
           for i, x in enumerate(inputs)]
    return [r[0] for r in res], [r[1] for r in res]


def magnitude_cuts(load, blocks: Sequence[Tuple[int, int]], n: int, sparsification: str,
                   densities: Sequence[float], gammas: Sequence[float]):
    """Whole-tensor TIES/breadcrumbs trims for a tensor merged in row blocks. `load(a, b, i)` returns (base, x_i)
    rows [a, b) in float32. Per model, two reads of |x_i - base| block by block find its RankCut by radix selection
    (sparsify.rank_cut_blocks: memory of one block, not of the tensor) and count each block's members of the
    boundary tie groups, so block k knows how many come before it. Returns
    {"cuts": [RankCut per model], "offsets": [per block: per model: per group]}."""
    cuts: List[Optional[RankCut]] = []
    counts = []
    for i, (d, g) in enumerate(zip(densities, gammas)):
        if d >= 1 or d <= 0:
            cuts.append(None)
            counts.append([[] for _ in blocks])
            continue

        def read(k: int, i: int = i):
            base, x = load(*blocks[k], i)
            return (x - base).abs_().reshape(-1).cpu().numpy()

        lo, hi, largest = magnitude_range(n, sparsification, d, g)
        cut, per_block = rank_cut_blocks(read, len(blocks), n, lo, hi, largest)
        cuts.append(cut)
        counts.append(per_block)
    offsets = []
    running = [[0] * len(c.groups) if c is not None else [] for c in cuts]
    for k in range(len(blocks)):
        offsets.append([list(r) for r in running])
        running = [[r + c for r, c in zip(run, counts[i][k])] for i, run in enumerate(running)]
    return {"cuts": cuts, "offsets": offsets}
