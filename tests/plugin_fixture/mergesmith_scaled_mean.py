"""A merge method from outside mergesmith: the weighted mean of the models, times a factor."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods import PerModel, Streaming, merge_method


def _weights_not_zero(weight):
    if abs(sum(weight)) < 1e-12:
        return "weight", "the weights sum to 0; the mean needs a nonzero total"
    return None


@merge_method(
    "scaled_mean",
    pretty="Scaled mean",
    url="https://example.org/scaled-mean",
    base="ignored",
    streaming=Streaming.ELEMENTWISE,
    ranges={"factor": (0, None)},
    check=_weights_not_zero,
)
def scaled_mean(inputs: Sequence[torch.Tensor], *, weight: PerModel[float] = 1.0, factor: float = 1.0) -> torch.Tensor:
    """The weighted mean of the models, times a factor.

    Args:
        weight: this model's weight in the mean
        factor: multiply the mean by this
    """
    total = sum(weight)
    out = torch.zeros_like(inputs[0])
    for x, w in zip(inputs, weight):
        out.add_(x, alpha=w / total)
    return out * factor
