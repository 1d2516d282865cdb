"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from mergesmith.methods import compiled, sparsify
from mergesmith.methods.registry import PerModel, Range, Round, TwoPass, merge_method
from mergesmith.methods.spherical import add_sums, dot64, norm64, sq64, whole_statistic


def _weights_sum_to_zero(weight, normalize_weights):
    if normalize_weights and abs(sum(weight)) < 1e-12:
        return "weight", (
            "the weights sum to 0, so normalize_weights cannot divide by them; set "
            "normalize_weights: false or change the weights"
        )
    return None


@dataclass(frozen=True)
class Sphere:
    """The whole tensor's float64 scalars, filled in one at a time: the weights, the norms |x_i|, the norm of the
    weighted unit sum, the mean's weighted projection sum_i w_i (u_i . m), and |v| + eps. `acc`: the current
    round's sums, folded block by block."""

    w: Tuple[float, ...]
    norms: Tuple[float, ...]
    eps: float
    mean_norm: float = 0.0
    along: float = 0.0
    tn: float = 0.0
    acc: Optional[tuple] = None

    @property
    def scales(self) -> List[float]:
        """w_i / (|x_i| + eps): u_i's weight, as a factor of x_i."""
        return [wi / (n + self.eps) for n, wi in zip(self.norms, self.w)]

    @property
    def lerp(self) -> bool:
        """The weighted unit sum vanishes: two models take the lerp (a third is refused by `with_mean_norm`)."""
        return self.mean_norm < self.eps

    def with_mean_norm(self, mean_norm: float) -> "Sphere":
        """With |sum_i w_i u_i|; refuses more than two models whose weighted unit sum vanishes (mergekit)."""
        if mean_norm < self.eps and len(self.w) > 2:
            raise ValueError("the weighted sum of the unit tensors is zero (antipodal inputs with balancing weights)")
        return replace(self, mean_norm=mean_norm, acc=None)

    def with_dots(self, dots: Sequence[float]) -> "Sphere":
        """`along` from the float64 dot products x_i . m."""
        d = [dot / (n + self.eps) for dot, n in zip(dots, self.norms)]
        return replace(self, along=sum(wi * di for wi, di in zip(self.w, d)), acc=None)


