"""Linear (weighted average) merging: a pure kernel."""

from __future__ import annotations

from typing import Sequence

import torch


def linear(inputs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize` (Wortsman et al., 2022, "model soups")."""
    out = torch.zeros_like(inputs[0], dtype=torch.float32)
    for x, w in zip(inputs, weights):
        out.add_(x, alpha=float(w))
    if normalize:
        out.div_(float(sum(weights)))
    return out
