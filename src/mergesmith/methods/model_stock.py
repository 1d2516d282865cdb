"""Model Stock (Jang et al., 2024): interpolate between the base and the fine-tunes' average by their angle."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import merge_method


@merge_method("model_stock", pretty="Model Stock", url="https://arxiv.org/abs/2403.19522", inputs=(2, None))
def model_stock(base: torch.Tensor, inputs: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Interpolate from the base toward the fine-tunes' average by the angle between their deltas.

    t * mean(w_i) + (1 - t) * w_0 with t = N cos / (1 + (N - 1) cos) (mergekit `model_stock`).

    cos is the mean over pairs of the cosine between the fine-tunes' offsets w_i - w_0 (norm products clamped to
    >= 1e-6, cosines to [-1, 1]); over the whole tensor, or per row with `filter_wise`. Where 1 + (N-1) cos is
    within 1e-6 of 0, t = 0 (the base). Needs N >= 2 fine-tunes.

    Args:
        filter_wise: one ratio per row instead of per tensor
    """
    shape = base.shape
    w0 = base.float()
    ws = [x.float() for x in inputs]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o.double(), dim=-1) for o in offsets]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i].double() * offsets[j].double()).sum(dim=-1)
            cos.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    avg = torch.stack(ws).sum(dim=0) / n
    t = t.float()
    return (t * avg + (1 - t) * w0).reshape(shape)
