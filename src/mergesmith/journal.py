"""The resume journal: which output tensors are done, so an interrupted merge continues where it stopped.

`OUT_DIR.partial/.mergesmith-journal` holds a JSON header line (format, fingerprint, seed) and then one line per
finished tensor with a CRC-32 of its bytes. A line is written only after the tensor's bytes are; on resume each
journaled tensor is read back and checked against its CRC, so a torn write or a lost page is recomputed, never
trusted. The fingerprint covers everything that decides the output bytes: mergesmith's version, the recipe as
resolved, the seed, output dtypes and layout, and every input's tensor headers and file sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Dict, Optional

from mergesmith import __version__
from mergesmith.plan import Plan

NAME = ".mergesmith-journal"
FORMAT = 1


def fingerprint(plan: Plan) -> Dict[str, str]:
    """Named parts, each a short hash, so a refusal can say what changed."""
    def h(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    inputs = {}
    for ref, idx in plan.models.items():
        files = sorted({str(t.file) for t in idx.tensors.values()})
        if idx.lora is not None:
            files += sorted(str(p) for p in idx.lora.path.iterdir() if p.is_file())
        inputs[ref] = h([[n, str(t.dtype), t.shape, t.nbytes] for n, t in sorted(idx.tensors.items())]
                        + [[Path(f).name, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files])
    return {
        "mergesmith": __version__,
        "recipe": h(plan.recipe.config.model_dump(mode="json")),
        "seed": str(plan.seed),
        "parameters": h([(t.name, t.kind, t.shared, t.per_input, [r.name for r in t.inputs]) for t in plan.tasks]),
        "layout": h([(f, s) for f, s in zip(plan.layout.files, plan.layout.sizes)]
                    + [(t.name, str(t.out_dtype), t.shape) for t in plan.tasks]),
        **{f"input {ref}": v for ref, v in inputs.items()},
    }


def read_header(partial: Path) -> Optional[dict]:
    p = partial / NAME
    if not p.exists():
        return None
    try:
        with open(p, encoding="utf-8") as f:
            head = json.loads(f.readline())
        return head if head.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def done_tensors(partial: Path) -> Dict[str, int]:
    """{tensor name: crc32} of the journaled tensors (a torn last line is ignored)."""
    out: Dict[str, int] = {}
    with open(partial / NAME, encoding="utf-8") as f:
        f.readline()
        for line in f:
            try:
                d = json.loads(line)
                out[d["t"]] = int(d["crc"])
            except (ValueError, KeyError, TypeError):
                break
    return out


class Journal:
    def __init__(self, partial: Path, plan: Plan, fresh: bool):
        self.path = partial / NAME
        if fresh:
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"format": FORMAT, "seed": plan.seed, "fingerprint": fingerprint(plan)}) + "\n")
        self.f = open(self.path, "a", encoding="utf-8")

    def record(self, name: str, crc: int) -> None:
        self.f.write(json.dumps({"t": name, "crc": crc}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def crc(data) -> int:
    return zlib.crc32(memoryview(data).cast("B"))


def differences(old: Dict[str, str], new: Dict[str, str]) -> str:
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if "recipe" in changed and "parameters" in changed:
        changed.remove("parameters")  # follows from the recipe; "parameters" alone means an option changed them
    return ", ".join(changed) or "nothing"
