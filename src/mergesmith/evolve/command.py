"""What `mergesmith evolve` prints and does after the search (the command line itself stays in mergesmith.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from mergesmith.errors import MergeError, warn
from mergesmith.evolve.search import EvolveOptions, run_evolve

# mergekit-evolve's scheduling strategies: scoring here is always a pool of workers fed as they finish
SCHEDULING = ("pool", "buffered", "serial")


def refuse_unsupported(
    vllm: bool, load_in_8bit: bool, load_in_4bit: bool, trust_remote_code: bool, use_wandb: bool
) -> None:
    """mergekit-evolve options with no counterpart: refused in one line rather than ignored."""
    for on, flag, why in (
        (vllm, "--vllm", "candidates are scored with transformers on the in-memory model"),
        (
            load_in_8bit or load_in_4bit,
            "--load-in-8bit/--load-in-4bit",
            "candidates are scored at the merge's precision",
        ),
        (trust_remote_code, "--trust-remote-code", "mergesmith never runs code that came with a model"),
        (use_wandb, "--wandb", "the journal (STORAGE/journal.jsonl) and report.json hold every score"),
    ):
        if on:
            raise MergeError(f"{flag} is not supported: {why}")


def strategy_name(strategy: str) -> str:
    if strategy in SCHEDULING:
        warn(
            f"--strategy {strategy} is mergekit-evolve's scheduling; candidates go to workers as they finish "
            "here, searched with cma"
        )
        return "cma"
    return strategy


def evolve_command(
    config: str, options: EvolveOptions, merge_best: Optional[str], overwrite: bool, quiet: bool
) -> None:
    """Run (or resume) the search, print the report, and merge the best recipe into a folder when asked."""
    report = run_evolve(Path(config), options)
    if report.get("table") and not quiet:
        click.echo(report["table"])
        click.echo(
            f"\nbest recipe: {report['best_yml']}; journal, report.json and scores.svg beside it "
            f"({report['evaluations']} evaluations, {report['workers']} worker(s))"
        )
    if merge_best:
        from mergesmith.api import MergeOptions, merge

        res = merge(
            Path(report["best_yml"]),
            merge_best,
            MergeOptions(seed=options.random_seed, overwrite=overwrite, progress=not quiet),
        )
        click.echo(f"wrote {res.path}: the best recipe merged ({res.tensors} tensors)", err=True)
