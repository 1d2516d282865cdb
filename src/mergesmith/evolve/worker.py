"""A worker: scores candidate recipes in memory.

It loads one transformers model (the skeleton, once) and keeps every input tensor it has read in memory, so a
candidate costs the merge arithmetic and the evaluation, not file reads; the merged tensors are copied straight into
the model's parameters and never written to disk. The same class runs in the driver's process (one local worker)
or as a Ray actor.

A candidate's scores depend on its recipe and the seed only: the merge seed is fixed for the whole search, and each
worker runs torch on the same number of threads (float sums depend on how work is split).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from mergesmith.errors import MergeError
from mergesmith.io.index import ModelIndex


class CachedIndex(ModelIndex):
    """A ModelIndex whose tensors are read from disk once and then served from memory (`store`, shared by every
    plan of the worker)."""

    store: Dict[Tuple[str, str, Any], torch.Tensor]

    @classmethod
    def of(cls, idx: ModelIndex, store: Dict[Tuple[str, str, Any], torch.Tensor]) -> "CachedIndex":
        c = cls(ref=idx.ref, path=idx.path, tensors=idx.tensors, config=idx.config, lora=idx.lora)
        c.store = store
        return c

    def _read(self, name, rows, take) -> torch.Tensor:
        key = (str(self.path), name, tuple(take) if take is not None else None)
        full = self.store.get(key)
        if full is None:
            full = self.store[key] = super()._read(name, None, take)
        # a copy: kernels may work in place on what they read
        return (full[rows[0] : rows[1]] if rows else full).clone()


def merged_tensors(recipe: Dict[str, Any], store: Dict, seed: int, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """{name: tensor} of a recipe, as `mergesmith.merge_in_memory` computes them (the same bytes), with the input
    tensors served from `store`."""
    from mergesmith.api import MergeOptions, plan_merge
    from mergesmith.execute import compute_tensor, pick_device

    plan = plan_merge(recipe, MergeOptions(seed=seed, device=device, copy_tokenizer=False))
    for ref, idx in list(plan.models.items()):
        plan.models[ref] = CachedIndex.of(idx, store)
    dev = pick_device(device)
    return {t.name: compute_tensor(plan, t, dev) for t in plan.tasks}


def whole_model(path: str, store: Dict) -> Dict[str, torch.Tensor]:
    """Every tensor of one input model as it is (the reference rows of the report)."""
    from mergesmith.io.index import index_model

    idx = CachedIndex.of(index_model(path, Path(path)), store)
    return {name: idx.read(name) for name in idx.tensors}


class Scorer:
    """Scores jobs: {"index", "recipe" (a dict) or "model" (a path), "split", "every_metric"}."""

    def __init__(self, setup: Dict[str, Any]):
        from mergesmith.evaluate import load
        from mergesmith.evolve.tasks import TaskSet

        torch.set_num_threads(int(setup.get("threads") or 1))
        _quiet_transformers()
        self.setup = setup
        self.device = setup.get("device") or "cpu"
        self.model, self.tok = load(Path(setup["skeleton"]))
        self.model.to(self.device)
        self.tasks = TaskSet(setup["tasks"], self.tok, int(setup.get("batch_size") or 64))
        self.store: Dict = {}
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, job: Dict[str, Any]) -> Dict[str, Any]:
        from mergesmith.evolve.tasks import fitness

        t0 = time.monotonic()
        with _silenced():
            if job.get("recipe") is not None:
                tensors = merged_tensors(job["recipe"], self.store, int(self.setup["seed"]), self.device)
            else:
                tensors = whole_model(job["model"], self.store)
        self._load(tensors)
        split = job.get("split", "search")
        scores = self.tasks.score(self.model, split, bool(job.get("every_metric")))
        out = {"index": job["index"], "scores": scores, "seconds": round(time.monotonic() - t0, 3), "worker": self.name}
        if split == "search":
            out["score"] = fitness(self.setup["tasks"], scores)
        return out

    def _load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Copy the tensors into the model's parameters (converted to its dtype)."""
        sd = self.model.state_dict()
        extra = sorted(set(tensors) - set(sd))
        if extra:
            raise MergeError(
                f"the merged model has tensor {extra[0]} that {self.setup['skeleton']} does not; "
                "evolve merges models of one architecture and size"
            )
        missing = [n for n in sd if n not in tensors and not _tied(self.model, n)]
        if missing:
            raise MergeError(f"the merged model lacks tensor {missing[0]} of {self.setup['skeleton']}")
        with torch.no_grad():
            for name, t in tensors.items():
                sd[name].copy_(t)


def _tied(model, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


@contextlib.contextmanager
def _silenced():
    """Recipe warnings were shown once, before the search: a candidate's merge repeats none of them."""
    log = logging.getLogger("mergesmith")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
