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


def verify_folder(folder: Path, load: bool = True) -> list:
    """`mergesmith verify`: the checks of a finished output folder. Returns lines of what was checked."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{folder}: not a folder")
    report = []
    count = verify_weights(folder)
    report.append(f"ok  index and {count} tensor headers agree")
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    shapes: Dict[str, Tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(folder / f), "pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise MergeError(f"{folder / f}: tensor {name} holds NaN or Inf")
                shapes[name] = tuple(t.shape)
    report.append("ok  every tensor reads back, no NaN or Inf")
    if (folder / "config.json").exists():
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            cfg = AutoConfig.from_pretrained(str(folder))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg)
            want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        except Exception as e:  # noqa: BLE001 - an architecture transformers does not know: skip this check
            report.append(f"--  shapes not checked against config.json ({type(e).__name__})")
            want = None
        if want is not None:
            tied = getattr(cfg, "tie_word_embeddings", False)
            for name, shape in want.items():
                if name not in shapes:
                    if tied and "lm_head" in name:
                        continue
                    raise MergeError(f"{folder}: config.json's model needs tensor {name}, which is missing")
                if shapes[name] != shape:
                    raise MergeError(f"{folder}: tensor {name} is {list(shapes[name])} but config.json implies "
                                     f"{list(shape)}")
            report.append("ok  shapes agree with config.json")
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # noqa: BLE001
            raise MergeError(f"{folder}: the tokenizer does not load ({type(e).__name__}: {e})") from None
        report.append(f"ok  tokenizer loads ({len(tok)} tokens)")
    else:
        report.append("--  no tokenizer")
    if load and (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        except Exception as e:  # noqa: BLE001
            raise MergeError(f"{folder}: the model does not load or run ({type(e).__name__}: {e})") from None
        if not torch.isfinite(logits).all():
            raise MergeError(f"{folder}: a forward pass gives NaN or Inf")
        report.append("ok  loads with transformers and runs a forward pass")
    return report
