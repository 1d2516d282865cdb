"""The output folder's rules: what mergesmith may replace or remove, and one run per output at a time.

- OUT_DIR must not be, hold, or lie inside any input (model folders and weight files, adapters, the recipe),
  compared as resolved paths, so a symlink to an input counts as the input.
- Every folder mergesmith creates holds a MARKER file: OUT_DIR.partial/, hence the finished OUT_DIR and, while it
  is being replaced, OUT_DIR.old/, and extract-lora's adapter folders. `--overwrite` replaces only a folder with
  the marker (or with the recipe copy of an output written before markers existed); OUT_DIR.partial/ and
  OUT_DIR.old/ are removed only when they are mergesmith's. Anything else is refused in one line, never deleted.
- A run holds an OS lock (flock) on PARENT/.OUT_DIR.mergesmith-lock from before it removes or writes anything until
  it ends. The kernel drops the lock when the process dies, so a killed run never blocks the next one. The file
  names the holder (PID and command) for the refusal of a second run; the run removes it when it ends, and a
  killed run's leftover file is simply locked again by the next run.
- The finished folder lists each tensor's CRC-32 (CHECKSUMS), which `mergesmith verify` checks.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from mergesmith.errors import MergeError

MARKER = ".mergesmith"
MARKER_TEXT = "Written by mergesmith: `--overwrite` may replace this folder.\n"
RECIPE_COPY = "mergesmith_config.yml"
CHECKSUMS = "mergesmith_checksums.json"
JOURNAL = ".mergesmith-journal"  # an interrupted run's resume journal (mergesmith.journal)
WORK_SUFFIXES = (".partial", ".old")


def partial_of(out: Path) -> Path:
    return out.parent / (out.name + ".partial")


def old_of(out: Path) -> Path:
    return out.parent / (out.name + ".old")


def lock_of(out: Path) -> Path:
    return out.parent / f".{out.name}.mergesmith-lock"


def output_path(out_dir) -> Path:
    """OUT_DIR as an absolute path (its parent resolved), refused when it cannot be a folder of our own."""
    raw = Path(out_dir)
    if raw.name in ("", ".", ".."):
        raise MergeError(
            f"output {str(out_dir)!r}: give the output folder by name (like out/merged), not '.', '..' or '/'"
        )
    if raw.name.endswith(WORK_SUFFIXES):
        raise MergeError(
            f"output {raw}: names ending in .partial or .old are mergesmith's working folders; choose another OUT_DIR"
        )
    out = raw.parent.resolve() / raw.name
    if out.is_symlink():
        raise MergeError(f"output {raw} is a symbolic link; give the real folder's path or another OUT_DIR")
    if out.exists() and not out.is_dir():
        raise MergeError(f"output {raw} exists and is not a folder")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise MergeError(f"output {raw} is the current folder or holds it; choose another OUT_DIR")
    return out


def model_inputs(what: str, idx) -> List[Tuple[str, Path]]:
    """A model's folder (or weights file), its weight files (the Hub cache links them from elsewhere) and its
    LoRA adapter's folder, as (what, path) for check_inputs."""
    items = [(what, Path(idx.path))]
    items += [(f"{what}'s weights", Path(f)) for f in sorted({t.file for t in idx.tensors.values()})]
    if getattr(idx, "lora", None) is not None:
        items.append((f"{what}'s adapter", Path(idx.lora.path)))
    return items


def check_inputs(out: Path, inputs: Iterable[Tuple[str, Path]]) -> None:
    """Refuse an output that is, holds or lies inside one of the inputs (resolved: symlinks followed)."""
    o = out.resolve()
    for what, path in inputs:
        r = Path(path).resolve()
        relation = "is" if o == r else "lies inside" if r in o.parents else "holds" if o in r.parents else None
        if relation:
            raise MergeError(f"output {out} {relation} {what} ({r}); choose an OUT_DIR apart from every input")


def is_ours(folder: Path) -> bool:
    """A real folder (not a link) that mergesmith wrote: it holds the marker, the recipe copy of a finished merge
    or the journal of an interrupted one."""
    return (
        folder.is_dir()
        and not folder.is_symlink()
        and any((folder / n).is_file() for n in (MARKER, RECIPE_COPY, JOURNAL))
    )


def _refuse_foreign(folder: Path) -> None:
    if folder.is_symlink() or (folder.exists() and not is_ours(folder)):
        raise MergeError(
            f"{folder} exists and mergesmith did not make it (no {MARKER} file in it); remove or "
            "rename it yourself, or choose another OUT_DIR"
        )


def check_replaceable(out: Path, overwrite: bool) -> None:
    """OUT_DIR may be written: it is absent or empty, or it is mergesmith's and --overwrite was given; its
    .partial and .old folders, if any, are mergesmith's."""
    _refuse_foreign(partial_of(out))
    _refuse_foreign(old_of(out))
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_ours(out):
        raise MergeError(
            f"output folder {out} holds files mergesmith did not write (no {MARKER} or {RECIPE_COPY}"
            "); --overwrite replaces only mergesmith's own outputs: remove it yourself or choose "
            "another OUT_DIR"
        )
    if not overwrite:
        raise MergeError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")


