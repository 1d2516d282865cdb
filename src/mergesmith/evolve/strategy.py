"""How the next candidates are chosen: CMA-ES (the `cma` package, seeded), random or grid.

Each is deterministic given its seed and the scores it was told, and hands out candidates in generations; resuming a
search replays the same ask/tell sequence from the journal (no optimizer state is pickled).
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import numpy as np

STRATEGIES = ("cma", "random", "grid")
# random and grid hand out this many candidates at a time (only the batch size of the scoring, not the results)
BATCH = 8


class CMA:
    def __init__(self, x0: np.ndarray, sigma0: float, seed: int, popsize: Optional[int] = None):
        import warnings

        with warnings.catch_warnings():  # cma says it cannot plot without matplotlib: it need not
            warnings.simplefilter("ignore")
            import cma

        # cma draws from numpy's global generator and takes seed 0 to mean "from the clock": offset by one
        opts = {"seed": seed + 1, "verbose": -9}
        if popsize:
            opts["popsize"] = popsize
        self.es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)
        self._state = np.random.get_state()

    def ask(self) -> List[np.ndarray]:
        # cma samples from numpy's global generator: keep its own state, whatever else in the process draws
        outside = np.random.get_state()
        np.random.set_state(self._state)
        try:
            return [np.asarray(x, dtype=float) for x in self.es.ask()]
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outside)

    def tell(self, xs: Sequence[np.ndarray], scores: Sequence[float]) -> None:
        self.es.tell(list(xs), [-s for s in scores])  # cma minimizes


class RandomSearch:
    """The first candidate is the start vector; then each gene uniform in [0, 1], drawn from (seed, index) alone."""

    def __init__(self, x0: np.ndarray, seed: int):
        self.x0, self.seed, self.next = x0, seed, 0

    def ask(self) -> List[np.ndarray]:
        out = []
        for i in range(self.next, self.next + BATCH):
            out.append(self.x0.copy() if i == 0 else np.random.default_rng([self.seed, i]).uniform(0, 1, self.x0.size))
        self.next += BATCH
        return out

    def tell(self, xs, scores) -> None:
        pass


class GridSearch:
    """Every combination of `levels` evenly spaced values in [0, 1] per gene, in order (for small genomes)."""

    def __init__(self, x0: np.ndarray, levels: int):
        self.points = itertools.product(np.linspace(0.0, 1.0, levels), repeat=x0.size)

    def ask(self) -> List[np.ndarray]:
        return [np.asarray(p, dtype=float) for p in itertools.islice(self.points, BATCH)]

    def tell(self, xs, scores) -> None:
        pass


def make_strategy(name: str, x0: np.ndarray, sigma0: float, seed: int, popsize: Optional[int], levels: int):
    if name == "cma":
        return CMA(x0, sigma0, seed, popsize)
    if name == "random":
        return RandomSearch(x0, seed)
    return GridSearch(x0, levels)
