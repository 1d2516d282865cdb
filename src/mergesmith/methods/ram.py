"""RAM (Reinforced Agent Merging): task-vector elements that one model alone changed are taken whole, elements
several models changed are averaged over those models."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergesmith.methods import compiled, sparsify
from mergesmith.methods.registry import Streaming, merge_method


def contributions(b: torch.Tensor, inputs: Sequence[torch.Tensor], epsilon: float) -> torch.Tensor:
    """Per element, how many models changed it by more than epsilon (|x_i - b| > epsilon)."""
    count = torch.zeros(b.shape, dtype=torch.int32, device=b.device)
    for x in inputs:
        count += (x - b).abs_() > epsilon
    return count


def combine(
    b: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    epsilon: float,
    count: torch.Tensor,
    boosts: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """b + (the kept delta, times model i's boost, where model i alone changed the element; else the mean of the
    kept deltas). Kept deltas are summed in recipe order and divided once, so exact means stay exact."""
    total = torch.zeros_like(b)
    unique = torch.zeros_like(b) if boosts is not None else None
    zero = torch.zeros((), dtype=b.dtype, device=b.device)
    for i, x in enumerate(inputs):
        d = x - b
        kept = torch.where(d.abs() > epsilon, d, zero)
        total.add_(kept)
        if unique is not None:
            unique.add_(kept, alpha=boosts[i])
    mean = total.div_(count.clamp(min=1))  # where one model alone counts, its delta divided by 1: exact
    return b + (mean if unique is None else torch.where(count == 1, unique, mean))


@merge_method(
    "ram",
    pretty="Reinforced Agent Merging",
    url="https://arxiv.org/abs/2601.13572",
    ranges={"epsilon": (0, None)},
    streaming=Streaming.ELEMENTWISE,
)
def ram(base: torch.Tensor, inputs: Sequence[torch.Tensor], *, epsilon: float = 1e-5) -> torch.Tensor:
    """Take deltas that one model alone made; average the deltas several models made.

    mergekit `ram`: delta d_i = x_i - base counts where |d_i| > epsilon; per element, c = how many models count.
    out = base + d_i where c = 1 (the one model's delta), base + (sum of the counted d_i) / c where c > 1, base where
    c = 0.

    Args:
        epsilon: a delta counts when its magnitude is above this
    """
    if not inputs:
        return base.float().clone()
    b, xs = base.float(), [x.float() for x in inputs]
    if sparsify.compiled_serves(b, xs):
        return compiled.ram_merge(b, xs, epsilon, None).reshape(b.shape)
    return combine(b, xs, epsilon, contributions(b, xs, epsilon))
