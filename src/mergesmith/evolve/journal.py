"""The search's journal: STORAGE/journal.jsonl, a header line, then one line per scored candidate in candidate order
(vector, recipe, scores, seconds, worker, time). It is the search's whole state: a rerun reads it, replays the
strategy's ask/tell sequence with the recorded scores and goes on from the first candidate it lacks. The header also
holds what scores depend on besides the candidate (`score: gap`'s baseline), so a resumed search scores with the
same numbers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from mergesmith.errors import MergeError

NAME = "journal.jsonl"
VERSION = 1


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Journal:
    """An existing journal is read and checked when opened; a new one is written by `start`."""

    def __init__(self, storage: Path, fingerprint: Dict[str, Any]):
        self.path = Path(storage) / NAME
        self.fingerprint = fingerprint
        self.entries: List[Dict[str, Any]] = []
        self.head: Optional[Dict[str, Any]] = None
        if self.path.exists():
            self._read()

    def start(self, extra: Dict[str, Any]) -> Dict[str, Any]:
        """Writes a new journal's header, with `extra` added; returns it."""
        assert self.head is None
        self.head = {"journal": "mergesmith evolve", "version": VERSION, "fingerprint": self.fingerprint, **extra}
        self._append(self.head)
        return self.head

    def _read(self) -> None:
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise MergeError(f"cannot read {self.path}: {e.strerror}") from None
        # a line cut short by a crash is dropped (its candidate is scored again)
        good = raw[: raw.rfind(b"\n") + 1]
        lines = good.decode("utf-8", "replace").splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
            entries = [json.loads(x) for x in lines[1:] if x.strip()]
        except ValueError:
            raise MergeError(
                f"{self.path} is not a journal mergesmith evolve can read; use another --storage or --restart"
            ) from None
        if not isinstance(head, dict) or head.get("journal") != "mergesmith evolve":
            raise MergeError(f"{self.path} is not a mergesmith evolve journal; use another --storage")
        self._check(head.get("fingerprint") or {})
        self.head = head
        if len(good) != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(len(good))
        self.entries = [e for k, e in enumerate(entries) if e.get("index") == k]
        if len(self.entries) != len(entries):
            raise MergeError(f"{self.path}: candidates out of order; the journal was edited: use --restart")

    def _check(self, old: Dict[str, Any]) -> None:
        changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
        if changed:
            raise MergeError(
                f"{self.path.parent} holds a search with other settings (changed: {', '.join(changed)}); "
                "use another --storage, or --restart to discard it"
            )

    def _append(self, obj: Dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def add(self, entry: Dict[str, Any]) -> None:
        assert entry["index"] == len(self.entries)
        self._append(entry)
        self.entries.append(entry)

    def get(self, index: int) -> Optional[Dict[str, Any]]:
        return self.entries[index] if index < len(self.entries) else None

    def best(self) -> Optional[Dict[str, Any]]:
        """The highest score; the earliest candidate among equals."""
        return max(self.entries, key=lambda e: (e["score"], -e["index"])) if self.entries else None
