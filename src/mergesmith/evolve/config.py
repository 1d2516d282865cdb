"""mergekit-evolve's configuration file, checked before any worker starts: every problem is one MergeError line that
names the file and the key.

    genome:
      models: [path, ...]          # the models whose weights and densities are searched
      merge_method: ties           # any method with a per-model weight
      base_model: path             # where the method needs one
      layer_granularity: 2         # layers per group (0: one group)
      normalize: true              # default: on for linear, ties, dare_ties
      allow_negative_weights: false
      filters: [self_attn, mlp]    # one parameter set per tensor-name substring, one for the rest
      smooth: false                # per-layer gradients instead of one slice per group
      parameters: {epsilon: 0.05}  # mergesmith: fixed global method parameters
      dtype: bfloat16              # mergesmith: the recipes' dtype
    tasks:
      - name: tiny:addition        # a skill of the bundled tiny family
      - name: my-task              # JSONL split files of {"prompt", "answer", "skill"}
        search: search.jsonl
        heldout: heldout.jsonl
        metric: exact_match
        weight: 2
      - name: arc_easy_train       # anything else: an lm-evaluation-harness task
        metric: acc,none
    limit: 32                      # prompts (or lm-eval documents) per task in the search split
    score: sum                     # mergesmith: sum (mergekit-evolve's: weight x metric summed over the tasks) or gap

`score: gap` (needs genome.base_model) scores the base model and every input model on the search split before the
search, and sums weight x (v - base) / (best input - base) instead (perplexity as -ln(perplexity)): each task counts
by the share of its base-to-best-input gap a candidate closes, not by its absolute headroom; a task with no positive
gap counts its raw metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from mergesmith.errors import MergeError, did_you_mean

GENOME_KEYS = (
    "models",
    "merge_method",
    "base_model",
    "tokenizer_source",
    "layer_granularity",
    "normalize",
    "allow_negative_weights",
    "filters",
    "smooth",
    "parameters",
    "dtype",
)
TOP_KEYS = (
    "genome",
    "tasks",
    "limit",
    "num_fewshot",
    "shuffle",
    "random_init",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "score",
)
SCORES = ("sum", "gap")
TASK_KEYS = ("name", "weight", "metric", "search", "heldout")
OWN_METRICS = ("token_accuracy", "exact_match", "perplexity")
DTYPES = ("bfloat16", "float16", "float32")
# mergekit-evolve's guard: searching against a benchmark's test set games the benchmark
BENCHMARK_PREFIXES = (
    "mmlu",
    "hendrycks",
    "agieval",
    "gsm8k",
    "hellaswag",
    "winogrande",
    "arc_",
    "ai2_arc",
    "truthfulqa",
    "bigbench",
    "piqa",
    "openbookqa",
    "leaderboard",
)


@dataclass(frozen=True)
class TaskConfig:
    name: str
    kind: str  # "tiny", "jsonl" or "lm_eval"
    weight: float = 1.0
    metric: str = "token_accuracy"
    search: Sequence[Path] = ()
    heldout: Sequence[Path] = ()
    heldout_task: Optional[str] = None  # lm-eval: the task that scores the held-out split


@dataclass(frozen=True)
class EvolveConfig:
    path: Path
    genome: Dict[str, Any]
    tasks: Sequence[TaskConfig]
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    score: str = "sum"
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


def _fail(path: Path, key: str, what: str) -> MergeError:
    return MergeError(f"{path}: {key}: {what}")


def _check_keys(path: Path, where: str, data: Dict[str, Any], known: Sequence[str]) -> None:
    for k in data:
        if k not in known:
            raise _fail(path, f"{where}{k}", f"unknown key{did_you_mean(k, known)}; known: {', '.join(known)}")


def _read(path: Path) -> Dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"cannot read evolve config {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeError(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: an evolve config is a YAML mapping with 'genome:' and 'tasks:'")
    return data


def _bool(path: Path, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail(path, key, f"{v!r}: give true or false")
    return v


def _count(path: Path, key: str, v: Any, least: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise _fail(path, key, f"{v!r}: give a whole number of at least {least}")
    return v


def _check_genome(path: Path, g: Any) -> Dict[str, Any]:
    from mergesmith.evolve.genome import searched_params
    from mergesmith.methods import METHODS

    if not isinstance(g, dict):
        raise _fail(path, "genome", "a mapping with models:, merge_method: and the search's settings")
    _check_keys(path, "genome.", g, GENOME_KEYS)
    models = g.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise _fail(path, "genome.models", "give a list of model paths or Hub ids (at least one)")
    if len(set(models)) != len(models):
        raise _fail(path, "genome.models", "a model is listed twice")
    method = g.get("merge_method")
    searchable = sorted(m for m in METHODS if searched_params(m))
    if not isinstance(method, str) or method not in METHODS or not searched_params(method):
        raise _fail(
            path,
            "genome.merge_method",
            f"{method!r} is not a method evolve can search"
            f"{did_you_mean(str(method), searchable)}; use one with per-model weights: {', '.join(searchable)}",
        )
    _check_genome_settings(path, g)
    return dict(g)


def _check_genome_settings(path: Path, g: Dict[str, Any]) -> None:
    """The genome's settings besides its models and method: types and values."""
    for key in ("base_model", "tokenizer_source"):
        if g.get(key) is not None and not (isinstance(g[key], str) and g[key]):
            raise _fail(path, f"genome.{key}", "give a model path or Hub id")
    _count(path, "genome.layer_granularity", g.get("layer_granularity", 0), 0)
    for key in ("allow_negative_weights", "smooth"):
        _bool(path, f"genome.{key}", g.get(key, False))
    if g.get("normalize") is not None:
        _bool(path, "genome.normalize", g["normalize"])
    filters = g.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
        raise _fail(path, "genome.filters", "give a list of tensor-name substrings (like self_attn, mlp)")
    if not isinstance(g.get("parameters", {}) or {}, dict):
        raise _fail(path, "genome.parameters", "give a mapping of global method parameters (like epsilon: 0.05)")
    if g.get("dtype", "bfloat16") not in DTYPES:
        raise _fail(path, "genome.dtype", f"{g.get('dtype')!r}: use {', '.join(DTYPES)}")


