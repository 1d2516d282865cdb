"""User-facing errors and warnings.

A `MergeError` is something the user can fix (a recipe line, a missing model, a corrupt file). The CLI prints its
message on one line and exits with code 2; anything else is our bug and shows a traceback under `-v`.
"""

from __future__ import annotations

import difflib
import logging
from typing import Iterable, Optional

log = logging.getLogger("mergesmith")


class MergeError(Exception):
    """An error caused by the user's input; `str()` is the one line shown to them."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ` (did you mean 'x'?)` for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), sorted(set(map(str, choices))), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def warn(message: str) -> None:
    """A user-facing warning (printed by the CLI on stderr)."""
    log.warning(message)


def where(source: str, line: Optional[int]) -> str:
    """Format a recipe location like `recipe.yml:12`."""
    return f"{source}:{line}" if line else source
