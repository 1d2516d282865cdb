"""Karcher mean: the Riemannian (Frechet) mean of the models' directions.

The iteration is bounded: at most `max_iter` steps per tensor, each one pass over every input; it stops when the
tangent norm falls below max(tol, TOL_FLOOR), or when the tangent norm has not reached a new low for STALL steps
(float32 rounding then moves the mean about, not toward the goal). Both early stops, and reaching `max_iter`
without converging, are reported (execute gathers the reports into one warning per run).

Every iterate is a combination of the directions u_i, so a tensor in row blocks runs the same steps on the
coefficients of that combination: pass 1 sums the inputs' Gram matrix x_i.x_j over the blocks (float64), the
iteration takes the inner product <a, b> = a^T U b of the directions' Gram matrix U (float64 throughout, where
the whole tensor's iterate is float32), and pass 2 adds each block's inputs with the final coefficients. The stop
rule is the same (TOL_FLOOR included), so a tensor stops at the same tangent norm whatever its size; its steps
are those of the formula in float64, which the float32 iterate follows to its rounding.
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from mergesmith.methods import compiled
from mergesmith.methods.registry import Round, TwoPass, merge_method
from mergesmith.methods.sparsify import compiled_serves
from mergesmith.methods.spherical import dot64, gram64, norm64

# The mean is a float32 unit vector: rounding each element moves it by about 2^-24 / sqrt(3) = 3.4e-8 in norm,
# whatever its size, and the tangent sums N + 1 such vectors. Measured floors of the tangent norm on the tiny family
# are 2.5e-8 to 1.1e-7; 1e-6 stops with a tenfold margin above them, at an angle error far below any bf16 step.
TOL_FLOOR = 1e-6
STALL = 20  # steps without a new low of the tangent norm before the iteration is deemed at float32's floor

Dot = Callable[[torch.Tensor, torch.Tensor], float]
Space = Tuple[Dot, Callable[[torch.Tensor], float]]  # the inner product and norm the iteration measures with

# Whole tensors: the iterate is a float32 vector, its inner products float64 (dot64 looked up when called).
TENSORS: Space = (lambda a, b: float(dot64(a, b)), lambda v: float(norm64(v)))


def _tangent(
    mean: torch.Tensor, units: Sequence[torch.Tensor], weights: Sequence[float], tol: float, dot: Dot
) -> torch.Tensor:
    """sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) over the u_i at angle theta_i >= tol from m."""
    tangent = torch.zeros_like(mean)
    for a, u in zip(weights, units):
        d = max(-1.0, min(1.0, dot(mean, u)))
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
    space: Space,
) -> torch.Tensor:
    """Fixed-point steps m <- normalize(cos|T| m + sin|T| T/|T|) until |T| < max(tol, TOL_FLOOR), a stall, or
    max_iter steps."""
    dot, norm = space
    stop = max(tol, TOL_FLOOR)
    best, since = math.inf, 0
    for _ in range(max_iter):
        tangent = _tangent(mean, units, weights, tol, dot)
        tn = norm(tangent)
        if tn < stop:
            return mean
        best, since = (tn, 0) if tn < best else (best, since + 1)
        if since >= STALL:
            report(
                f"karcher: the tangent norm stopped falling above tol {stop:g} (rounding gets no closer); "
                f"iterations stopped after {STALL} steps without progress"
            )
            return mean
        mean = mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un = norm(mean)
        if un > tol:
            mean.div_(un)
    report(
        f"karcher: not converged in max_iter {max_iter} iterations (the tangent norm stayed above {stop:g}); "
        "the last iterate is used (raise max_iter to go on)"
    )
    return mean


def _start(
    units: List[torch.Tensor], weights: List[float], tol: float, norm: Callable[[torch.Tensor], float]
) -> torch.Tensor:
    """The normalized weighted mean of the directions (the first direction when that mean is ~0)."""
    mean = torch.zeros_like(units[0])
    for a, u in zip(weights, units):
        mean.add_(u, alpha=a)
    mn = norm(mean)
    return units[0].clone() if mn < tol else mean.div_(mn)


def _floor_note(tol: float) -> str:
    """The note for a tol below TOL_FLOOR (one wording, so a run gathers it into one warning)."""
    return (
        f"karcher: tol {tol:g} is below what float32 iterations reach; they stop once the tangent norm is "
        f"below {TOL_FLOOR:g}"
    )


class Coefficients(NamedTuple):
    """A tensor's mean as a combination of its inputs, out = sum_i weights[i] x_i, and the iteration's notes."""

    weights: List[float]
    notes: Tuple[str, ...]


def _gram_space(gram: torch.Tensor) -> Space:
    """Coefficient vectors c (standing for sum_i c_i u_i) measured by the directions' Gram matrix (float64)."""
    return (lambda a, b: float(a @ gram @ b), lambda v: math.sqrt(max(float(v @ gram @ v), 0.0)))