def _paths(path: Path, key: str, v: Any) -> List[Path]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(p, str) and p for p in items):
        raise _fail(path, key, "give a JSONL file or a list of them")
    return [(path.parent / p) if not Path(p).is_absolute() else Path(p) for p in items]


def _weight(path: Path, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _fail(path, key, f"{v!r}: a task weight is a number of at least 0")
    return float(v)


def _task(path: Path, i: int, t: Any) -> TaskConfig:
    from mergesmith.skills import SKILLS

    key = f"tasks[{i}]"
    if isinstance(t, str):
        t = {"name": t}
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
        raise _fail(path, key, "give a task name, or a mapping with name: (and weight:, metric:, search:, heldout:)")
    _check_keys(path, f"{key}.", t, TASK_KEYS)
    name, weight = t["name"], _weight(path, f"{key}.weight", t.get("weight", 1.0))
    if name.startswith("tiny:"):
        if name[5:] not in SKILLS:
            raise _fail(
                path,
                f"{key}.name",
                f"{name!r}: the tiny family's skills are "
                f"{', '.join('tiny:' + s for s in SKILLS)}{did_you_mean(name, ['tiny:' + s for s in SKILLS])}",
            )
        return TaskConfig(name, "tiny", weight, _own_metric(path, key, t))
    if "search" in t:
        held = _paths(path, f"{key}.heldout", t["heldout"]) if t.get("heldout") is not None else []
        return TaskConfig(
            name, "jsonl", weight, _own_metric(path, key, t), _paths(path, f"{key}.search", t["search"]), held
        )
    metric = t.get("metric", "acc,none")
    held = t.get("heldout")
    if not isinstance(metric, str) or (held is not None and not isinstance(held, str)):
        raise _fail(path, key, "an lm-eval task's metric (like acc,none) and heldout (a task name) are strings")
    return TaskConfig(name, "lm_eval", weight, metric, heldout_task=held)


def _own_metric(path: Path, key: str, t: Dict[str, Any]) -> str:
    m = t.get("metric", "token_accuracy")
    if m not in OWN_METRICS:
        raise _fail(
            path,
            f"{key}.metric",
            f"{m!r}: a prompt/answer task is scored by {', '.join(OWN_METRICS)}{did_you_mean(str(m), OWN_METRICS)}",
        )
    return m


def _score(path: Path, v: Any, genome: Dict[str, Any]) -> str:
    """`score:`: sum or gap; gap measures each task's gap from the base model, so it needs one."""
    if v not in SCORES:
        raise _fail(path, "score", f"{v!r}: use {' or '.join(SCORES)}{did_you_mean(str(v), SCORES)}")
    if v == "gap" and not genome.get("base_model"):
        raise _fail(path, "score", "gap measures each task from the base model: give genome.base_model (or score: sum)")
    return v


def check_benchmarks(config: EvolveConfig, allow: bool) -> None:
    """mergekit-evolve's refusal to optimize against common benchmarks (their `_train` variants are fine)."""
    for t in config.tasks:
        if t.kind == "lm_eval" and t.name.startswith(BENCHMARK_PREFIXES) and not t.name.endswith("_train"):
            if not allow:
                raise MergeError(
                    f"{config.path}: task {t.name} is a common benchmark: searching against it games "
                    "the benchmark; pass --i-understand-the-depths-of-the-evils-i-am-unleashing to do it "
                    "anyway"
                )


def load_config(path: Path) -> EvolveConfig:
    """The checked configuration (MergeError on the first problem)."""
    path = Path(path)
    data = _read(path)
    _check_keys(path, "", data, TOP_KEYS)
    if "genome" not in data:
        raise _fail(path, "genome", "missing: give the models and merge_method to search")
    genome = _check_genome(path, data["genome"])
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _fail(path, "tasks", "no tasks: give at least one (like - name: tiny:addition)")
    parsed = [_task(path, i, t) for i, t in enumerate(tasks)]
    if len({t.name for t in parsed}) != len(parsed):
        raise _fail(path, "tasks", "a task is listed twice")
    if not any(t.weight > 0 for t in parsed):
        raise _fail(path, "tasks", "every task weight is 0: give at least one a positive weight")
    limit = data.get("limit")
    if limit is not None:
        _count(path, "limit", limit, 1)
    if data.get("num_fewshot") is not None:
        _count(path, "num_fewshot", data["num_fewshot"], 0)
    score = _score(path, data.get("score", "sum"), genome)
    flags = {
        k: _bool(path, k, data[k])
        for k in ("shuffle", "random_init", "apply_chat_template", "fewshot_as_multiturn")
        if k in data
    }
    return EvolveConfig(
        path=path,
        genome=genome,
        tasks=tuple(parsed),
        limit=limit,
        num_fewshot=data.get("num_fewshot"),
        score=score,
        raw=data,
        **flags,
    )
