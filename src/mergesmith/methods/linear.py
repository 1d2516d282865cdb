"""Linear (weighted average) merging."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.exact import integer_weights
from mergesmith.methods.registry import PerModel, Streaming, merge_method


def _weights_sum_to_zero(weight, normalize):
    if normalize and abs(sum(weight)) < 1e-12:
        return "weight", (
            "the weights sum to 0, so normalize cannot divide by them; set normalize: false or change the weights"
        )
    return None


@merge_method(
    "linear",
    pretty="Linear",
    url="https://arxiv.org/abs/2203.05482",
    base="ignored",
    streaming=Streaming.ELEMENTWISE,
    check=_weights_sum_to_zero,
)
def linear(inputs: Sequence[torch.Tensor], *, weight: PerModel[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average of the models (model soups).

    sum_i w_i x_i, divided by sum_i w_i when `normalize` (Wortsman et al., 2022). Computed as
    (sum_i n_i x_i) / (sum_i n_i or d) with w_i = n_i / d, so exact results stay exact.

    Args:
        weight: this model's weight
        normalize: divide by the sum of weights
    """
    nums, den = integer_weights(weight)
    out = torch.zeros_like(inputs[0], dtype=torch.float32)
    for x, n in zip(inputs, nums):
        out.add_(x, alpha=n)
    divisor = sum(nums) if normalize else den
    if divisor != 1:
        out.div_(divisor)
    return out
