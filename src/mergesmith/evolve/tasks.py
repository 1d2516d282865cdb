"""What a candidate is scored on: prompt/answer tasks (the tiny family's skills, JSONL split files) scored like
`mergesmith eval`, and lm-evaluation-harness tasks (optional extra) run on the in-memory model.

The driver reads every split once (`task_specs`) and hands plain data to the workers, so a worker on another node
needs the models but not the task files. The search only ever sees the search split; the held-out split is scored
at the end.
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, List, Optional, Sequence

from mergesmith.errors import MergeError
from mergesmith.evolve.config import EvolveConfig, TaskConfig

# the tiny family's search split: training pairs drawn with this seed (never a held-out prompt)
TINY_SEARCH_SEED = 7011
TINY_SEARCH_N = 40
SPLITS = ("search", "heldout")


def _rows(tasks) -> List[List[str]]:
    return [[t.skill, t.prompt, t.answer] for t in tasks]


def _jsonl(paths) -> List[List[str]]:
    from mergesmith.evaluate import load_tasks

    rows: List[List[str]] = []
    for p in paths:
        rows += _rows(load_tasks(p))
    return rows


def _cut(rows: List[List[str]], limit: Optional[int], shuffle: bool, seed: int) -> List[List[str]]:
    if shuffle:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows


def _own_splits(t: TaskConfig, config: EvolveConfig, seed: int) -> Dict[str, Any]:
    from mergesmith.evaluate import Task
    from mergesmith.skills import eval_set, training_examples

    if t.kind == "tiny":
        skill = t.name[5:]
        search = _rows(
            Task(skill, p, a) for p, a in training_examples(skill, config.limit or TINY_SEARCH_N, TINY_SEARCH_SEED)
        )
        return {"search": search, "heldout": _rows(Task(skill, p, a) for p, a in eval_set(skill))}
    search = _cut(_jsonl(t.search), config.limit, config.shuffle, seed)
    held = _jsonl(t.heldout) if t.heldout else None
    if held is not None and {r[1] for r in held} & {r[1] for r in search}:
        raise MergeError(
            f"{config.path}: task {t.name}: a held-out prompt is also in the search split; held-out "
            "prompts must be ones the search never sees"
        )
    return {"search": search, "heldout": held}


def task_specs(config: EvolveConfig, seed: int, search_path: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Every task as plain data for the workers, its split files read and checked now (MergeError)."""
    specs = []
    lm_tasks = [t for t in config.tasks if t.kind == "lm_eval"]
    if lm_tasks:
        check_lm_eval([n for t in lm_tasks for n in (t.name, t.heldout_task) if n], search_path, config)
    for t in config.tasks:
        spec: Dict[str, Any] = {"name": t.name, "kind": t.kind, "weight": t.weight, "metric": t.metric}
        if t.kind == "lm_eval":
            spec["lm_eval"] = {
                "task": t.name,
                "heldout_task": t.heldout_task,
                "include_path": list(search_path),
                "limit": config.limit,
                "num_fewshot": config.num_fewshot,
                "apply_chat_template": config.apply_chat_template,
                "fewshot_as_multiturn": config.fewshot_as_multiturn,
                "seed": seed,
            }
        else:
            spec.update(_own_splits(t, config, seed))
        specs.append(spec)
    return specs


def check_lm_eval(names: Sequence[str], search_path: Sequence[str], config: EvolveConfig) -> None:
    """lm-eval is installed and knows every task (a typo is caught before any worker starts)."""
    try:
        from mergesmith.evolve.lmeval import task_manager
    except ImportError:
        raise MergeError(
            f"{config.path}: task {names[0]} is an lm-evaluation-harness task, and lm-eval is not "
            "installed: pip install 'mergesmith[evolve]' (or name a tiny: or JSONL task)"
        ) from None
    known = set(task_manager(search_path).all_tasks)
    for n in names:
        if n not in known:
            from mergesmith.errors import did_you_mean

            raise MergeError(
                f"{config.path}: task {n!r}: neither tiny:SKILL, a task with search: files, nor an "
                f"lm-eval task{did_you_mean(n, known)}; add its folder with --task-search-path"
            )


def value(spec: Dict[str, Any], scores: Dict[str, Dict[str, Any]]) -> float:
    """A task's metric where higher is better: perplexity counts as -ln(perplexity)."""
    v = scores[spec["name"]][spec["metric"]]
    return -math.log(v) if spec["metric"] == "perplexity" else v


