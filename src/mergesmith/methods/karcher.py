"""Karcher mean: the Riemannian (Frechet) mean of the models' directions.

The iteration is bounded: at most `max_iter` steps per tensor, each one pass over every input; it stops when the
tangent norm falls below max(tol, TOL_FLOOR), or when the tangent norm has not reached a new low for STALL steps
(float32 rounding then moves the mean about, not toward the goal). Both early stops, and reaching `max_iter`
without converging, are reported (execute gathers the reports into one warning per run).
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence

import torch

from mergesmith.methods.registry import merge_method
from mergesmith.methods.spherical import dot64, norm64

# The mean is a float32 unit vector: rounding each element moves it by about 2^-24 / sqrt(3) = 3.4e-8 in norm,
# whatever its size, and the tangent sums N + 1 such vectors. Measured floors of the tangent norm on the tiny family
# are 2.5e-8 to 1.1e-7; 1e-6 stops with a tenfold margin above them, at an angle error far below any bf16 step.
TOL_FLOOR = 1e-6
STALL = 20  # steps without a new low of the tangent norm before the iteration is deemed at float32's floor


def _tangent(mean: torch.Tensor, units: Sequence[torch.Tensor], weights: Sequence[float], tol: float) -> torch.Tensor:
    """sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) over the u_i at angle theta_i >= tol from m."""
    tangent = torch.zeros_like(mean)
    for a, u in zip(weights, units):
        d = max(-1.0, min(1.0, float(dot64(mean, u))))
        theta = math.acos(d)
        if theta < tol:
            continue
        c = a * theta / math.sin(theta)
        tangent.add_(u, alpha=c).add_(mean, alpha=-c * d)
    return tangent


def _iterate(
    mean: torch.Tensor,
    units: List[torch.Tensor],
    weights: List[float],
    max_iter: int,
    tol: float,
    report: Callable[[str], None],
) -> torch.Tensor:
    """Fixed-point steps m <- normalize(cos|T| m + sin|T| T/|T|) until |T| < max(tol, TOL_FLOOR), a stall, or
    max_iter steps."""
    stop = max(tol, TOL_FLOOR)
    best, since = math.inf, 0
    for _ in range(max_iter):
        tangent = _tangent(mean, units, weights, tol)
        tn = float(norm64(tangent))
        if tn < stop:
            return mean
        best, since = (tn, 0) if tn < best else (best, since + 1)
        if since >= STALL:
            report(
                f"karcher: the tangent norm stopped falling above tol {stop:g} (float32 rounding gets no closer); "
                f"iterations stopped after {STALL} steps without progress"
            )
            return mean
        mean = mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un = float(norm64(mean))
        if un > tol:
            mean.div_(un)
    report(
        f"karcher: not converged in max_iter {max_iter} iterations (the tangent norm stayed above {stop:g}); "
        "the last iterate is used (raise max_iter to go on)"
    )
    return mean


def _start(units: List[torch.Tensor], weights: List[float], tol: float) -> torch.Tensor:
    """The normalized weighted mean of the directions (the first direction when that mean is ~0)."""
    mean = torch.zeros_like(units[0])
    for a, u in zip(weights, units):
        mean.add_(u, alpha=a)
    mn = float(norm64(mean))
    return units[0].clone() if mn < tol else mean.div_(mn)


@merge_method(
    "karcher",
    pretty="Karcher Mean",
    url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    base="input",
    ranges={"max_iter": (1, 100000), "tol": (0, 1)},
)
def karcher(
    inputs: Sequence[torch.Tensor], report: Callable[[str], None], *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Riemannian (Karcher) mean of the models' directions, scaled by their mean norm.

    mergekit `karcher`, equal weights a_i = 1/N: unit directions u_i = x_i/|x_i| (tensors with |x_i| <= tol are
    left out); start from the normalized weighted mean; repeat up to max_iter times: tangent
    T = sum_i a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m) over the u_i with theta_i = acos(m.u_i) >= tol; stop
    when |T| < max(tol, 1e-6) (float32 reaches no closer) or |T| has not reached a new low for 20 steps;
    m <- normalize(cos|T| m + sin|T| T/|T|). Returns (sum_i a_i |x_i|) m.

    Args:
        max_iter: most fixed-point iterations per tensor
        tol: stop when the tangent norm is below this (at least 1e-6)
    """
    if len(inputs) == 1:
        return inputs[0].float().clone()
    alphas = [1.0 / len(inputs)] * len(inputs)
    xs = [t.float() for t in inputs]
    norms = [float(norm64(x)) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    if tol < TOL_FLOOR:
        report(
            f"karcher: tol {tol:g} is below what float32 iterations reach; they stop once the tangent norm is "
            f"below {TOL_FLOOR:g}"
        )
    a_sum = sum(alphas[i] for i in valid)
    na = [alphas[i] / a_sum for i in valid]
    units = [xs[i] / norms[i] for i in valid]
    mean = _iterate(_start(units, na, tol), units, na, max_iter, tol, report)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return mean.mul_(scale)
