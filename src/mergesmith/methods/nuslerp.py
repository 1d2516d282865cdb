"""NuSLERP: mergekit's "new" slerp of two models, or of their task vectors around a base."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergesmith.methods.registry import PerModel, Range, merge_method
from mergesmith.methods.spherical import dot64, norm64


def slerp_vectors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """mergekit's `nuslerp` kernel: slerp of whole tensors (`flatten`), or of each row vector (the last dimension),
    or with `row_wise` of each column (dimension 0).

    Vectors are normalized with their norm clamped to >= 1e-7; when 1 - cos^2 <= eps^2 (collinear) the result is
    the lerp (1-t) v0 + t v1, else (sin((1-t) theta) v0 + sin(t theta) v1) / sin(theta).
    """
    shape = v0.shape
    a, b = v0.float(), v1.float()
    if flatten:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif a.dim() == 1:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    na = norm64(a, dim=-1, keepdim=True).clamp(min=1e-7)
    nb = norm64(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (dot64(a, b, dim=-1, keepdim=True) / (na * nb)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    ca = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / torch.where(colinear, 1.0, s))
    cb = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / torch.where(colinear, 1.0, s))
    out = a * ca.float() + b * cb.float()
    if not flatten and row_wise and v0.dim() > 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method(
    "nuslerp",
    pretty="NuSLERP",
    url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    base="optional",
    inputs=(2, 2),
    ranges={"weight": Range(0, None, extrapolate=True)},
)
def nuslerp(
    base: Optional[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    weight: PerModel[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """Slerp of two models (or of their task vectors when a base is given) by relative weight.

    t = w_2 / (w_1 + w_2) (0.5 when the sum is within 1e-6 of 0).

    Args:
        weight: this model's relative weight (t = w2 / (w1 + w2))
        nuslerp_flatten: slerp whole tensors (false: row vectors)
        nuslerp_row_wise: when not flattened, slerp columns instead of rows
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return slerp_vectors(t, inputs[0], inputs[1], row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    b = base.float()
    return b + slerp_vectors(
        t, inputs[0].float() - b, inputs[1].float() - b, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten
    )
