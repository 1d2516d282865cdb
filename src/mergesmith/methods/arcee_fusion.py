"""Arcee Fusion: keep the base except where the other model's change is important enough."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mergesmith.methods.registry import merge_method


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|other - base| * KL(softmax(other) || softmax(base)), the KL taken along the last dimension (per row)."""
    a, b = base.float(), other.float()
    p = F.softmax(b, dim=-1) + 1e-8
    q = F.softmax(a, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (b - a).abs() * kl


@merge_method("arcee_fusion", pretty="Arcee Fusion", url="https://arcee.ai", inputs=(1, 1))
def arcee_fusion(base: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Keep the base except where the other model's change is important (|delta| x KL above a quartile threshold).

    other where importance >= median + 1.5 * (q3 - q1), else base (mergekit `arcee_fusion`).

    Quantiles are the sorted importances at index floor(q (n - 1)). mergekit estimates them from 1,000,000
    elements drawn with an unseeded generator when a tensor is larger; here they are always exact, so the result
    is reproducible (and equal to mergekit's for tensors up to 1M elements).
    """
    other = inputs[0]
    imp = fusion_importance(base, other)
    s = torch.sort(imp.reshape(-1)).values
    n = s.numel()
    q1, med, q3 = (s[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    # where(mask, other, base) is mergekit's base + (other - base) * mask without its rounding: taken elements
    # are exactly the other model's
    return torch.where(imp >= med + 1.5 * (q3 - q1), other.float(), base.float())
