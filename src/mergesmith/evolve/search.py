"""The driver: check everything, start the workers, ask the strategy for candidates, journal their scores in
candidate order, and finish with best.yml, a report and a plot in the storage folder."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from mergesmith.errors import MergeError, log
from mergesmith.evolve.config import EvolveConfig, check_benchmarks, load_config
from mergesmith.evolve.genome import Genome
from mergesmith.evolve.journal import Journal, digest
from mergesmith.evolve.strategy import STRATEGIES, make_strategy
from mergesmith.evolve.tasks import fitness

OUR_FILES = ("journal.jsonl", "best.yml", "report.json", "scores.svg")


@dataclass(frozen=True)
class EvolveOptions:
    """`mergesmith evolve`'s options (mergekit-evolve's names where they mean the same)."""

    storage: Path
    max_fevals: int = 100
    random_seed: int = 0
    sigma0: float = 1 / 6
    strategy: str = "cma"
    grid_levels: int = 3
    popsize: Optional[int] = None  # --force-population-size
    workers: Optional[int] = None  # None: this machine's cores (local Ray), or the cluster's CPUs
    ray_address: Optional[str] = None
    num_gpus: float = 0
    device: str = "cpu"
    threads: int = 1  # torch threads per worker: the same on every worker keeps scores identical
    batch_size: int = 64
    timeout: Optional[float] = None
    task_search_path: Tuple[str, ...] = ()
    allow_benchmark_tasks: bool = False
    restart: bool = False
    report: bool = True
    progress: bool = True


def check_options(o: EvolveOptions) -> None:
    def bad(flag: str, v: Any, what: str) -> MergeError:
        return MergeError(f"{flag} {v!r}: {what}")

    if o.max_fevals < 1:
        raise bad("--max-fevals", o.max_fevals, "give at least 1")
    if o.random_seed < 0:
        raise bad("--random-seed", o.random_seed, "give a whole number of at least 0")
    if not (o.sigma0 > 0 and math.isfinite(o.sigma0)):
        raise bad("--sigma0", o.sigma0, "give a positive number")
    if o.strategy not in STRATEGIES:
        raise bad("--strategy", o.strategy, f"use {', '.join(STRATEGIES)}")
    if o.popsize is not None and o.popsize < 2:
        raise bad("--force-population-size", o.popsize, "give at least 2")
    if o.workers is not None and o.workers < 1:
        raise bad("--workers", o.workers, "give at least 1")
    if o.grid_levels < 2:
        raise bad("--grid-levels", o.grid_levels, "give at least 2")
    if o.threads < 1 or o.batch_size < 1:
        raise bad("--threads/--batch-size", (o.threads, o.batch_size), "give at least 1")
    if o.timeout is not None and not o.timeout > 0:
        raise bad("--timeout", o.timeout, "give a positive number of seconds")


# ----------------------------------------------------------------------------------------------- preparing


def _model_ref(ref: str, folder: Path) -> str:
    """A local folder as an absolute path (recipes then run from anywhere); a Hub id as it is."""
    local = ref if Path(ref).is_absolute() else folder / ref
    return str(Path(local).resolve()) if Path(local).exists() else ref


def make_genome(config: EvolveConfig) -> Genome:
    """The genome, its layer count read from the first model (MergeError when a model is missing)."""
    from mergesmith.methods import get_method
    from mergesmith.plan import load_model, model_layers

    g, folder = config.genome, config.path.parent
    models = [_model_ref(m, folder) for m in g["models"]]
    idx = load_model(models[0], f"{config.path}: genome.models[0]", folder)
    layers = model_layers(idx)
    gran = int(g.get("layer_granularity") or 0)
    if gran and layers % gran:
        raise MergeError(
            f"{config.path}: genome.layer_granularity: {gran} does not divide the {layers} layers of {g['models'][0]}"
        )
    method = get_method(g["merge_method"])
    shared = [p.name for p in method.params if p.scope == "shared"]
    eps = next((p.default for p in method.params if p.name == "epsilon"), None)
    eps = (g.get("parameters") or {}).get("epsilon", eps)
    return Genome(
        models=tuple(models),
        merge_method=g["merge_method"],
        num_layers=layers,
        base_model=_model_ref(g["base_model"], folder) if g.get("base_model") else None,
        tokenizer_source=g.get("tokenizer_source"),
        layer_granularity=gran,
        normalize=g.get("normalize"),
        allow_negative_weights=bool(g.get("allow_negative_weights")),
        filters=tuple(g.get("filters") or ()),
        smooth=bool(g.get("smooth")),
        parameters=dict(g.get("parameters") or {}),
        dtype=g.get("dtype", "bfloat16"),
        method_shared=tuple(shared),
        epsilon=float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None,
    )


@dataclass
class Prepared:
    config: EvolveConfig
    genome: Genome
    x0: np.ndarray
    setup: Dict[str, Any]
    fingerprint: Dict[str, Any]


def prepare(config_path: Path, o: EvolveOptions) -> Prepared:
    """Everything checked before a worker starts: options, config, models, tasks, and the start recipe planned
    (so a recipe problem is the planner's one line, with its warnings shown once)."""
    from mergesmith.api import MergeOptions, plan_merge
    from mergesmith.evolve.tasks import task_specs

    check_options(o)
    config = load_config(Path(config_path))
    check_benchmarks(config, o.allow_benchmark_tasks)
    genome = make_genome(config)
    x0 = genome.initial()
    if config.random_init:
        x0 = np.random.default_rng([o.random_seed, 1]).uniform(0, 1, x0.size)
    plan = plan_merge(genome.recipe(x0), MergeOptions(seed=o.random_seed, device=o.device, copy_tokenizer=False))
    skeleton = genome.base_model or genome.models[0]
    from mergesmith.io.index import refuse_custom_code

    refuse_custom_code(Path(skeleton), "evolve")
    specs = task_specs(config, o.random_seed, o.task_search_path)
    setup = {
        "skeleton": skeleton,
        "tasks": specs,
        "seed": o.random_seed,
        "threads": o.threads,
        "device": o.device,
        "batch_size": o.batch_size,
    }
    fingerprint = {
        "config": digest(config.raw),
        "genome": digest(asdict(genome)),
        "tasks": digest(specs),
        "strategy": o.strategy,
        "random_seed": o.random_seed,
        "sigma0": o.sigma0,
        "popsize": o.popsize,
        "grid_levels": o.grid_levels if o.strategy == "grid" else None,
        "x0": digest(list(x0)),
        "threads": o.threads,
        "device": o.device,
    }
    if config.score != "sum":  # a default config's fingerprint (and journal) stays mergekit-evolve's
        fingerprint["score"] = config.score
    log.debug(f"start recipe: {len(plan.tasks)} tensors")
    return Prepared(config, genome, x0, setup, fingerprint)


def _clear(storage: Path) -> None:
    """--restart: our own files go, nothing else in the folder is touched."""
    for name in OUR_FILES:
        p = storage / name
        if p.is_file() and not p.is_symlink():
            p.unlink()


def _storage(path: Path, restart: bool) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MergeError(f"--storage {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergeError(f"cannot make --storage {path}: {e.strerror}") from None
    if restart:
        _clear(path)
    return path


# ----------------------------------------------------------------------------------------------- searching


class Progress:
    """One line on stderr: evaluations, best so far, candidates per minute."""

    def __init__(self, total: int, done: int, show: bool):
        self.total, self.start_done, self.show = total, done, show
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last = -1

    def update(self, done: int, best: Optional[Dict[str, Any]], end: bool = False) -> None:
        if not self.show or (end and not self.tty and done == self.last):
            return
        self.last = done
        minutes = (time.monotonic() - self.t0) / 60
        rate = (done - self.start_done) / minutes if minutes > 0 else 0.0
        b = f"best {best['score']:.4f} (#{best['index']})" if best else "best -"
        line = f"evaluations {done}/{self.total}, {b}, {rate:.1f} candidates/min"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if end else ""))
        elif end or done % 10 == 0:
            sys.stderr.write(line + "\n")
        else:
            self.last = -1
        sys.stderr.flush()


