"""lm-evaluation-harness tasks on the worker's in-memory model (`pip install 'mergesmith[evolve]'`).

The model object is wrapped once (lm-eval's HFLM takes a loaded model); each candidate's weights are copied into
it, so lm-eval sees every candidate without a folder being written. Seeds are fixed: a candidate's score depends on
its recipe only.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Sequence

import lm_eval
from lm_eval.tasks import TaskManager


def task_manager(search_path: Sequence[str]) -> TaskManager:
    """lm-eval's tasks, with the folders of --task-search-path."""
    return TaskManager(include_path=list(search_path) or None)


def wrap(model, tok, batch: int):
    """lm-eval's view of the model (on the model's own device)."""
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch, device=str(next(model.parameters()).device))


def run_task(lm, name: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """lm-eval's results for one task: {"acc,none": ..., ...}."""
    seed = int(cfg.get("seed") or 0)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[name],
        limit=cfg.get("limit"),
        num_fewshot=cfg.get("num_fewshot"),
        task_manager=task_manager(cfg.get("include_path") or ()),
        apply_chat_template=bool(cfg.get("apply_chat_template")) and bool(getattr(lm.tokenizer, "chat_template", None)),
        fewshot_as_multiturn=bool(cfg.get("fewshot_as_multiturn")) and bool(cfg.get("apply_chat_template")),
        log_samples=False,
        bootstrap_iters=0,
        verbosity="ERROR",
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return dict(res["results"][name])
