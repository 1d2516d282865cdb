"""SLERP: spherical interpolation between the base and one other model."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from mergesmith.methods.registry import Range, Round, TwoPass, merge_method
from mergesmith.methods.spherical import add_sums, combine, gram64, whole_statistic

DOT_THRESHOLD = 0.9995  # |cos| above this: nearly collinear, the plain lerp
EPS = 1e-8  # a norm at most this counts as 1


def coefficients(t: float, na: float, nb: float, dot: float) -> Tuple[float, float]:
    """(ca, cb) of slerp = ca v0 + cb v1, from the norms |v0|, |v1| and the dot product v0.v1 (float64)."""
    na = na if na > EPS else 1.0
    nb = nb if nb > EPS else 1.0
    d = max(-1.0, min(1.0, dot / (na * nb)))
    if abs(d) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(d)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def _sums(base: torch.Tensor, inputs: Sequence[torch.Tensor]) -> Tuple[float, float, float]:
    """A block's float64 sums of v0^2, v1^2 and v0 v1 (one pass over both)."""
    g = gram64([base, inputs[0]])
    return float(g[0, 0]), float(g[1, 1]), float(g[0, 1])


def _finish(stat: Tuple[float, float, float], t: float) -> Tuple[float, float]:
    """The whole tensor's (ca, cb) from its sums."""
    s00, s11, s01 = stat
    return coefficients(t, math.sqrt(s00), math.sqrt(s11), s01)


# The coefficients depend on the whole tensor's norms and dot product: pass 1 sums them over the blocks.
SUMS = TwoPass((Round(_sums, add_sums, _finish),), share=whole_statistic)


@merge_method(
    "slerp",
    pretty="SLERP",
    url="https://en.wikipedia.org/wiki/Slerp",
    inputs=(1, 1),
    ranges={"t": Range(0, 1, extrapolate=True)},
    streaming=SUMS,
)
def slerp(
    base: torch.Tensor, inputs: Sequence[torch.Tensor], *, t: float, stat: Optional[Tuple[float, float]] = None
) -> torch.Tensor:
    """Spherical interpolation between the base and one other model by t.

    Whole tensors (Shoemake 1985; mergekit `slerp`): with a = v0/|v0|, b = v1/|v1| (v0 the base, v1 the other
    model), d = a.b clamped to [-1, 1] and theta = acos(d): slerp = sin((1-t) theta)/sin(theta) * v0 +
    sin(t theta)/sin(theta) * v1, applied to the un-normalized tensors; when |d| > 0.9995 (nearly collinear) it is
    the plain lerp (1-t) v0 + t v1. t = 0 gives v0, t = 1 gives v1. A block of rows of a larger tensor takes
    `stat`, the whole tensor's (ca, cb).

    Args:
        t: position from the base (0) to the other model (1)
    """
    v0, v1 = base, inputs[0]
    if stat is None:
        stat = _finish(_sums(v0, [v1]), t)
    return combine(v0, v1, *stat)
