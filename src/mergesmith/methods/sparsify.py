"""Sparsification of task vectors (pure functions, float32 in, float32 out).

Each takes one model's delta (`finetuned - base`) and returns it with some elements zeroed, optionally rescaled.
Ties in magnitude are broken by element index (stable sorts), so results never depend on the device or the sort
implementation. Random masks use `rng.uniform` keyed per (seed, model, tensor): element i is kept when
u_i < p_i, which is a Bernoulli(p_i) draw that does not depend on processing order.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergesmith.methods.rng import uniform_like


def rescale_l1(delta: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals `delta`'s (mergekit's `rescale: true`); unchanged if either is ~0."""
    before = delta.abs().sum(dtype=torch.float64)
    after = masked.abs().sum(dtype=torch.float64)
    if before < eps or after < eps:
        return masked
    return masked * (before / after).to(masked.dtype)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: keep the k = max(1, floor(density * n)) largest-magnitude elements."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    mask = torch.zeros_like(flat)
    mask[order] = 1
    out = (flat * mask).reshape_as(delta)
    return rescale_l1(delta, out) if rescale else out


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the top `gamma` fraction by magnitude, then the smallest, keeping floor(density*n).

    When density + gamma > 1, fewer outliers are dropped so that floor(density * n) elements remain.
    """
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(flat.abs(), descending=False, stable=True).indices
    mask = torch.zeros_like(flat)
    mask[order[n_bot:n_bot + target]] = 1
    out = (flat * mask).reshape_as(delta)
    return rescale_l1(delta, out) if rescale else out


def bernoulli(delta: torch.Tensor, density: float, key: int, rescale: bool = True,
              rescale_mode: str = "l1") -> torch.Tensor:
    """DARE: keep each element with probability `density`; rescale by L1 match (mergekit) or by 1/density."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    u = uniform_like(key, delta.shape if delta.dim() else torch.Size([1]), device=delta.device).reshape(delta.shape)
    out = torch.where(u < density, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if not rescale:
        return out
    if rescale_mode == "inverse_prob":
        return out / density
    return rescale_l1(delta, out)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float,
                             rank_scope: str = "row") -> torch.Tensor:
    """DELLA MagPrune keep probabilities, shaped like `delta` viewed as 2-D rows.

    Magnitudes are ranked (ascending, ties by index) within each row (`rank_scope="row"`, mergekit) or over the
    whole tensor (`"tensor"`, the paper); rank r in 0..n-1 maps linearly to p = density - epsilon + 2 epsilon r/(n-1),
    so the smallest magnitude is kept with density - epsilon and the largest with density + epsilon. A row of one
    element gets p = density.
    """
    rows = delta.reshape(1, -1) if (delta.dim() < 2 or rank_scope == "tensor") else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=rows.device).expand_as(order))
    if n > 1:
        rank_norm = ranks.to(torch.float32) / (n - 1)
    else:
        rank_norm = torch.full(rows.shape, 0.5, dtype=torch.float32, device=rows.device)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, key: int, rescale: bool = True,
                   rescale_mode: str = "l1", rank_scope: str = "row") -> torch.Tensor:
    """DELLA MagPrune: keep elements with rank-based probabilities, then rescale.

    `rescale_mode="l1"` (mergekit) scales the kept elements so the tensor's L1 norm is unchanged;
    `"inverse_prob"` (the paper) divides each kept element by its own keep probability.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    p = della_keep_probabilities(delta, density, epsilon, rank_scope)
    u = uniform_like(key, p.shape, device=delta.device)
    flat = delta.reshape(p.shape)
    keep = u < p
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    if rescale and rescale_mode == "inverse_prob":
        out = torch.where(keep, flat / p, zero)
    else:
        out = torch.where(keep, flat, zero)
        if rescale:
            out = rescale_l1(flat, out)
    return out.reshape(delta.shape)


def sign_consensus(weighted: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election over stacked weighted deltas [N, ...]: mask of elements agreeing with the majority sign.

    "sum" elects the sign of the summed weighted deltas, "count" the sign held by more models (ties go to +).
    Zero elements never agree.
    """
    sign = weighted.sign()
    if method == "sum":
        majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    elif method == "count":
        majority = torch.where(sign.sum(dim=0) >= 0, 1.0, -1.0)
    else:
        raise ValueError(method)
    return sign == majority.to(sign.dtype)


def sparsify(delta: torch.Tensor, method: Optional[str], density: float, key: int = 0, rescale: bool = False,
             epsilon: float = 0.15, gamma: float = 0.01, rescale_mode: str = "l1",
             rank_scope: str = "row") -> torch.Tensor:
    """Dispatch to one of the sparsifiers above by mergekit's name for it."""
    if method is None:
        return delta
    if method == "magnitude":
        return magnitude(delta, density, rescale)
    if method == "random":
        return bernoulli(delta, density, key, rescale, rescale_mode)
    if method == "magnitude_outliers":
        return magnitude_outliers(delta, density, gamma, rescale)
    if method == "della_magprune":
        return della_magprune(delta, density, epsilon, key, rescale, rescale_mode, rank_scope)
    raise ValueError(f"unknown sparsification {method}")
