"""NuSLERP: mergekit's "new" slerp of two models, or of their task vectors around a base."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from mergesmith.methods.registry import PerModel, Range, Round, Streaming, TwoPass, merge_method
from mergesmith.methods.spherical import add_sums, dot64, gram64, sq64, whole_statistic

Coefficients = Tuple[torch.Tensor, torch.Tensor]  # (ca, cb): float64, one per vector, shape (..., 1)


def _vectors(x: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """x arranged so that the vectors slerped are its last dimension: one row when flattened (or 1-D), the rows
    themselves, or with `row_wise` the columns (dimension 0 swapped to the end)."""
    if flatten or x.dim() == 1:
        return x.reshape(1, -1)
    return x.transpose(0, -1) if row_wise else x


def vector_coefficients(
    t: float, na: torch.Tensor, nb: torch.Tensor, dot: torch.Tensor, eps: float = 1e-8
) -> Coefficients:
    """Per vector (ca, cb) of ca v0 + cb v1, from the float64 norms and dot products (shape (..., 1)).

    Norms are clamped to >= 1e-7; when 1 - cos^2 <= eps^2 (collinear) (ca, cb) = (1-t, t), else
    (sin((1-t) theta), sin(t theta)) / sin(theta)."""
    na, nb = na.clamp(min=1e-7), nb.clamp(min=1e-7)
    cos = (dot / (na * nb)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    ca = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / torch.where(colinear, 1.0, s))
    cb = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / torch.where(colinear, 1.0, s))
    return ca, cb


def slerp_vectors(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
    coef: Optional[Coefficients] = None,
) -> torch.Tensor:
    """mergekit's `nuslerp` kernel: slerp of whole tensors (`flatten`), or of each row vector (the last dimension),
    or with `row_wise` of each column (dimension 0).

    Vectors are normalized with their norm clamped to >= 1e-7; when 1 - cos^2 <= eps^2 (collinear) the result is
    the lerp (1-t) v0 + t v1, else (sin((1-t) theta) v0 + sin(t theta) v1) / sin(theta). `coef`: the
    coefficients when they come from a larger tensor than v0 (its row blocks).
    """
    shape = v0.shape
    a, b = _vectors(v0.float(), row_wise, flatten), _vectors(v1.float(), row_wise, flatten)
    if coef is None:
        s00, s11, s01 = _vector_sums(a, b, whole=flatten or v0.dim() == 1)
        coef = vector_coefficients(t, s00.sqrt(), s11.sqrt(), s01, eps)
    ca, cb = coef
    out = a * ca.float() + b * cb.float()
    if not flatten and row_wise and v0.dim() > 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def _position(weight: Sequence[float]) -> float:
    """t = w_2 / (w_1 + w_2), 0.5 when the sum is within 1e-6 of 0."""
    total = weight[0] + weight[1]
    return 0.5 if abs(total) < 1e-6 else weight[1] / total


def _endpoints(base: Optional[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two tensors slerped: the models, or their task vectors x_i - base."""
    if base is None:
        return inputs[0], inputs[1]
    b = base.float()
    return inputs[0].float() - b, inputs[1].float() - b


def _vector_sums(a: torch.Tensor, b: torch.Tensor, whole: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 sums of a^2, b^2 and a b along the last dimension (shape (..., 1)); a `whole` tensor (one vector) in
    one pass of gram64. Rows and columns are summed each on its own, whatever the block they are in."""
    if whole:
        g = gram64([a, b]).to(a.device)
        return g[0, 0].reshape(1, 1), g[1, 1].reshape(1, 1), g[0, 1].reshape(1, 1)
    return sq64(a, dim=-1, keepdim=True), sq64(b, dim=-1, keepdim=True), dot64(a, b, dim=-1, keepdim=True)


def _sums(base, inputs, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False):
    """A block's float64 sums of v0^2, v1^2 and v0 v1 per slerped vector (shape (..., 1))."""
    v0, v1 = _endpoints(base, inputs)
    a, b = _vectors(v0, nuslerp_row_wise, nuslerp_flatten), _vectors(v1, nuslerp_row_wise, nuslerp_flatten)
    return _vector_sums(a, b, whole=nuslerp_flatten or v0.dim() == 1)


def _finish(stat, weight: Sequence[float]) -> Coefficients:
    """The coefficients of the whole tensor (or of each column) from its sums."""
    s00, s11, s01 = stat
    return vector_coefficients(_position(weight), s00.sqrt(), s11.sqrt(), s01)


# Whole tensors and columns span every row block: pass 1 sums their norms and dot products over the blocks.
SUMS = TwoPass((Round(_sums, add_sums, _finish),), share=whole_statistic)


def _streaming(nuslerp_flatten: bool, nuslerp_row_wise: bool):
    """Row vectors are slerped within a block (same bytes for any split); whole tensors and columns need SUMS."""
    return Streaming.ROWS if not nuslerp_flatten and not nuslerp_row_wise else SUMS


@merge_method(
    "nuslerp",
    pretty="NuSLERP",
    url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    base="optional",
    inputs=(2, 2),
    ranges={"weight": Range(0, None, extrapolate=True)},
    streaming=_streaming,
)
def nuslerp(
    base: Optional[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    weight: PerModel[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    stat: Optional[Coefficients] = None,
) -> torch.Tensor:
    """Slerp of two models (or of their task vectors when a base is given) by relative weight.

    t = w_2 / (w_1 + w_2) (0.5 when the sum is within 1e-6 of 0). A block of rows of a larger tensor takes
    `stat`, the whole tensor's (or its columns') coefficients.

    Args:
        weight: this model's relative weight (t = w2 / (w1 + w2))
        nuslerp_flatten: slerp whole tensors (false: row vectors)
        nuslerp_row_wise: when not flattened, slerp columns instead of rows
    """
    v0, v1 = _endpoints(base, inputs)
    out = slerp_vectors(_position(weight), v0, v1, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten, coef=stat)
    return out if base is None else base.float() + out
