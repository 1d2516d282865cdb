"""Turn a recipe's model reference (a local path or a Hub id `org/name[@revision]`) into a local path.

Hub ids resolve through huggingface_hub's local cache first; a download is tried only when that misses and the
network is allowed (HF_HUB_OFFLINE unset). Local paths resolve against the working directory, then against the
recipe's folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from mergesmith.errors import MergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
WEIGHT_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "pytorch_model*.bin"]


def is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and "\\" not in ref and not ref.startswith((".", "/", "~"))


def resolve_model(ref: str, where: str, recipe_dir: Optional[Path] = None) -> Path:
    """Local path for `ref`; MergeError naming `where` (the recipe line) when it cannot be found."""
    candidates = [Path(ref).expanduser()]
    if recipe_dir is not None and not Path(ref).is_absolute():
        candidates.append(recipe_dir / ref)
    for c in candidates:
        if c.exists():
            return c
    if is_hub_id(ref):
        repo, _, rev = ref.partition("@")
        _check_cache_ref(repo, rev, where)
        try:
            from huggingface_hub import snapshot_download

            try:
                return Path(
                    snapshot_download(repo, revision=rev or None, local_files_only=True, allow_patterns=WEIGHT_PATTERNS)
                )
            except Exception:  # noqa: BLE001 - not in the cache
                if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                    raise
                return Path(snapshot_download(repo, revision=rev or None, allow_patterns=WEIGHT_PATTERNS))
        except Exception as e:  # noqa: BLE001
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise MergeError(
                f"{where}: model '{ref}' is not on disk nor in the Hugging Face cache, and could not "
                f"be downloaded ({reason})"
            ) from None
    raise MergeError(f"{where}: model path not found: {ref}")


def _check_cache_ref(repo: str, rev: str, where: str) -> None:
    """huggingface_hub takes `refs/<revision>` of the cache as a path and its content as a snapshot folder name: a
    revision with `..`, or a ref that is no regular file holding a commit hash, could lead it out of the cache (or
    block it on a FIFO). Checked before it looks."""
    if rev and (rev.startswith("/") or ".." in rev.split("/")):
        raise MergeError(f"{where}: revision {rev!r} is not a branch, tag or commit name")
    from huggingface_hub import constants

    from mergesmith.io.index import read_capped

    ref = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "refs" / (rev or "main")
    if not os.path.lexists(ref) or _COMMIT.match(rev or ""):
        return
    text = read_capped(ref, 1024, "Hub cache ref").decode("ascii", "replace").strip()
    if not _COMMIT.match(text):
        raise MergeError(
            f"{where}: the Hugging Face cache's {ref} does not hold a commit hash; the cache is corrupt "
            "(delete that ref file and download again)"
        )
