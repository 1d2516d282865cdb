"""Weights as the decimals users write, so that exact results stay exact.

Recipe weights like 0.3, 0.1, 0.4 are not binary fractions: multiplying by float32(0.3) moves results that are
exactly halfway between two bfloat16 values (common with bf16 inputs) to one side at random. Writing the weights as
integers over a common denominator (3, 1, 4 over 10) keeps every product and small sum exact in float32, so the
only rounding is the final division and the cast to the output dtype.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Sequence, Tuple


def as_fraction(w: float) -> Fraction:
    """The decimal the user wrote (Python's shortest repr of the float), as an exact fraction."""
    return Fraction(repr(float(w)))


def integer_weights(weights: Sequence[float], limit: int = 2**20) -> Tuple[List[float], float]:
    """(numerators, denominator) with w_i = n_i / d exactly, small integers; else (weights, 1.0)."""
    fr = [as_fraction(w) for w in weights]
    d = 1
    for f in fr:
        d = d * f.denominator // math.gcd(d, f.denominator)
        if d > limit:
            return [float(w) for w in weights], 1.0
    nums = [f * d for f in fr]
    if any(abs(n) > limit for n in nums):
        return [float(w) for w in weights], 1.0
    return [float(n) for n in nums], float(d)
