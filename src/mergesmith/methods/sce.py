"""SCE (Wan et al., 2024, FuseChat): Select by variance, Calculate weights by energy, Erase sign conflicts."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import merge_method
from mergesmith.methods.sparsify import sign_consensus


def sce_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Keep the fraction `select_topk` of elements (of those with nonzero variance) whose variance across the
    models' deltas is largest: k = int(count_nonzero(var) * select_topk). Ties go to the lower element index."""
    if select_topk >= 1:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    var = deltas.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
    if k:
        order = torch.sort(var.reshape(-1), descending=True, stable=True).indices[:k]
        mask[order] = True
    return mask.reshape(var.shape)


@merge_method("sce", pretty="SCE", url="https://arxiv.org/abs/2408.07990", ranges={"select_topk": (0, 1)})
def sce(
    base: torch.Tensor, inputs: Sequence[torch.Tensor], *, select_topk: float = 1.0, int8_mask: bool = False
) -> torch.Tensor:
    """Select high-variance elements, weight task vectors by energy, erase sign conflicts.

    base + sum_i(m_i w_i d_i) / max(sum_i m_i w_i, 1e-6) (mergekit `sce`).

    d_i = (x_i - base) masked by `sce_mask`; w_i = mean(d_i^2) / sum_j mean(d_j^2) (1/N each when that sum is
    < 1e-6); m_i = TIES sign agreement of d_i with the sign of sum_j d_j.

    Args:
        select_topk: fraction of elements kept by variance across models
        int8_mask: accepted for compatibility (masks are booleans here)
    """
    if not inputs:
        return base.float().clone()
    b = base.float()
    deltas = torch.stack([x.float() - b for x in inputs])
    if select_topk < 1:
        deltas = deltas * sce_mask(deltas, select_topk)
    energy = deltas.double().square().reshape(len(inputs), -1).mean(dim=1)
    total = float(energy.sum())
    w = (torch.full_like(energy, 1.0 / len(inputs)) if abs(total) < 1e-6 else energy / total).float()
    w = w.reshape((-1,) + (1,) * base.dim())
    erased = w * sign_consensus(deltas, "sum")
    return b + (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