class _InOrder:
    """Writes results to the journal in candidate order, whatever order the workers finish in."""

    def __init__(
        self,
        journal: Journal,
        xs: Dict[int, np.ndarray],
        prep: Prepared,
        progress: Progress,
        baseline: Optional[Dict[str, Any]],
    ):
        self.journal, self.xs, self.genome, self.progress = journal, xs, prep.genome, progress
        self.specs, self.baseline = prep.setup["tasks"], baseline
        self.waiting: Dict[int, Dict[str, Any]] = {}

    def score(self, r: Dict[str, Any]) -> float:
        """The worker's score (mergekit-evolve's sum), or with `score: gap` the sum of the tasks' gap shares."""
        return r["score"] if self.baseline is None else fitness(self.specs, r["scores"], self.baseline)

    def __call__(self, r: Dict[str, Any]) -> None:
        self.waiting[r["index"]] = r
        while len(self.journal.entries) in self.waiting:
            i = len(self.journal.entries)
            r = self.waiting.pop(i)
            self.journal.add(
                {
                    "index": i,
                    "x": [float(v) for v in self.xs[i]],
                    "score": self.score(r),
                    "scores": r["scores"],
                    "recipe": self.genome.recipe(self.xs[i]),
                    "seconds": r["seconds"],
                    "worker": r["worker"],
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
            self.progress.update(len(self.journal.entries), self.journal.best())


def _replayed(journal: Journal, index: int, x: np.ndarray) -> Optional[float]:
    """The recorded score of candidate `index` (None: not scored yet); a recorded vector must be the one asked."""
    e = journal.get(index)
    if e is None:
        return None
    if not np.array_equal(np.asarray(e["x"], dtype=float), x):
        raise MergeError(
            f"{journal.path}: candidate {index} differs from the one this search asks for (another "
            "cma version?); use another --storage, or --restart"
        )
    return float(e["score"])


def search(prep: Prepared, o: EvolveOptions, journal: Journal, pool, baseline: Optional[Dict[str, Any]]) -> None:
    """Ask, score what the journal lacks, tell, until max_fevals (or the timeout); `baseline` is `score: gap`'s."""
    strat = make_strategy(o.strategy, prep.x0, o.sigma0, o.random_seed, o.popsize, o.grid_levels)
    progress = Progress(o.max_fevals, len(journal.entries), o.progress)
    t0, index = time.monotonic(), 0
    while index < o.max_fevals:
        if o.timeout and time.monotonic() - t0 > o.timeout:
            log.info(f"--timeout {o.timeout:g} s reached after {index} candidates")
            break
        xs = strat.ask()
        if not xs:
            break  # a grid that is done
        take = xs[: o.max_fevals - index]
        known = [_replayed(journal, index + k, x) for k, x in enumerate(take)]
        todo = [{"index": index + k, "recipe": prep.genome.recipe(x)} for k, x in enumerate(take) if known[k] is None]
        if todo:
            pool.run(todo, _InOrder(journal, {index + k: x for k, x in enumerate(take)}, prep, progress, baseline))
        if len(take) == len(xs):
            strat.tell(xs, [journal.get(index + k)["score"] for k in range(len(xs))])
        index += len(take)
    progress.update(len(journal.entries), journal.best(), end=True)


def start_journal(prep: Prepared, journal: Journal, pool) -> Optional[Dict[str, Any]]:
    """Writes a new journal's header; returns `score: gap`'s baseline (None for `score: sum`): the one recorded in
    the header on a resumed search, so it scores with the same numbers, else measured now, before any candidate."""
    from mergesmith.evolve.report import input_scores

    gap = prep.config.score == "gap"
    head = journal.head or journal.start({"baseline": input_scores(prep, pool)} if gap else {})
    if gap and not isinstance(head.get("baseline"), dict):
        raise MergeError(f"{journal.path}: its header lacks the baseline scores of score: gap; use --restart")
    return head.get("baseline") if gap else None


def write_best(storage: Path, best: Dict[str, Any], seed: int, randomized: bool) -> Path:
    import yaml

    head = f"# mergesmith evolve: candidate {best['index']}, search score {best['score']:.6f}\n" + (
        f"# seed: {seed}  (reproduce with: mergesmith run best.yml OUT_DIR --seed {seed}; "
        f"mergekit-yaml best.yml OUT_DIR --random-seed {seed})\n"
        if randomized
        else ""
    )
    path = storage / "best.yml"
    tmp = storage / ".best.yml.tmp"
    recipe = json.loads(json.dumps(best["recipe"]))  # plain data: no YAML anchors for shared lists
    tmp.write_text(head + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_evolve(config_path: Path, o: EvolveOptions) -> Dict[str, Any]:
    """The whole search (resumed from the journal when there is one); returns the report."""
    from mergesmith.evolve.pool import make_pool
    from mergesmith.evolve.report import final_report
    from mergesmith.methods import get_method

    prep = prepare(config_path, o)
    storage = _storage(o.storage, o.restart)
    journal = Journal(storage, prep.fingerprint)
    workers = o.workers or _default_workers(o)
    pool = make_pool(prep.setup, workers, o.ray_address, o.num_gpus)
    try:
        baseline = start_journal(prep, journal, pool)
        search(prep, o, journal, pool, baseline)
        best = journal.best()
        write_best(storage, best, o.random_seed, get_method(prep.genome.merge_method).randomized)
        report = final_report(prep, journal, pool, storage, baseline) if o.report else {}
    finally:
        pool.close()
    report["best_yml"] = str(storage / "best.yml")
    report["workers"] = getattr(pool, "workers", 1)
    return report


def _default_workers(o: EvolveOptions) -> Optional[int]:
    """A cluster: its CPUs (None); this machine: its cores, through Ray when Ray is installed, else 1."""
    if o.ray_address:
        return None
    try:
        import ray  # noqa: F401
    except ImportError:
        return 1
    return os.cpu_count() or 1