def _deltas(base: Optional[torch.Tensor], inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """x_i as the sums take them: the models (bfloat16 as stored where the compiled kernels widen it themselves), or
    their float32 task vectors around the base (from bfloat16 as stored in one compiled pass)."""
    if base is None:
        return list(inputs) if compiled.stored(*inputs) else [t.float() for t in inputs]
    return [d if (d := compiled.delta(t, base)) is not None else t.float() - base.float() for t in inputs]


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 (bfloat16 widened in one compiled pass on the CPU)."""
    widened = compiled.widen(x)
    return widened[0] if widened is not None else x.float()


def _sphere(weight: Sequence[float], normalize_weights: bool, eps: float, norms: Sequence[float]) -> Sphere:
    """The weights (divided by their sum with `normalize_weights`) and the norms |x_i|."""
    w = [float(x) for x in weight]
    if normalize_weights:
        s = sum(w)
        w = [x / s for x in w]
    return Sphere(tuple(w), tuple(norms), eps)


def _unit_sum(xs: Sequence[torch.Tensor], sph: Sphere) -> torch.Tensor:
    """sum_i w_i u_i in float32, added in model order (in one compiled pass where it gives torch's bits)."""
    if compiled.fused_multiply_add() and sparsify.numpy_path(xs[0]) and compiled.stored(*xs) and xs[0].numel():
        return compiled.weighted_sum32(xs, sph.scales)
    out = torch.zeros(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for x, s in zip(xs, sph.scales):
        out.add_(x.float(), alpha=s)
    return out


def _mean_and_tangent(xs: Sequence[torch.Tensor], sph: Sphere) -> Tuple[torch.Tensor, torch.Tensor]:
    """m = sum_i w_i u_i / |sum_i w_i u_i| and v = sum_i w_i (u_i - d_i m) = sum_i w_i u_i - (sum_i w_i d_i) m."""
    total = _unit_sum(xs, sph)
    mean = total / sph.mean_norm
    return mean, total.add_(mean, alpha=-sph.along)


def _exp_map(mean: torch.Tensor, tangent: torch.Tensor, sph: Sphere) -> torch.Tensor:
    """(m cos|v|' + v sin|v|'/|v|') * sum_i w_i |x_i|, in place in `mean`."""
    avg_norm = sum(n * wi for n, wi in zip(sph.norms, sph.w))
    return mean.mul_(math.cos(sph.tn) * avg_norm).add_(tangent, alpha=math.sin(sph.tn) / sph.tn * avg_norm)


# A large tensor's scalars come from four reads of its row blocks, each needing the one before: the norms, the
# norm of the weighted unit sum, the dots with the mean, the tangent's norm. Pass 2 then combines each block.
def _norm_sums(base, inputs):
    """Round 1: a block's sums of x_i^2."""
    return tuple(float(sq64(x)) for x in _deltas(base, inputs))


def _mean_sums(base, inputs, stat: Sphere):
    """Round 2: a block's sum of (sum_i w_i u_i)^2."""
    return (float(sq64(_unit_sum(_deltas(base, inputs), stat))),)


def _dot_sums(base, inputs, stat: Sphere):
    """Round 3: a block's sums of x_i m (none when the lerp is taken)."""
    if stat.lerp:
        return ()
    xs = _deltas(base, inputs)
    mean = _unit_sum(xs, stat).div_(stat.mean_norm)
    return tuple(float(dot64(_f32(x), mean)) for x in xs)


def _tangent_sums(base, inputs, stat: Sphere):
    """Round 4: a block's sum of v^2 (none when the lerp is taken)."""
    if stat.lerp:
        return ()
    return (float(sq64(_mean_and_tangent(_deltas(base, inputs), stat)[1])),)


def _fold(total, part):
    """Add a block's sums to round 1's total, or to the Sphere's `acc` in the later rounds."""
    return replace(total, acc=add_sums(total.acc, part)) if isinstance(total, Sphere) else add_sums(total, part)


def _norms(stat, weight, normalize_weights, eps) -> Sphere:
    """Round 1's result: the Sphere with the weights and norms."""
    return _sphere(weight, normalize_weights, eps, [math.sqrt(s) for s in stat])


def _mean_norm(stat: Sphere) -> Sphere:
    """Round 2's result: with |sum_i w_i u_i|."""
    return stat.with_mean_norm(math.sqrt(stat.acc[0]))


def _dots(stat: Sphere) -> Sphere:
    """Round 3's result: with sum_i w_i d_i."""
    return replace(stat, acc=None) if stat.lerp else stat.with_dots(stat.acc)


def _tangent_norm(stat: Sphere) -> Sphere:
    """Round 4's result: with |v| + eps."""
    return replace(stat, acc=None) if stat.lerp else replace(stat, tn=math.sqrt(stat.acc[0]) + stat.eps, acc=None)


SPHERE = TwoPass(
    (
        Round(_norm_sums, _fold, _norms),
        Round(_mean_sums, _fold, _mean_norm),
        Round(_dot_sums, _fold, _dots),
        Round(_tangent_sums, _fold, _tangent_norm),
    ),
    share=whole_statistic,
    stored_inputs=True,  # bfloat16 blocks as stored: the deltas are widened in the pass that takes them
    stored_merge=True,
)


@merge_method(
    "multislerp",
    pretty="Multi-SLERP",
    url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    base="optional",
    check=_weights_sum_to_zero,
    ranges={"weight": Range(0, None, extrapolate=True), "eps": (0, 1e-2)},
    streaming=SPHERE,
)
def multislerp(
    base: Optional[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    weight: PerModel[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
    stat: Optional[Sphere] = None,
) -> torch.Tensor:
    """Barycentric interpolation of any number of models on the hypersphere (optionally around a base).

    Goddard's multislerp (mergekit `multislerp`). With x_i the tensors (minus `base` when given),
    u_i = x_i / (|x_i| + eps) and weights w_i (normalized to sum 1): m = normalize(sum w_i u_i); tangent vectors
    v_i = u_i - (u_i.m) m; v = sum w_i v_i; the result is (m cos|v|' + v sin|v|'/|v|') * sum_i w_i |x_i|, with
    |v|' = |v| + eps, plus `base`. One tensor returns itself; two tensors whose weighted unit mean vanishes fall
    back to the lerp. A block of rows of a larger tensor takes `stat`, the whole tensor's scalars (`SPHERE`).

    Args:
        weight: this model's weight
        normalize_weights: divide the weights by their sum
        eps: numerical floor for norms
    """
    if len(inputs) == 1:
        return inputs[0].float().clone()
    xs = _deltas(base, inputs)
    steps = None
    if stat is None:  # the whole tensor's scalars, gathered between the float32 steps that need them
        stat, steps = _whole_sphere(xs, _sphere(weight, normalize_weights, eps, [float(norm64(x)) for x in xs]))
    if stat.lerp:
        res = _f32(xs[0]) * stat.w[0] + _f32(xs[1]) * stat.w[1]
    else:
        res = _exp_map(*(steps or _mean_and_tangent(xs, stat)), stat)
    return res + base.float() if base is not None else res


def _whole_sphere(xs: Sequence[torch.Tensor], sph: Sphere):
    """The Sphere of a tensor merged whole (its norms given, the rest from its sums), with its mean and tangent
    (None when the lerp is taken)."""
    total = _unit_sum(xs, sph)
    sph = sph.with_mean_norm(float(norm64(total)))
    if sph.lerp:
        return sph, None
    mean = total.div_(sph.mean_norm)
    sph = sph.with_dots([float(dot64(_f32(x), mean)) for x in xs])
    mean, tangent = _mean_and_tangent(xs, sph)
    return replace(sph, tn=float(norm64(tangent)) + sph.eps), (mean, tangent)