def _coefficients(stat: torch.Tensor, max_iter: int, tol: float) -> Coefficients:
    """The kernel's steps on the coefficients of the mean in the inputs' directions, from the inputs' Gram
    matrix `stat` (float64, whole tensor): norms |x_i| = sqrt(G_ii), directions' Gram matrix
    U_ij = G_ij / (|x_i| |x_j|), and the basis vectors e_i as the directions."""
    n = len(stat)
    alphas = [1.0 / n] * n
    norms = [math.sqrt(max(float(stat[i, i]), 0.0)) for i in range(n)]
    valid = [i for i, x in enumerate(norms) if x > tol]
    if not valid:
        return Coefficients([0.0] * n, ())
    notes = [_floor_note(tol)] if tol < TOL_FLOOR else []
    a_sum = sum(alphas[i] for i in valid)
    na = [alphas[i] / a_sum for i in valid]
    nv = torch.tensor([norms[i] for i in valid], dtype=torch.float64)
    space = _gram_space(stat[valid][:, valid] / torch.outer(nv, nv))
    basis = list(torch.eye(len(valid), dtype=torch.float64))
    mean = _iterate(_start(basis, na, tol, space[1]), basis, na, max_iter, tol, notes.append, space)
    scale = sum(a * x for a, x in zip(alphas, norms))
    weights = [0.0] * n
    for k, i in enumerate(valid):
        weights[i] = scale * float(mean[k]) / norms[i]
    return Coefficients(weights, tuple(notes))


def _add(total: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    """Fold a block's Gram matrix into the sum of the blocks before it."""
    return part if total is None else total + part


def _share(stat: Coefficients, k: int) -> Coefficients:
    """Every block gets the coefficients; the first also the notes (one report per tensor)."""
    return stat if k == 0 else stat._replace(notes=())


# Pass 1 adds the blocks' Gram matrices of the inputs (float64, in block order) and iterates on coefficients;
# pass 2 combines each block's inputs with them.
INPUTS_GRAM = TwoPass((Round(lambda inputs: gram64(inputs), _add, _coefficients),), share=_share)


def _combine(inputs: Sequence[torch.Tensor], stat: Coefficients, report: Callable[[str], None]) -> torch.Tensor:
    """sum_i weights[i] x_i, summed in float64 and rounded once to float32."""
    for note in stat.notes:
        report(note)
    if compiled.fused_multiply_add() and compiled_serves(inputs[0], inputs):
        return compiled.weighted_sum64(inputs, stat.weights)
    out = torch.zeros_like(inputs[0], dtype=torch.float64)
    for w, x in zip(stat.weights, inputs):
        if w:
            out.add_(x, alpha=w)
    return out.float()


@merge_method(
    "karcher",
    pretty="Karcher Mean",
    url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    base="input",
    ranges={"max_iter": (1, 100000), "tol": (0, 1)},
    streaming=INPUTS_GRAM,
)
def karcher(
    inputs: Sequence[torch.Tensor],
    report: Callable[[str], None],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    stat: Optional[Coefficients] = None,
) -> torch.Tensor:
    """Riemannian (Karcher) mean of the models' directions, scaled by their mean norm.

    mergekit `karcher`, equal weights a_i = 1/N: unit directions u_i = x_i/|x_i| (tensors with |x_i| <= tol are
    left out); start from the normalized weighted mean; repeat up to max_iter times: tangent
    T = sum_i a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m) over the u_i with theta_i = acos(m.u_i) >= tol; stop
    when |T| < max(tol, 1e-6) (float32 reaches no closer) or |T| has not reached a new low for 20 steps;
    m <- normalize(cos|T| m + sin|T| T/|T|). Returns (sum_i a_i |x_i|) m. A block of rows of a larger tensor gets
    the whole tensor's mean as coefficients of its inputs (`stat`, from the same steps on the inputs' Gram matrix).

    Args:
        max_iter: most fixed-point iterations per tensor
        tol: stop when the tangent norm is below this (at least 1e-6)
    """
    if len(inputs) == 1:
        return inputs[0].float().clone()
    if stat is not None:
        return _combine(inputs, stat, report)
    alphas = [1.0 / len(inputs)] * len(inputs)
    xs = [t.float() for t in inputs]
    norms = [float(norm64(x)) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    if tol < TOL_FLOOR:
        report(_floor_note(tol))
    a_sum = sum(alphas[i] for i in valid)
    na = [alphas[i] / a_sum for i in valid]
    units = [xs[i] / norms[i] for i in valid]
    mean = _iterate(_start(units, na, tol, TENSORS[1]), units, na, max_iter, tol, report, TENSORS)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return mean.mul_(scale)
