"""The torch device a merge computes on, from the user's `--device` (cpu, cuda, cuda:N or auto)."""

from __future__ import annotations

import torch

from mergesmith.errors import MergeError


def pick_device(name: str) -> torch.device:
    """`auto`: a CUDA GPU when torch sees one, else the CPU. A GPU asked for but absent is a MergeError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MergeError(f"unknown device {name!r}: use cpu, cuda or auto")
    return torch.device(name)
