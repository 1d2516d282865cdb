"""Model Stock (Jang et al., 2024): interpolate between the base and the fine-tunes' average by their angle."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from mergesmith.methods import compiled
from mergesmith.methods.registry import Round, Streaming, TwoPass, merge_method
from mergesmith.methods.sparsify import compiled_serves
from mergesmith.methods.spherical import gram64


def _ratio(dot: Callable[[int, int], torch.Tensor], norms: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """t = N c / (1 + (N - 1) c), c the mean pairwise cosine of the N offsets (float64, one per row of dot's
    values, as a column); t = 0 where the denominator is within 1e-6 of 0."""
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append((dot(i, j) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))


def _offsets_gram(base: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """This block's share of the offsets' Gram matrix sum((w_i - w_0)(w_j - w_0)), float64."""
    if compiled_serves(base, inputs, stored=True):
        return gram64(inputs, base=base)
    return gram64([x.float() for x in inputs], base=base.float())


def _gram_ratio(stat: torch.Tensor) -> torch.Tensor:
    """The whole tensor's t (a 1 x 1 float64 tensor) from its offsets' Gram matrix."""
    norms = [stat[i, i].sqrt().reshape(1) for i in range(len(stat))]
    return _ratio(lambda i, j: stat[i, j].reshape(1), norms, len(stat))


def _add(total: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    """Fold a block's Gram matrix into the sum of the blocks before it."""
    return part if total is None else total + part


# One t per tensor from the angles between its offsets: pass 1 adds the blocks' Gram matrices (float64, in block
# order), pass 2 interpolates each block with the whole tensor's t.
# Both take bfloat16 blocks as stored (the compiled kernels widen them where they read them).
OFFSETS_GRAM = TwoPass(
    (Round(_offsets_gram, _add, _gram_ratio),), share=lambda stat, k: stat, stored_inputs=True, stored_merge=True
)


@merge_method(
    "model_stock",
    pretty="Model Stock",
    url="https://arxiv.org/abs/2403.19522",
    inputs=(2, None),
    streaming=lambda filter_wise: Streaming.ROWS if filter_wise else OFFSETS_GRAM,
)
def model_stock(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    *,
    filter_wise: bool = False,
    stat: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Interpolate from the base toward the fine-tunes' average by the angle between their deltas.

    t * mean(w_i) + (1 - t) * w_0 with t = N cos / (1 + (N - 1) cos) (mergekit `model_stock`).

    cos is the mean over pairs of the cosine between the fine-tunes' offsets w_i - w_0 (norm products clamped to
    >= 1e-6, cosines to [-1, 1]); over the whole tensor, or per row with `filter_wise`. Where 1 + (N-1) cos is
    within 1e-6 of 0, t = 0 (the base). Needs N >= 2 fine-tunes. A block of rows of a larger tensor gets the whole
    tensor's t as `stat` (from the offsets' Gram matrix summed over the blocks).

    Args:
        filter_wise: one ratio per row instead of per tensor
    """
    if stat is None:
        stat = _angle_ratio(base, inputs, filter_wise)
    if not filter_wise and len(inputs) <= compiled.IN_ORDER and compiled_serves(base, inputs, stored=True):
        return compiled.stock_merge(inputs, base, float(stat.float()))
    w0, ws = _rows(base, inputs, filter_wise)
    avg = torch.stack(ws).sum(dim=0) / len(ws)
    t = stat.to(w0.device).float()
    return (t * avg + (1 - t) * w0).reshape(base.shape)


def _rows(base: torch.Tensor, inputs: Sequence[torch.Tensor], filter_wise: bool):
    """base and inputs in float32 as rows: each row its own (filter_wise), or the whole tensor as one."""
    w0, ws = base.float(), [x.float() for x in inputs]
    if filter_wise:
        if w0.dim() == 1:
            return w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        return w0, ws
    return w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]


def _angle_ratio(base: torch.Tensor, inputs: Sequence[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """t of each row of _rows (a column, float64) from the offsets' angles."""
    w0, ws = _rows(base, inputs, filter_wise)
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o.double(), dim=-1) for o in offsets]
    return _ratio(lambda i, j: (offsets[i].double() * offsets[j].double()).sum(dim=-1), norms, len(ws))
