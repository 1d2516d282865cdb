"""Passthrough: one model's tensors, unchanged or scaled (layer stacking with `slices:`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergesmith.methods.registry import PerModel, Streaming, merge_method


@merge_method(
    "passthrough",
    pretty="Passthrough",
    url="https://github.com/arcee-ai/mergekit",
    base="ignored",
    inputs=(1, 1),
    streaming=Streaming.ELEMENTWISE,
    copy_when=lambda scale: scale[0] is None,
)
def passthrough(inputs: Sequence[torch.Tensor], *, scale: PerModel[Optional[float]] = None) -> torch.Tensor:
    """Copy one model's tensors unchanged (optionally scaled): layer stacking with slices.

    Without a scale the planner copies the tensor's bytes (copy_when); the kernel then only serves callers that
    compute it anyway (a vocabulary permutation).

    Args:
        scale: multiply the tensor by this (default: copy it)
    """
    x = inputs[0].float()
    return x.clone() if scale[0] is None else x * scale[0]
