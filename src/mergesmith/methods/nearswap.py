"""NearSwap (alchemonaut): take the other model's value where it is close to the base's."""

from __future__ import annotations

import torch


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """w * other + (1 - w) * base with w = clamp(t / max(|base - other|, 1e-6), 0, 1), elementwise (mergekit
    `nearswap`): elements that differ by at most t take the other model's value, larger differences move by t."""
    a, b = base.float(), other.float()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a
