"""Checking an output folder: the index agrees with the shard files and every header is sound; `mergesmith verify`
also reads every tensor back (checksums, NaN/Inf, all-zero tensors) and loads the folder with transformers.

Only regular files inside the folder are read (an index naming a pipe, a device or a path outside is refused), and
a folder whose config asks to run its own code is refused before transformers sees it.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from mergesmith.errors import MergeError
from mergesmith.io.index import ST_DTYPES, read_safetensors_header, refuse_custom_code, safe_member

INDEX = "model.safetensors.index.json"


def _regular(folder: Path, name: str) -> Path:
    """The file `name` of the folder, refused unless it is a regular file inside it (never opened otherwise:
    opening a pipe would wait forever)."""
    p = safe_member(folder, name)
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        raise MergeError(f"{folder}: cannot read {name} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise MergeError(f"{folder}: {name} is not a regular file (a pipe, device or folder?); refusing to read it")
    return p


def shard_files(folder: Path) -> Tuple[Optional[Dict[str, str]], List[str]]:
    """(the index's weight_map or None, the shard file names), each named file checked by _regular."""
    if (folder / INDEX).exists() or (folder / INDEX).is_symlink():
        try:
            wm = json.loads(_regular(folder, INDEX).read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            raise MergeError(f"{folder}: {INDEX} is not valid JSON") from None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise MergeError(f"{folder}: {INDEX} has no weight_map of tensor names to file names")
        files = sorted(set(wm.values()))
    elif (folder / "model.safetensors").exists() or (folder / "model.safetensors").is_symlink():
        wm, files = None, ["model.safetensors"]
    else:
        raise MergeError(f"{folder}: no model.safetensors or {INDEX}")
    for f in files:
        _regular(folder, f)
    return wm, files


def verify_weights(folder: Path, expected: Optional[Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]] = None) -> int:
    """Validate every shard header (and the index); compare with `expected` names/dtypes/shapes. Returns count."""
    wm, files = shard_files(folder)
    seen: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
    for f in files:
        header = read_safetensors_header(_regular(folder, f))
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


def read_tensors(folder: Path, files: List[str]) -> Iterator[Tuple[str, str, int, torch.Tensor]]:
    """(file, name, CRC-32 of its bytes, tensor) of every tensor, one at a time, read at the header's offsets."""
    for f in files:
        path = _regular(folder, f)
        header = read_safetensors_header(path)
        with open(path, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                b, e = info["data_offsets"]
                fh.seek(start + b)
                raw = bytearray(e - b)
                if fh.readinto(raw) != len(raw):
                    raise MergeError(f"{path}: ends before tensor {name} does (truncated?)")
                dt = ST_DTYPES[info["dtype"]][0]
                t = torch.frombuffer(raw, dtype=dt) if raw else torch.empty(0, dtype=dt)
                yield f, name, zlib.crc32(raw), t.reshape(info["shape"])


def _check_tensors(
    folder: Path, files: List[str], sums: Optional[Dict[str, Tuple[str, int]]]
) -> Tuple[Dict[str, Tuple[int, ...]], List[str]]:
    """Every tensor against the checksum list, and free of NaN/Inf; returns the shapes and the floating tensors
    that are all zeros."""
    from mergesmith.outdir import CHECKSUMS

    shapes: Dict[str, Tuple[int, ...]] = {}
    zeros: List[str] = []
    for f, name, crc, t in read_tensors(folder, files):
        if sums is not None and sums.get(name) != (f, crc):
            why = "is not listed" if name not in sums else "does not match its checksum"
            raise MergeError(
                f"{folder / f}: tensor {name} {why} in {CHECKSUMS} (the file changed after the merge: "
                "a disk error or an edit); merge again"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise MergeError(f"{folder / f}: tensor {name} holds NaN or Inf")
        if t.is_floating_point() and t.numel() and not t.any():
            zeros.append(name)
        shapes[name] = tuple(t.shape)
    if sums is not None and set(sums) - set(shapes):
        raise MergeError(
            f"{folder}: {CHECKSUMS} lists tensor {sorted(set(sums) - set(shapes))[0]}, which no "
            "shard holds; merge again"
        )
    return shapes, zeros


def _recipe_inputs(folder: Path) -> Optional[list]:
    """The merge's inputs (base first) as indexes, from the folder's recipe copy; None when they cannot be found."""
    from mergesmith.inspection import recipe_inputs
    from mergesmith.plan import load_model

    try:
        base, refs, resolved, source = recipe_inputs(folder)
        refs = ([base] if base else []) + [r for r in refs if r != base]
        return [load_model(r, str(folder / source), folder, resolved.get(r)) for r in refs]
    except MergeError:
        return None


def _zero_lines(folder: Path, zeros: List[str]) -> List[str]:
    """An all-zero floating tensor is an error when its inputs' same-named tensors are not all zeros (a tensor
    never written looks like this), a warning when the inputs cannot be read to tell."""
    if not zeros:
        return []
    inputs = _recipe_inputs(folder)
    unknown = [n for n in zeros if inputs is None or any(n not in idx.tensors for idx in inputs)]
    for name in (n for n in zeros if n not in unknown):
        if any(bool(idx.read(name).any()) for idx in inputs):
            raise MergeError(
                f"{folder}: tensor {name} is all zeros but the inputs' {name} is not (a tensor that "
                "was never written, or weights that cancel out); merge again"
            )
    lines = []
    if len(unknown) < len(zeros):
        lines.append(f"ok  {len(zeros) - len(unknown)} all-zero tensor(s) are all zeros in every input too")
    if unknown:
        lines.append(
            f"warning: {len(unknown)} tensor(s) are all zeros, like {unknown[0]}; the merge's inputs "
            "were not found to tell whether they should be"
        )
    return lines


def _refuse_odd_files(folder: Path) -> None:
    """transformers opens config, tokenizer and other files by name: a pipe or device among them would hang it."""
    for entry in folder.iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise MergeError(f"{folder}: {entry.name} is not a regular file (a pipe or device?); remove it")


def _as_saved(
    model, want: Dict[str, Tuple[int, ...]], shapes: Dict[str, Tuple[int, ...]]
) -> Dict[str, Tuple[int, ...]]:
    """The tensor names and shapes as transformers saves them, when the folder uses those: some architectures
    are saved under other names than the model's modules hold (a Mixtral's experts, one tensor per expert)."""
    from transformers.core_model_loading import revert_weight_conversion

    saved = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, model.state_dict()).items()}
    return saved if sum(k in shapes for k in saved) > sum(k in shapes for k in want) else want


def _config_shapes(folder: Path, shapes: Dict[str, Tuple[int, ...]]) -> List[str]:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
        want = _as_saved(model, {k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes)
    except Exception as e:  # noqa: BLE001 - an architecture transformers does not know: skip this check
        return [f"--  shapes not checked against config.json ({type(e).__name__})"]
    tied = getattr(cfg, "tie_word_embeddings", False)
    for name, shape in want.items():
        if name not in shapes:
            if tied and "lm_head" in name:
                continue
            raise MergeError(f"{folder}: config.json's model needs tensor {name}, which is missing")
        if shapes[name] != shape:
            raise MergeError(f"{folder}: tensor {name} is {list(shapes[name])} but config.json implies {list(shape)}")
    return ["ok  shapes agree with config.json"]


def _tokenizer(folder: Path) -> str:
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return "--  no tokenizer"
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"{folder}: the tokenizer does not load ({type(e).__name__}: {e})") from None
    return f"ok  tokenizer loads ({len(tok)} tokens)"


def _forward(folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"{folder}: the model does not load or run ({type(e).__name__}: {e})") from None
    if not torch.isfinite(logits).all():
        raise MergeError(f"{folder}: a forward pass gives NaN or Inf")
    return "ok  loads with transformers and runs a forward pass"


def verify_folder(folder: Path, load: bool = True) -> list:
    """`mergesmith verify`: the checks of a finished output folder. Returns lines of what was checked."""
    from mergesmith.outdir import CHECKSUMS, read_checksums

    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{folder}: not a folder")
    _refuse_odd_files(folder)
    refuse_custom_code(folder, "verify")
    report = [f"ok  index and {verify_weights(folder)} tensor headers agree"]
    sums = read_checksums(folder)
    shapes, zeros = _check_tensors(folder, shard_files(folder)[1], sums)
    report.append("ok  every tensor reads back, no NaN or Inf")
    report.append(f"ok  every tensor matches {CHECKSUMS}" if sums is not None else f"--  no {CHECKSUMS}")
    report += _zero_lines(folder, zeros)
    has_config = (folder / "config.json").exists()
    if has_config:
        report += _config_shapes(folder, shapes)
    report.append(_tokenizer(folder))
    if load and has_config:
        report.append(_forward(folder))
    return report
