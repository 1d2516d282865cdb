"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from mergesmith.methods.registry import PerModel, Range, merge_method
from mergesmith.methods.spherical import dot64, norm64


def _weights_sum_to_zero(weight, normalize_weights):
    if normalize_weights and abs(sum(weight)) < 1e-12:
        return "weight", (
            "the weights sum to 0, so normalize_weights cannot divide by them; set "
            "normalize_weights: false or change the weights"
        )
    return None


@merge_method(
    "multislerp",
    pretty="Multi-SLERP",
    url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    base="optional",
    check=_weights_sum_to_zero,
    ranges={"weight": Range(0, None, extrapolate=True), "eps": (0, 1e-2)},
)
def multislerp(
    base: Optional[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    weight: PerModel[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation of any number of models on the hypersphere (optionally around a base).

    Goddard's multislerp (mergekit `multislerp`). With x_i the tensors (minus `base` when given),
    u_i = x_i / (|x_i| + eps) and weights w_i (normalized to sum 1): m = normalize(sum w_i u_i); tangent vectors
    v_i = u_i - (u_i.m) m; v = sum w_i v_i; the result is (m cos|v|' + v sin|v|'/|v|') * sum_i w_i |x_i|, with
    |v|' = |v| + eps, plus `base`. One tensor returns itself; two tensors whose weighted unit mean vanishes fall
    back to the lerp.

    Args:
        weight: this model's weight
        normalize_weights: divide the weights by their sum
        eps: numerical floor for norms
    """
    if len(inputs) == 1:
        return inputs[0].float().clone()
    xs = [t.float() - base.float() if base is not None else t.float() for t in inputs]
    w = [float(x) for x in weight]
    if normalize_weights:
        s = sum(w)
        w = [x / s for x in w]
    norms = [float(norm64(x)) for x in xs]
    # the mean direction and projections are whole-tensor quantities: float64 scalars, float32 tensors
    mean = torch.zeros_like(xs[0])
    for x, n, wi in zip(xs, norms, w):
        mean.add_(x, alpha=wi / (n + eps))
    mean_norm = float(norm64(mean))
    if mean_norm < eps:
        if len(xs) == 2:
            res = xs[0] * w[0] + xs[1] * w[1]
            return res + base.float() if base is not None else res
        raise ValueError("the weighted sum of the unit tensors is zero (antipodal inputs with balancing weights)")
    mean.div_(mean_norm)
    dots = [float(dot64(x, mean)) / (n + eps) for x, n in zip(xs, norms)]
    # tangent = sum_i w_i (u_i - d_i m) = sum_i (w_i/(n_i+eps)) x_i - (sum_i w_i d_i) m
    tangent = torch.zeros_like(mean)
    for x, n, wi in zip(xs, norms, w):
        tangent.add_(x, alpha=wi / (n + eps))
    tangent.add_(mean, alpha=-sum(wi * d for wi, d in zip(w, dots)))
    tn = float(norm64(tangent)) + eps
    avg_norm = sum(n * wi for n, wi in zip(norms, w))
    res = mean.mul_(math.cos(tn) * avg_norm).add_(tangent, alpha=math.sin(tn) / tn * avg_norm)
    return res + base.float() if base is not None else res
