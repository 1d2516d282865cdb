"""Ranges of work split over the machine's cores: the kernels' numpy and C helpers release the GIL."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Tuple

import torch

_POOL = None
_LOCK = threading.Lock()  # blocks of several tensors ask for the pool at once: one is made


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="split")
        return _POOL


def split(fn: Callable[[int, int], object], n: int, grain: int) -> None:
    """fn(a, b) over consecutive ranges covering [0, n), at least `grain` long, one per thread (--threads bounds
    the count: torch.get_num_threads())."""
    workers = max(1, min(torch.get_num_threads(), n // grain))
    if workers == 1:
        fn(0, n)
        return
    bounds = [n * i // workers for i in range(workers + 1)]
    list(_pool().map(lambda ab: fn(*ab), zip(bounds, bounds[1:])))


def both(f: Callable[[], object], g: Callable[[], object]) -> Tuple[object, object]:
    """(f(), g()), on two threads where --threads allows."""
    if torch.get_num_threads() < 2:
        return f(), g()
    later = _pool().submit(g)
    return f(), later.result()
