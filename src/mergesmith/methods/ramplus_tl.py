"""RAM+ tensor-local: RAM, with each model's own deltas boosted by how much of its change it shares with others."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from mergesmith.methods import compiled
from mergesmith.methods.ram import combine, contributions
from mergesmith.methods.sparsify import compiled_serves
from mergesmith.methods.registry import Round, TwoPass, merge_method

Counts = List[Tuple[int, int]]  # per model: (elements it shares with other models, elements it alone changed)


def overlap_counts(base: torch.Tensor, inputs: Sequence[torch.Tensor], epsilon: float) -> Counts:
    """Per model, how many of its counted elements (|x_i - base| > epsilon) other models count too, and how many
    it alone counts. Whole numbers: the sums over blocks of rows are the whole tensor's, exactly."""
    b = base.float()
    xs = [x.float() for x in inputs]
    if compiled_serves(b, xs):
        return compiled.ram_counts(b, xs, epsilon)
    count = contributions(b, xs, epsilon)
    shared_el, unique_el = count > 1, count == 1
    out = []
    for x in xs:
        kept = (x - b).abs_() > epsilon
        out.append((int((kept & shared_el).sum()), int((kept & unique_el).sum())))
    return out


def boosts(stat: Counts, r: float, alpha: float, epsilon: float) -> List[float]:
    """Per model 1 + r * clamp(rho, 0, alpha), rho = shared / max(unique, epsilon), in float64 (a model that
    counts no element shared with others has rho = 0; one with shared elements and a zero divisor rho = inf)."""
    out = []
    for shared, unique in stat:
        div = max(unique, epsilon)
        rho = 0.0 if not shared else shared / div if div > 0 else math.inf
        out.append(1.0 + r * min(max(rho, 0.0), alpha))
    return out


def _add(total: Optional[Counts], part: Counts) -> Counts:
    return part if total is None else [(s0 + s1, u0 + u1) for (s0, u0), (s1, u1) in zip(total, part)]


# The boosts depend on counts over the whole tensor: pass 1 adds each block's counts, pass 2 merges the blocks.
COUNTS = TwoPass((Round(overlap_counts, _add, boosts),), share=lambda stat, k: stat)


@merge_method(
    "ramplus_tl",
    pretty="Reinforced Agent Merging Plus (Tensor-Local)",
    url="https://arxiv.org/abs/2601.13572",
    ranges={"r": (0, None), "alpha": (0, None), "epsilon": (0, None)},
    streaming=COUNTS,
)
def ramplus_tl(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    stat: Optional[List[float]] = None,
) -> torch.Tensor:
    """RAM, with the deltas a model alone made boosted by how much of its change overlaps other models'.

    mergekit `ramplus_tl`: as `ram` (deltas count where |x_i - base| > epsilon; c per element counts the models),
    and per model over the whole tensor rho_i = shared_i / max(unique_i, epsilon), where shared_i counts its
    elements with c > 1 and unique_i those with c = 1. out = base + (1 + r clamp(rho_i, 0, alpha)) d_i where model
    i alone counts (c = 1), base + (sum of the counted d_i) / c where c > 1, base where c = 0.

    Args:
        r: how much a model's overlap boosts its own deltas
        alpha: the largest overlap ratio rho that counts
        epsilon: a delta counts when its magnitude is above this
    """
    if not inputs:
        return base.float().clone()
    b, xs = base.float(), [x.float() for x in inputs]
    lam = stat if stat is not None else boosts(overlap_counts(b, xs, epsilon), r, alpha, epsilon)
    if compiled_serves(b, xs):
        return compiled.ram_merge(b, xs, epsilon, lam).reshape(b.shape)
    return combine(b, xs, epsilon, contributions(b, xs, epsilon), lam)
