"""Karcher mean: the Riemannian (Frechet) mean of the models' directions."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergesmith.methods.registry import merge_method
from mergesmith.methods.spherical import dot64, norm64


@merge_method("karcher", pretty="Karcher Mean", url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean", base="input",
              ranges={"max_iter": (1, 1000), "tol": (0, 1)})
def karcher(inputs: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Riemannian (Karcher) mean of the models' directions, scaled by their mean norm.

    mergekit `karcher`, equal weights a_i = 1/N: unit directions u_i = x_i/|x_i| (tensors with |x_i| <= tol are
    left out); start from the normalized weighted mean; repeat up to max_iter times: tangent
    T = sum_i a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m) over the u_i with theta_i = acos(m.u_i) >= tol; stop
    when |T| < tol; m <- normalize(cos|T| m + sin|T| T/|T|). Returns (sum_i a_i |x_i|) m.

    Args:
        max_iter: most fixed-point iterations
        tol: stop when the tangent norm is below this
    """
    if len(inputs) == 1:
        return inputs[0].float().clone()
    alphas = [1.0 / len(inputs)] * len(inputs)
    xs = [t.float() for t in inputs]
    norms = [float(norm64(x)) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a_sum = sum(alphas[i] for i in valid)
    na = [alphas[i] / a_sum for i in valid]
    units = [xs[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for a, u in zip(na, units):
        mean.add_(u, alpha=a)
    mn = float(norm64(mean))
    mean = units[0].clone() if mn < tol else mean.div_(mn)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(na, units):
            d = max(-1.0, min(1.0, float(dot64(mean, u))))
            theta = math.acos(d)
            if theta < tol:
                continue
            c = a * theta / math.sin(theta)
            tangent.add_(u, alpha=c).add_(mean, alpha=-c * d)
        tn = float(norm64(tangent))
        if tn < tol:
            break
        mean = mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un = float(norm64(mean))
        if un > tol:
            mean.div_(un)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return mean.mul_(scale)
