"""Geometry shared by the spherical methods (slerp, nuslerp, multislerp, karcher).

Scalar statistics (norms, dot products, angles) are computed in float64, whole tensors' sums of squares and
products by gram64 (chunk sums added exactly: the same on any thread count; the compiled pass and torch's sum differ
in the order within a chunk, i.e. in the last bits of the float64 sums, which the float32 coefficients rarely
show); the elementwise combination is float32, rounded once by the caller.
A tensor in row blocks gathers them as float64 sums of squares and products per block, folded in block order
(`add_sums`), so its coefficients differ from the whole tensor's only by the order of the float64 additions.
Each kernel follows mergekit 0.1.5's formula (cited in each docstring) so recipes give mergekit's results.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from mergesmith.methods import compiled

GRAM_CHUNK = 1 << 12  # elements per partial sum of gram64


def norm64(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm in float64, of all elements (the square root of sq64) or along `dim`."""
    if dim is None:
        return sq64(x).sqrt()
    return torch.linalg.vector_norm(x.double(), dim=dim, keepdim=keepdim)


def dot64(a: torch.Tensor, b: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Dot product in float64, of all elements (as gram64) or along `dim`."""
    if dim is None:
        return gram64([a, b])[0, 1]
    return (a.double() * b.double()).sum(dim=dim, keepdim=keepdim)


def sq64(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Sum of squares in float64, of all elements (as gram64) or along `dim`."""
    if dim is None:
        return gram64([x])[0, 0]
    return x.double().square().sum(dim=dim, keepdim=keepdim)


def add_sums(total, part):
    """Fold a block's partial float64 sums (a tuple of floats or float64 tensors) into the running total."""
    return part if total is None else tuple(a + b for a, b in zip(total, part))


def whole_statistic(stat, k: int):
    """Every block's share of a statistic of the whole tensor: all of it (coefficients, not per-element state)."""
    return stat


def gram64(xs: Sequence[torch.Tensor], base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The n x n float64 Gram matrix sum(x_i * x_j) of equally shaped tensors (a block's share of a whole tensor's),
    or of the float32 differences x_i - base where a base is given.

    Products are float64; each chunk of GRAM_CHUNK elements is summed on its own and the chunk sums are added
    exactly (math.fsum), so no sum depends on how the work is split between threads. CPU tensors all float32 or all
    bfloat16 (as stored): in one compiled pass (its chunk sums in eight fixed lanes) that takes the differences
    itself."""
    if compiled.stored(*xs, base):
        parts = compiled.gram_chunks(xs, GRAM_CHUNK, base)
        g = torch.zeros(len(xs), len(xs), dtype=torch.float64)
        pairs = [(i, j) for i in range(len(xs)) for j in range(i, len(xs))]
        for p, (i, j) in enumerate(pairs):
            g[i, j] = g[j, i] = math.fsum(parts[:, p].tolist())
        return g
    flat = [(x.float() - base.float() if base is not None else x).reshape(-1).double() for x in xs]
    m = flat[0].numel()
    whole = m - m % GRAM_CHUNK
    buf = torch.empty_like(flat[0])
    g = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for i in range(len(flat)):
        for j in range(i, len(flat)):
            torch.mul(flat[i], flat[j], out=buf)
            parts = buf[:whole].view(-1, GRAM_CHUNK).sum(dim=-1).tolist() + [float(buf[whole:].sum())]
            g[i, j] = g[j, i] = math.fsum(parts)
    return g


def combine(v0: torch.Tensor, v1: torch.Tensor, ca: float, cb: float) -> torch.Tensor:
    """ca * v0 + cb * v1 in float32, with the endpoints exact (ca, cb in {0, 1})."""
    if cb == 0 and ca == 1:
        return v0.float().clone()
    if ca == 0 and cb == 1:
        return v1.float().clone()
    return torch.add(v0.float() * ca, v1.float(), alpha=cb)