def remove_ours(folder: Path) -> None:
    """Delete a folder mergesmith made; anything else is refused, never deleted."""
    _refuse_foreign(folder)
    try:
        shutil.rmtree(folder)
    except OSError as e:
        raise MergeError(f"cannot remove {folder}: {e.strerror}") from None


# ----------------------------------------------------------------------------------------------- the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    me = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (me.st_ino, me.st_dev)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        return f"PID {int(info['pid'])}: {' '.join(str(info['command']).split())[:200]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown: it has just started"


def _acquire(path: Path, out: Path, command: str) -> int:
    """flock the lock file, without waiting; returns its descriptor, which holds the lock until closed."""
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise MergeError(f"cannot create the lock file {path}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MergeError(f"{path} is not a regular file; remove it, it is only a lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise MergeError(
                f"another mergesmith run ({holder}) is writing {out}; wait for it to end or choose another OUT_DIR"
            ) from None
        if _same_file(fd, path):
            info = json.dumps({"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, (info + "\n").encode(), 0)
            return fd
        os.close(fd)  # its last holder removed the file between our open and our lock: lock the new one
    raise MergeError(f"cannot lock {path}: other runs keep replacing it; try again")


def _release(fd: int, path: Path) -> None:
    try:
        if _same_file(fd, path):
            os.unlink(path)  # while still locked: a run that opened it meanwhile sees it gone and retries
    except OSError:
        pass
    os.close(fd)


@contextmanager
def claim(out: Path, inputs: Iterable[Tuple[str, Path]], overwrite: bool, command: str) -> Iterator[Path]:
    """Check OUT_DIR against the inputs, lock it, check that what is there may be replaced; yields
    OUT_DIR.partial/ (not created yet) for the body, which runs under the lock."""
    check_inputs(out, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergeError(f"cannot create the folder {out.parent}: {e.strerror}") from None
    lock = lock_of(out)
    fd = _acquire(lock, out, command)
    try:
        check_replaceable(out, overwrite)
        yield partial_of(out)
    finally:
        _release(fd, lock)


# ------------------------------------------------------------------------------------------- the folders


def fresh_partial(partial: Path) -> None:
    """An empty OUT_DIR.partial/ with the marker (an earlier one of ours removed first)."""
    if partial.exists() or partial.is_symlink():
        remove_ours(partial)
    try:
        partial.mkdir(parents=True)
        (partial / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    except OSError as e:
        raise MergeError(f"cannot create {partial}: {e.strerror}") from None


def finish(partial: Path, out: Path) -> None:
    """Put the finished folder in place of OUT_DIR; a replaced output is kept as OUT_DIR.old/ until then."""
    (partial / JOURNAL).unlink(missing_ok=True)
    try:
        if not out.exists() or not any(out.iterdir()):
            os.replace(partial, out)  # rename(2) replaces an empty folder too
            return
        check_replaceable(out, overwrite=True)  # again: files may have been put there during the run
        old = old_of(out)
        if old.exists() or old.is_symlink():
            remove_ours(old)
        os.replace(out, old)
        os.replace(partial, out)
    except OSError as e:
        raise MergeError(f"cannot put {partial} in place of {out}: {e.strerror}") from None
    remove_ours(old)


# ------------------------------------------------------------------------------------------- disk space


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def disk_need(shard_bytes: int, names: Sequence[str], other_bytes: int) -> int:
    """Bytes to have free before writing: the shard files, and twice the rest: the folder's other files
    (`other_bytes`: config, tokenizer, card, recipe copy) and the journal, index and checksum list, which name
    every tensor (its name and up to ~100 bytes each); 1 MiB more for file-system blocks and the journal header."""
    per_tensor = sum(len(n.encode("utf-8")) + 100 for n in names) * 3
    return shard_bytes + 2 * (other_bytes + per_tensor) + 2**20


def check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise MergeError(
            f"not enough free disk in {folder}: the output needs {_size(need)} (weights and every "
            f"other file, with a margin), {_size(free)} are free"
        )


# ------------------------------------------------------------------------------------------- checksums


def write_checksums(folder: Path, layout, crcs: Dict[str, int]) -> None:
    """CHECKSUMS: per tensor of the layout (mergesmith.io.writer.Layout), its shard file and the CRC-32 of its
    bytes, so that a changed bit in a finished shard is found by `mergesmith verify`."""
    data = {
        "format": 1,
        "algorithm": "crc32",
        "tensors": {n: {"file": layout.files[s.shard], "crc32": crcs[n]} for n, s in layout.slots.items()},
    }
    (folder / CHECKSUMS).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def read_checksums(folder: Path) -> Optional[Dict[str, Tuple[str, int]]]:
    """{tensor: (file, crc32)} from CHECKSUMS, None when the folder has none."""
    f = folder / CHECKSUMS
    if not f.exists():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        return {str(n): (str(v["file"]), int(v["crc32"])) for n, v in data["tensors"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise MergeError(
            f"{f}: unreadable checksum list (expected mergesmith's JSON); merge again or remove it"
        ) from None
