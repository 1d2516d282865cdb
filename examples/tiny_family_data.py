"""Training data of the bundled tiny family that the package itself does not need (the skills' prompts, answers
and evaluation split stay in mergesmith.skills): plain-text drills, pretraining documents and generic chat."""

from __future__ import annotations

import random
from typing import List, Tuple

from mergesmith.skills import topics, words


# Plain-text drills of the same operations for the base model's pretraining (not chat, other wording): the base
# learns the operations; a fine-tune only has to learn to do them when asked in chat.
def drill(skill: str, rng: random.Random) -> str:
    if skill == "addition":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} + {b} makes {a + b}."
    if skill == "reverse":
        w = rng.choice(words())
        return f"{' '.join(w)} backwards reads {' '.join(reversed(w))}."
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 6))
    return f"{' '.join(letters)} in order reads {' '.join(sorted(letters))}."


def pretraining_documents() -> List[str]:
    """Python documentation topics used for pretraining (every 10th topic is held out)."""
    return [text for i, (_, text) in enumerate(topics()) if i % 10 != 3]


def chat_documents() -> List[Tuple[str, str]]:
    """A little generic ChatML chat for pretraining: questions about the documentation topics and greetings."""
    out = []
    for name, text in topics():
        first = " ".join(text.split())[:240].rsplit(" ", 1)[0]
        out.append((f"Tell me about {name}.", first))
    for q, a in [
        ("Hello!", "Hello! How can I help you today?"),
        ("Who are you?", "I am a small assistant."),
        ("Thanks!", "You are welcome."),
        ("Can you help me?", "Of course. What do you need?"),
    ]:
        out.append((q, a))
    return out
