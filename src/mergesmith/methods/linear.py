"""Linear (weighted average) merging: a pure kernel."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.exact import integer_weights


def linear(inputs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize` (Wortsman et al., 2022, "model soups").

    Computed as (sum_i n_i x_i) / (sum_i n_i or d) with w_i = n_i / d, so exact results stay exact.
    """
    nums, den = integer_weights(weights)
    out = torch.zeros_like(inputs[0], dtype=torch.float32)
    for x, n in zip(inputs, nums):
        out.add_(x, alpha=n)
    divisor = sum(nums) if normalize else den
    if divisor != 1:
        out.div_(divisor)
    return out
