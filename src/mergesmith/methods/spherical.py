"""Interpolation on the hypersphere: slerp, nuslerp, multislerp and the Karcher mean, as pure kernels.

Scalar statistics (norms, dot products, angles) are computed in float64 so that they, and hence the coefficients,
are the same on every device and thread count; the elementwise combination is float32, rounded once by the caller.
Each kernel follows mergekit 0.1.5's formula (cited in each docstring) so recipes give mergekit's results.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def _norm(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    return torch.linalg.vector_norm(x.double(), dim=dim, keepdim=keepdim)


def _dot(a: torch.Tensor, b: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    if dim is None:
        return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())
    return (a.double() * b.double()).sum(dim=dim, keepdim=keepdim)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
          ) -> torch.Tensor:
    """Spherical linear interpolation of two whole tensors (Shoemake 1985; mergekit `slerp`).

    With a = v0/|v0|, b = v1/|v1| (a norm <= eps counts as 1), d = a.b clamped to [-1, 1] and theta = acos(d):
    slerp = sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1, applied to the un-normalized
    tensors; when |d| > dot_threshold (nearly collinear) it is the plain lerp (1-t) v0 + t v1.
    t = 0 gives v0, t = 1 gives v1.
    """
    na, nb = float(_norm(v0)), float(_norm(v1))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    d = max(-1.0, min(1.0, float(_dot(v0, v1)) / (na * nb)))
    if abs(d) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(d)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return _combine(v0, v1, ca, cb)


def _combine(v0: torch.Tensor, v1: torch.Tensor, ca: float, cb: float) -> torch.Tensor:
    """ca * v0 + cb * v1 in float32, with the endpoints exact (ca, cb in {0, 1})."""
    if cb == 0 and ca == 1:
        return v0.float().clone()
    if ca == 0 and cb == 1:
        return v1.float().clone()
    return torch.add(v0.float() * ca, v1.float(), alpha=cb)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False, flatten: bool = True,
            eps: float = 1e-8) -> torch.Tensor:
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
    na = _norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    nb = _norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (_dot(a, b, dim=-1, keepdim=True) / (na * nb)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    ca = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / torch.where(colinear, 1.0, s))
    cb = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / torch.where(colinear, 1.0, s))
    out = a * ca.float() + b * cb.float()
    if not flatten and row_wise and v0.dim() > 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: Optional[torch.Tensor] = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (Goddard's multislerp; mergekit `multislerp`).

    With x_i the tensors (minus `base` when given), u_i = x_i / (|x_i| + eps) and weights w_i (normalized to sum 1):
    m = normalize(sum w_i u_i); tangent vectors v_i = u_i - (u_i.m) m; v = sum w_i v_i; the result is
    (m cos|v|' + v sin|v|'/|v|') * sum_i w_i |x_i|, with |v|' = |v| + eps, plus `base`. One tensor returns itself;
    two tensors whose weighted unit mean vanishes fall back to the lerp.
    """
    if len(tensors) == 1:
        return tensors[0].float().clone()
    xs = [t.float() - base.float() if base is not None else t.float() for t in tensors]
    w = [float(x) for x in weights]
    if normalize_weights:
        s = sum(w)
        w = [x / s for x in w]
    norms = [float(_norm(x)) for x in xs]
    # the mean direction and projections are whole-tensor quantities: float64 scalars, float32 tensors
    mean = torch.zeros_like(xs[0])
    for x, n, wi in zip(xs, norms, w):
        mean.add_(x, alpha=wi / (n + eps))
    mean_norm = float(_norm(mean))
    if mean_norm < eps:
        if len(xs) == 2:
            res = xs[0] * w[0] + xs[1] * w[1]
            return res + base.float() if base is not None else res
        raise ValueError("the weighted sum of the unit tensors is zero (antipodal inputs with balancing weights)")
    mean.div_(mean_norm)
    dots = [float(_dot(x, mean)) / (n + eps) for x, n in zip(xs, norms)]
    # tangent = sum_i w_i (u_i - d_i m) = sum_i (w_i/(n_i+eps)) x_i - (sum_i w_i d_i) m
    tangent = torch.zeros_like(mean)
    for x, n, wi in zip(xs, norms, w):
        tangent.add_(x, alpha=wi / (n + eps))
    tangent.add_(mean, alpha=-sum(wi * d for wi, d in zip(w, dots)))
    tn = float(_norm(tangent)) + eps
    avg_norm = sum(n * wi for n, wi in zip(norms, w))
    res = mean.mul_(math.cos(tn) * avg_norm).add_(tangent, alpha=math.sin(tn) / tn * avg_norm)
    return res + base.float() if base is not None else res


def karcher(tensors: Sequence[torch.Tensor], alphas: Optional[Sequence[float]] = None, max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the directions, scaled by the weighted mean norm (mergekit `karcher`).

    Unit directions u_i = x_i/|x_i| (tensors with |x_i| <= tol are left out); start from the normalized weighted
    mean; repeat up to max_iter times: tangent T = sum_i a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m) over the
    u_i with theta_i = acos(m.u_i) >= tol; stop when |T| < tol; m <- normalize(cos|T| m + sin|T| T/|T|).
    Returns (sum_i a_i |x_i|) m. alphas default to 1/N each.
    """
    if len(tensors) == 1:
        return tensors[0].float().clone()
    alphas = list(alphas) if alphas is not None else [1.0 / len(tensors)] * len(tensors)
    xs = [t.float() for t in tensors]
    norms = [float(_norm(x)) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a_sum = sum(alphas[i] for i in valid)
    na = [alphas[i] / a_sum for i in valid]
    units = [xs[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for a, u in zip(na, units):
        mean.add_(u, alpha=a)
    mn = float(_norm(mean))
    mean = units[0].clone() if mn < tol else mean.div_(mn)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(na, units):
            d = max(-1.0, min(1.0, float(_dot(mean, u))))
            theta = math.acos(d)
            if theta < tol:
                continue
            c = a * theta / math.sin(theta)
            tangent.add_(u, alpha=c).add_(mean, alpha=-c * d)
        tn = float(_norm(tangent))
        if tn < tol:
            break
        mean = mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un = float(_norm(mean))
        if un > tol:
            mean.div_(un)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return mean.mul_(scale)
