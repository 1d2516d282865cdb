"""`mergesmith demo`: merge the bundled tiny family with the Stellar Odyssey recipe and show what the merge kept."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

from mergesmith.skills import SKILLS

COMPARE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "della", "della_linear")


def data_dir() -> Path:
    return Path(__file__).resolve().parent / "data"


def tiny_dir() -> Path:
    return data_dir() / "tiny"


def recipe_path() -> Path:
    """The seed recipe with only the model paths changed (examples/stellar-odyssey-tiny.yml links here)."""
    return data_dir() / "stellar-odyssey-tiny.yml"


def method_recipes() -> Dict[str, Path]:
    """One example recipe per method beyond the task-arithmetic family (examples/methods links here)."""
    return {p.stem: p for p in sorted((data_dir() / "methods").glob("*.yml"))}


def _variant(method: str, out: Path) -> Path:
    """The demo recipe with another merge method (same weights and densities)."""
    from mergesmith.methods import get_method
    from mergesmith.recipe import load_recipe

    r = load_recipe(recipe_path())
    c = r.config.model_copy(deep=True)
    c.merge_method = method
    if get_method(method).base_policy == "ignored":  # no base, and none of the seed recipe's global parameters
        c.base_model = None
        c.parameters = None
    c.models = [m.model_copy(update={"model": str((recipe_path().parent / m.model).resolve())}) for m in c.models]
    if c.base_model:
        c.base_model = str((recipe_path().parent / c.base_model).resolve())
    r.config = c
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(r.to_yaml())
    return out


def run_demo(
    out_dir: Path, compare: bool = False, seed: int = 1, quiet: bool = False, all_methods: bool = False
) -> Dict[str, object]:
    import logging

    from mergesmith.api import MergeOptions, merge
    from mergesmith.evaluate import evaluate, format_table, recovered

    if not (tiny_dir() / "base" / "model.safetensors").exists():
        from mergesmith.errors import MergeError

        raise MergeError(
            f"the bundled tiny models are missing from {tiny_dir()} (train them with examples/train_tiny_family.py)"
        )
    out_dir = Path(out_dir)
    methods = list(COMPARE_METHODS) if (compare or all_methods) else ["della_linear"]
    examples = method_recipes() if all_methods else {}
    methods += list(examples)
    merges: List[tuple] = []
    times: Dict[str, float] = {}
    log = logging.getLogger("mergesmith")
    level = log.level
    log.setLevel(logging.ERROR)  # the variant recipes carry keys some methods do not use
    try:
        for m in methods:
            recipe = (
                recipe_path()
                if m == "della_linear"
                else examples[m]
                if m in examples
                else _variant(m, out_dir / "recipes" / f"{m}.yml")
            )
            t0 = time.monotonic()
            merge(recipe, out_dir / m, MergeOptions(seed=seed, progress=False, overwrite=True))
            times[m] = time.monotonic() - t0
            merges.append((m, out_dir / m))
        if compare:
            times["moe"] = moe_row(out_dir, seed, merges)
    finally:
        log.setLevel(level)
    names = ["base", *SKILLS] + [m for m, _ in merges]
    paths = [tiny_dir() / "base", *(tiny_dir() / s for s in SKILLS)] + [p for _, p in merges]
    results = evaluate(paths, names)
    by = {r["name"]: r for r in results}
    experts = {s: by[s] for s in SKILLS}
    extra: Dict[str, Dict[str, str]] = {}
    for m, _ in merges:
        rec = recovered(by[m], by["base"], experts)
        by[m]["recovered"] = rec
        extra[m] = {"recovered": f"{rec:.0%}" if rec is not None else "-", "time": f"{times[m]:.1f} s"}
    if "moe" in by:
        by["moe"]["routing"] = routing_accuracy(out_dir / "moe")
        extra["moe"]["routing"] = "/".join(f"{v:.0%}" for v in by["moe"]["routing"].values())
    return {"models": results, "table": format_table(results, extra)}


MOE_PROMPTS = 100  # training chats per skill for the routers


def moe_recipe(out: Path, base: Path, seed: int) -> Path:
    """The MoE of the demo: the three fine-tunes' MLPs as experts, two per token (a little better than one:
    docs/moe.md), routers calibrated on chats of the training split (the held-out prompts only measure the
    routing). The attention comes from `base`: the tiny family learned its skills in attention as much as in the
    MLPs (docs/moe.md)."""
    import yaml

    from mergesmith.skills import eval_set, training_examples

    experts = [
        {
            "source_model": str(tiny_dir() / s),
            "positive_prompts": [{"prompt": p, "answer": a} for p, a in training_examples(s, MOE_PROMPTS, seed)],
            "eval_prompts": [{"prompt": p, "answer": a} for p, a in eval_set(s)],
        }
        for s in SKILLS
    ]
    recipe = {
        "base_model": str(base),
        "architecture": "mixtral",
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "calibrate": True,
        "experts": experts,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return out


def moe_row(out_dir: Path, seed: int, merges: List[tuple]) -> float:
    """Build the demo MoE on the linear merge's attention (built first by --compare); returns the seconds."""
    from mergesmith.moe import build_moe

    t0 = time.monotonic()
    recipe = moe_recipe(out_dir / "recipes" / "moe.yml", out_dir / "linear", seed)
    build_moe(str(recipe), str(out_dir / "moe"), seed=seed, quiet=True, overwrite=True)
    merges.append(("moe", out_dir / "moe"))
    return time.monotonic() - t0


def routing_accuracy(folder: Path) -> Dict[str, float]:
    """Per skill, the share of its held-out answer tokens whose top-1 expert is its own (routing_report.json)."""
    import json

    rep = json.loads((folder / "routing_report.json").read_text(encoding="utf-8"))
    return {s: e["top1_share"] for s, e in zip(SKILLS, rep["experts"])}
