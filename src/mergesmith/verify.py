"""Checking an output folder: the index agrees with the shard files and every header is sound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from mergesmith.errors import MergeError
from mergesmith.io.index import ST_DTYPES, read_safetensors_header


def verify_weights(folder: Path, expected: Optional[Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]] = None) -> int:
    """Validate every shard header (and the index); compare with `expected` names/dtypes/shapes. Returns count."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(wm.values()))
    elif (folder / "model.safetensors").exists():
        wm, files = None, ["model.safetensors"]
    else:
        raise MergeError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    seen: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
    for f in files:
        header = read_safetensors_header(folder / f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if wm is not None and wm.get(name) != f:
                raise MergeError(f"{folder}: tensor {name} is in {f} but the index says {wm.get(name)}")
            seen[name] = (ST_DTYPES[info["dtype"]][0], tuple(info["shape"]))
    if wm is not None and set(wm) != set(seen):
        missing = sorted(set(wm) - set(seen))[:3]
        raise MergeError(f"{folder}: the index lists tensors no shard holds: {missing}")
    if expected is not None and expected != seen:
        diff = sorted(set(expected) ^ set(seen))[:3] or [n for n in expected if expected[n] != seen.get(n)][:3]
        raise MergeError(f"{folder}: written tensors differ from the plan: {diff}")
    return len(seen)
