"""The resume journal: which output tensors are done, so an interrupted merge continues where it stopped.

`OUT_DIR.partial/.mergesmith-journal` holds a JSON header line (format, fingerprint, seed) and then one line per
finished tensor with a CRC-32 of its bytes. A line is written only after the tensor's bytes are; on resume each
journaled tensor is read back and checked against its CRC, so a torn write or a lost page is recomputed, never
trusted. The fingerprint covers everything that decides the output bytes: mergesmith's version, the recipe as
resolved, the seed, output dtypes and layout, every input's tensor headers and folder, and every file mergesmith
reads from an input (see input_files), so a resume never mixes tensors of old and new inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Dict, Optional

from mergesmith.outdir import JOURNAL as NAME
from mergesmith.outdir import is_ours
from mergesmith.plan import Plan
from mergesmith.version import __version__

FORMAT = 2  # 2: one fingerprint part per input file (format 1 partials are started over)

# Files below this size are fingerprinted by their bytes (exact, and a `touch` does not count as a change); larger
# ones (weight shards of many GB, which hashing would read in full) by size, mtime, ctime and inode. The ctime is
# what catches a file rewritten in place with its mtime put back: os.utime can set the mtime, never the ctime.
HASH_LIMIT = 16 * 1024 * 1024
# Besides the weight files: what plan, folder and vocab read from an input folder (config, tokenizer, templates).
FOLDER_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json", "generation_config.json")


def _h(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_stamp(path: Path) -> str:
    """The sha256 of a small file's bytes; size, mtime, ctime and inode of a large one."""
    try:
        st = os.stat(path)
        if st.st_size >= HASH_LIMIT:
            return _h([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return "sha256:" + digest.hexdigest()
    except OSError:
        return "unreadable"


def input_files(idx) -> Dict[str, Path]:
    """{label: path} of every file of one input that shapes the output: its weight files, index, configs,
    tokenizer and chat template files, and the files of its LoRA adapter."""
    from mergesmith.vocab import TOKENIZER_FILES
    from mergesmith.io.index import model_folder

    folder = model_folder(idx)
    found = {Path(t.file) for t in idx.tensors.values()}
    found |= {folder / n for n in (*FOLDER_FILES, *TOKENIZER_FILES) if (folder / n).is_file()}
    out = {}
    for f in sorted(found):
        try:
            out[str(f.relative_to(folder))] = f
        except ValueError:
            out[str(f)] = f
    if idx.lora is not None:
        out.update({f"adapter {p.name}": p for p in sorted(idx.lora.path.iterdir()) if p.is_file()})
    return out


def _template_file(plan: Plan) -> Optional[Path]:
    """The recipe's `chat_template:` when it names a file (see chat_templates.choose_template)."""
    from mergesmith.chat_templates import TEMPLATES

    spec = plan.recipe.config.chat_template
    if not spec or spec in TEMPLATES or spec == "auto" or "{%" in spec or "{{" in spec:
        return None
    p = Path(spec).expanduser()
    return p if p.is_file() else None


def fingerprint(plan: Plan) -> Dict[str, str]:
    """Named parts, each a short hash (or a file's stamp), so a refusal can say what changed."""
    parts = {
        "mergesmith": __version__,
        "recipe": _h(plan.recipe.config.model_dump(mode="json")),
        "seed": str(plan.seed),
        "parameters": _h([(t.name, t.kind, t.shared, t.per_input, [r.name for r in t.inputs]) for t in plan.tasks]),
        "layout": _h(
            [(f, s) for f, s in zip(plan.layout.files, plan.layout.sizes)]
            + [(t.name, str(t.out_dtype), t.shape) for t in plan.tasks]
        ),
    }
    for ref, idx in plan.models.items():
        parts[f"input {ref}"] = _h(
            [str(idx.path.resolve())] + [[n, str(t.dtype), t.shape, t.nbytes] for n, t in sorted(idx.tensors.items())]
        )
        parts.update({f"input {ref}: {label}": file_stamp(f) for label, f in input_files(idx).items()})
    template = _template_file(plan)
    if template is not None:
        parts[f"chat template {template}"] = file_stamp(template)
    return parts


def resume_header(partial: Path) -> Optional[dict]:
    """The journal header of an interrupted run in `partial`, when that folder is mergesmith's."""
    p = partial / NAME
    if not is_ours(partial) or p.is_symlink() or not p.is_file():
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
    """The parts that changed, by name (an input's file: `input REF: FILE`), at most six of them."""
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if "recipe" in changed and "parameters" in changed:
        changed.remove("parameters")  # follows from the recipe; "parameters" alone means an option changed them
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    return ", ".join(changed[:6]) + more or "nothing"
