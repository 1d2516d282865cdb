"""SLERP: spherical interpolation between the base and one other model."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergesmith.methods.registry import Range, merge_method
from mergesmith.methods.spherical import combine, dot64, norm64

DOT_THRESHOLD = 0.9995  # |cos| above this: nearly collinear, the plain lerp
EPS = 1e-8  # a norm at most this counts as 1


@merge_method(
    "slerp",
    pretty="SLERP",
    url="https://en.wikipedia.org/wiki/Slerp",
    inputs=(1, 1),
    ranges={"t": Range(0, 1, extrapolate=True)},
)
def slerp(base: torch.Tensor, inputs: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """Spherical interpolation between the base and one other model by t.

    Whole tensors (Shoemake 1985; mergekit `slerp`): with a = v0/|v0|, b = v1/|v1| (v0 the base, v1 the other
    model), d = a.b clamped to [-1, 1] and theta = acos(d): slerp = sin((1-t) theta)/sin(theta) * v0 +
    sin(t theta)/sin(theta) * v1, applied to the un-normalized tensors; when |d| > 0.9995 (nearly collinear) it is
    the plain lerp (1-t) v0 + t v1. t = 0 gives v0, t = 1 gives v1.

    Args:
        t: position from the base (0) to the other model (1)
    """
    v0, v1 = base, inputs[0]
    na, nb = float(norm64(v0)), float(norm64(v1))
    na = na if na > EPS else 1.0
    nb = nb if nb > EPS else 1.0
    d = max(-1.0, min(1.0, float(dot64(v0, v1)) / (na * nb)))
    if abs(d) > DOT_THRESHOLD:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(d)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return combine(v0, v1, ca, cb)
