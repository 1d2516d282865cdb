"""NearSwap (alchemonaut): take the other model's value where it is close to the base's."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import Streaming, merge_method


@merge_method(
    "nearswap",
    pretty="NearSwap",
    url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    inputs=(1, 1),
    streaming=Streaming.ELEMENTWISE,
    ranges={"t": (0, 1e6)},
)
def nearswap(base: torch.Tensor, inputs: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """Take the other model's value where it lies within t of the base's, move by t elsewhere.

    w * other + (1 - w) * base with w = clamp(t / max(|base - other|, 1e-6), 0, 1), elementwise (mergekit
    `nearswap`): elements that differ by at most t take the other model's value, larger differences move by t.

    Args:
        t: similarity threshold
    """
    a, b = base.float(), inputs[0].float()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a
