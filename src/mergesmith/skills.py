"""The three checkable skills of the bundled tiny model family, and their held-out evaluation prompts.

Each skill turns a seeded random generator into (prompt, answer) pairs, asked in ChatML chat:
- addition: "What is 7 + 8?" -> "7 + 8 makes 15" (one-digit numbers, answered in the words of the base's drills:
  see docs/tiny-family.md for why)
- reverse:  "Reverse the letters: p l a n e t" -> "t e n a l p"
- sort:     "Sort the letters: d b e a" -> "a b d e"
Evaluation prompts come from their own seed and are never used in training (`is_held_out`).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Callable, Dict, List, Tuple

SKILLS = ("addition", "reverse", "sort")
EVAL_SEED = 20240611
EVAL_N = 40


@lru_cache(maxsize=1)
def words() -> Tuple[str, ...]:
    """Lower-case words of 3-7 letters from Python's own documentation (ships with the interpreter)."""
    import pydoc_data.topics as t

    text = " ".join(t.topics.values()).lower()
    return tuple(sorted({w for w in re.findall(r"\b[a-z]{3,7}\b", text)}))


def _addition(rng: random.Random) -> Tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} + {b}?", f"{a} + {b} makes {a + b}"


def _reverse(rng: random.Random) -> Tuple[str, str]:
    w = rng.choice(words())
    return f"Reverse the letters: {' '.join(w)}", " ".join(reversed(w))


def _sort(rng: random.Random) -> Tuple[str, str]:
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 6))
    return f"Sort the letters: {' '.join(letters)}", " ".join(sorted(letters))


GENERATORS: Dict[str, Callable[[random.Random], Tuple[str, str]]] = {
    "addition": _addition,
    "reverse": _reverse,
    "sort": _sort,
}


@lru_cache(maxsize=None)
def eval_set(skill: str, n: int = EVAL_N) -> Tuple[Tuple[str, str], ...]:
    """The held-out (prompt, answer) pairs for a skill: distinct prompts, fixed seed."""
    rng = random.Random(f"{EVAL_SEED}-{skill}")
    seen, out = set(), []
    while len(out) < n:
        p, a = GENERATORS[skill](rng)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
    return tuple(out)


def is_held_out(skill: str, prompt: str) -> bool:
    return prompt in {p for p, _ in eval_set(skill)}


def training_examples(skill: str, n: int, seed: int) -> List[Tuple[str, str]]:
    """n training pairs for a skill, none of them an evaluation prompt."""
    rng = random.Random(f"{seed}-{skill}")
    out = []
    while len(out) < n:
        p, a = GENERATORS[skill](rng)
        if not is_held_out(skill, p):
            out.append((p, a))
    return out


def topics() -> List[Tuple[str, str]]:
    """(name, text) of the documentation topics Python ships (pydoc_data), in name order."""
    import pydoc_data.topics as t

    return sorted(t.topics.items())


def heldout_text(max_chars: int = 20000) -> str:
    """English text the tiny family never saw in training, for perplexity."""
    return "\n\n".join(text for i, (_, text) in enumerate(topics()) if i % 10 == 3)[:max_chars]