def gap_share(
    spec: Dict[str, Any],
    scores: Dict[str, Dict[str, Any]],
    base: Dict[str, Dict[str, Any]],
    inputs: Sequence[Dict[str, Dict[str, Any]]],
) -> Optional[float]:
    """(v - base) / (best input - base) for one task, in `value`'s terms: the share of the gap from the base model to
    the best input model that `scores` closes. None when a side lacks the task or the gap is not positive."""
    name = spec["name"]
    tops = [value(spec, i) for i in inputs if name in i]
    if name not in scores or name not in base or not tops or not max(tops) > value(spec, base):
        return None
    return (value(spec, scores) - value(spec, base)) / (max(tops) - value(spec, base))


def fitness(
    specs: Sequence[Dict[str, Any]], scores: Dict[str, Dict[str, Any]], baseline: Optional[Dict[str, Any]] = None
) -> float:
    """Sum over the tasks of weight x `value` (mergekit-evolve's score; perplexity as -ln(perplexity), so that higher
    is better for every metric). With `baseline` ({"base": scores, "models": {path: scores}} of the input models,
    `score: gap`), each task's term is its `gap_share` instead, or its value where it has no positive gap."""
    total = 0.0
    for s in specs:
        share = gap_share(s, scores, baseline["base"], list(baseline["models"].values())) if baseline else None
        total += s["weight"] * (value(s, scores) if share is None else share)
    return total


class TaskSet:
    """The tasks of one worker, encoded once for its tokenizer."""

    def __init__(self, specs: Sequence[Dict[str, Any]], tok, batch: int = 64):
        from mergesmith.evaluate import Task, encode

        self.specs, self.tok, self.batch = list(specs), tok, batch
        self.encoded = {
            (s["name"], split): encode(tok, [Task(*r) for r in s[split]])
            for s in self.specs
            if s["kind"] != "lm_eval"
            for split in SPLITS
            if s.get(split)
        }
        self._lm = None

    def score(self, model, split: str, every_metric: bool) -> Dict[str, Dict[str, Any]]:
        """{task: {metric: value, "by_skill": {...}}} on one split; the search split scores only each task's metric,
        `every_metric` all three (the final report). Tasks without this split are left out."""
        out: Dict[str, Dict[str, Any]] = {}
        for s in self.specs:
            if s["kind"] == "lm_eval":
                got = self._lm_eval(model, s, split)
            elif (s["name"], split) in self.encoded:
                got = self._own(model, self.encoded[(s["name"], split)], s["metric"], every_metric)
            else:
                got = None
            if got is not None:
                out[s["name"]] = got
        return out

    def _own(self, model, encoded, metric: str, every_metric: bool) -> Dict[str, Any]:
        from mergesmith.evaluate import exact_match_encoded, teacher_forced

        by_skill: Dict[str, Dict[str, float]] = {}
        if every_metric or metric != "exact_match":
            by_skill = teacher_forced(model, self.tok, encoded, self.batch)
        if every_metric or metric == "exact_match":
            for skill, v in exact_match_encoded(model, self.tok, encoded, self.batch).items():
                by_skill.setdefault(skill, {})["exact_match"] = v
        names = sorted({m for v in by_skill.values() for m in v})
        # a task's value is the mean over its skills (each skill counts the same, however many prompts it has)
        out: Dict[str, Any] = {m: sum(v[m] for v in by_skill.values()) / len(by_skill) for m in names}
        out["by_skill"] = by_skill
        return out

    def _lm_eval(self, model, spec: Dict[str, Any], split: str) -> Optional[Dict[str, Any]]:
        from mergesmith.evolve.lmeval import run_task

        cfg = spec["lm_eval"]
        name = cfg["task"] if split == "search" else cfg["heldout_task"]
        if not name:
            return None
        if self._lm is None:
            from mergesmith.evolve.lmeval import wrap

            self._lm = wrap(model, self.tok, self.batch)
        results = run_task(self._lm, name, cfg)
        if spec["metric"] not in results:
            raise MergeError(
                f"lm-eval task {name} has no metric {spec['metric']!r}; it reports "
                f"{', '.join(sorted(k for k in results if k != 'alias'))}"
            )
        return {
            spec["metric"]: float(results[spec["metric"]]),
            **{k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        }
