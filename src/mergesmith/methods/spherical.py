"""Geometry shared by the spherical methods (slerp, nuslerp, multislerp, karcher).

Scalar statistics (norms, dot products, angles) are computed in float64 so that they, and hence the coefficients,
are the same on every device and thread count; the elementwise combination is float32, rounded once by the caller.
Each kernel follows mergekit 0.1.5's formula (cited in each docstring) so recipes give mergekit's results.
"""

from __future__ import annotations

import torch


def norm64(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    return torch.linalg.vector_norm(x.double(), dim=dim, keepdim=keepdim)


def dot64(a: torch.Tensor, b: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    if dim is None:
        return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())
    return (a.double() * b.double()).sum(dim=dim, keepdim=keepdim)


def combine(v0: torch.Tensor, v1: torch.Tensor, ca: float, cb: float) -> torch.Tensor:
    """ca * v0 + cb * v1 in float32, with the endpoints exact (ca, cb in {0, 1})."""
    if cb == 0 and ca == 1:
        return v0.float().clone()
    if ca == 0 and cb == 1:
        return v1.float().clone()
    return torch.add(v0.float() * ca, v1.float(), alpha=cb)
