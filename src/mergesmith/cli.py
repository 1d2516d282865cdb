"""The `mergesmith` command line (thin: parsing, then calls into mergesmith.api and the other modules)."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import click

from mergesmith.errors import MergeError
from mergesmith.version import __version__

_COMMON_PLAN_OPTIONS = [
    click.option("--seed", "--random-seed", "seed", type=int, default=None,
                 help="Seed for randomized methods (dare, della); chosen and recorded when omitted."),
    click.option("--dtype", default=None, help="Override the recipe's dtype (bfloat16, float16, float32)."),
    click.option("--out-dtype", default=None, help="Override the recipe's out_dtype."),
    click.option("--out-shard-size", default="5GB", show_default=True, help="Maximum bytes per output shard."),
    click.option("--allow-crimes", is_flag=True, help="Merge models of different architectures anyway."),
    click.option("--allow-extrapolation", is_flag=True,
                 help="Accept parameters beyond interpolation, as mergekit does (slerp t outside [0, 1], "
                      "negative nuslerp/multislerp weights)."),
    click.option("--gradient-span", type=click.Choice(["slice", "output"]), default="slice", show_default=True,
                 help="Evaluate layer gradients over each slice's layers (mergekit) or over the whole output."),
    click.option("--strict", is_flag=True, help="Refuse unknown recipe keys and NaN/Inf inputs instead of warning."),
    click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug logging."),
]


def _plan_options(f):
    for opt in reversed(_COMMON_PLAN_OPTIONS):
        f = opt(f)
    return f


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        click.echo(prefix + record.getMessage(), err=True)


def _setup_logging(verbose: bool) -> None:
    log = logging.getLogger("mergesmith")
    log.handlers[:] = [_Handler()]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergesmith")
def cli() -> None:
    """Merge language-model weights from mergekit-style YAML recipes."""


@cli.command("plan")
@click.argument("recipe", type=click.Path())
@_plan_options
def plan_cmd(recipe, verbose, **options):
    """Validate RECIPE and print what a run would do, without merging."""
    from mergesmith.api import MergeOptions, describe, plan_merge

    click.echo(describe(plan_merge(Path(recipe), MergeOptions(**options))))


@cli.command("run")
@click.argument("recipe", type=click.Path())
@click.argument("out_dir", type=click.Path())
@_plan_options
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--cuda", is_flag=True, help="Same as --device cuda (mergekit-yaml's flag).")
@click.option("--threads", type=int, default=None, help="Torch threads (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an OUT_DIR that mergesmith wrote (never another folder).")
@click.option("--restart", is_flag=True, help="Discard an interrupted run's OUT_DIR.partial/ instead of resuming.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True)
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True)
@click.option("--lazy-unpickle", is_flag=True, hidden=True, help="Accepted for mergekit compatibility (no-op).")
@click.option("--lora-merge-cache", default=None, hidden=True)
@click.option("--transformers-cache", default=None, hidden=True)
def run_cmd(recipe, out_dir, verbose, cuda, quiet, lazy_unpickle, lora_merge_cache, transformers_cache, **options):
    """Merge the models of RECIPE into the Hugging Face model folder OUT_DIR."""
    from mergesmith.api import MergeOptions, merge

    if cuda:
        options["device"] = "cuda"
    # the options' names are the flags' names (MergeOptions)
    res = merge(Path(recipe), out_dir, MergeOptions(progress=not quiet, tune_allocator=True, **options))
    if not quiet:
        click.echo(f"wrote {out_dir}: {res.tensors} tensors, {res.bytes_written / 1e6:.1f} MB in "
                   f"{len(res.plan.layout.files)} file(s), {res.seconds:.1f} s"
                   + (f"; seed {res.seed}" if res.plan.method.randomized else ""), err=True)


@cli.command("verify")
@click.argument("out_dir", type=click.Path())
@click.option("--no-load", is_flag=True, help="Skip loading the model with transformers (large models).")
@click.option("-v", "--verbose", is_flag=True)
def verify_cmd(out_dir, no_load, verbose):
    """Check a merged folder: index and shards agree, tensors read back finite, shapes match config.json,
    the tokenizer loads, and the model loads and runs a forward pass."""
    from mergesmith.verify import verify_folder

    for line in verify_folder(Path(out_dir), load=not no_load):
        click.echo(line)


@cli.command("inspect")
@click.argument("merged", type=click.Path())
@click.option("--base", default=None, help="The base model (default: the base_model of MERGED's recipe copy).")
@click.option("--model", "models", multiple=True,
              help="An input model; repeat in recipe order (default: the models of MERGED's recipe copy).")
@click.option("--by", type=click.Choice(["layer", "module", "tensor"]), default="layer", show_default=True,
              help="One row per layer (plus embeddings, head & norm), per module kind, or per tensor.")
@click.option("--plot", type=click.Path(), default=None, help="Also write an SVG chart of the rows.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-v", "--verbose", is_flag=True)
def inspect_cmd(merged, base, models, by, plot, as_json, verbose):
    """Show what a merge did: per layer, how far it moved from the base and each input's effective weight (a
    least-squares fit of the merge's change by the inputs' task vectors). Works on mergekit's outputs too."""
    import json

    from mergesmith import inspection
    from mergesmith.io.index import index_model
    from mergesmith.plan import load_model

    folder = Path(merged)
    if not folder.is_dir():
        raise MergeError(f"merged model folder not found: {merged}")
    resolved, source = {}, "--model"
    if not models:
        base_ref, refs, resolved, source = inspection.recipe_inputs(folder)
        base = base if base is not None else base_ref
        models = tuple(refs)
    if not models:
        raise MergeError(f"{folder}: no input models to compare with; pass --model (and --base)")

    def open_model(ref: str):
        return load_model(ref, str(folder / source) if source != "--model" else "--model", folder, resolved.get(ref))

    idx = index_model("merged", folder)
    report = inspection.inspect_merge(idx, open_model(base) if base else None, [open_model(m) for m in models],
                                      by=by, progress=not as_json)
    names = inspection.labels(models)
    report["inputs"] = dict(zip(names, models))
    report["base"] = base
    if plot:
        try:
            Path(plot).write_text(inspection.svg_plot(report, names, f"{folder.name}: what the merge did"),
                                  encoding="utf-8")
        except OSError as e:
            raise MergeError(f"cannot write {plot}: {e.strerror}") from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{folder}: base {base or '(none: inputs compared as they are)'}; inputs "
                   + ", ".join(f"{n} = {m}" for n, m in zip(names, models)))
        click.echo(inspection.format_table(report, names))
        if plot:
            click.echo(f"chart: {plot}")


@cli.command("methods")
def methods_cmd():
    """List the merge methods with their parameters."""
    from mergesmith.methods import METHODS

    bases = {"required": "base_model required", "optional": "base_model optional (merges task vectors)",
             "input": "base_model, if given, is one more input", "ignored": "no base_model"}
    for m in METHODS.values():
        click.echo(f"{m.name:18s} {m.description}  [{m.url}]")
        n = (f"exactly {m.min_inputs}" if m.max_inputs == m.min_inputs else f"{m.min_inputs}+"
             if m.max_inputs is None else f"{m.min_inputs}-{m.max_inputs}")
        extra = ("; randomized (seeded)" if m.randomized else "") + ("" if m.builtin else "; plugin")
        click.echo(f"    {bases[m.base_policy]}; {n} other model(s){extra}")
        for prm in m.params:
            default = "required" if prm.required else f"default {prm.default}"
            scope = "per model" if prm.scope != "shared" else "global"
            limits = (f" (one of {', '.join(prm.choices)})" if prm.choices else "") + \
                (f" (in {prm.range})" if prm.range else "")
            click.echo(f"    {prm.name:14s} {prm.kind.__name__:5s} {scope:9s} {default:14s} {prm.doc}{limits}")


@cli.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--tasks", type=click.Path(), default=None,
              help='JSONL of {"prompt", "answer"[, "skill"]} (default: the tiny family\'s held-out skills).')
@click.option("--text", type=click.Path(), default=None, help="Text file for perplexity (default: held-out docs).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-v", "--verbose", is_flag=True)
def eval_cmd(models, tasks, text, as_json, verbose):
    """Score MODEL folders: exact match, answer-token accuracy per skill, perplexity."""
    import json

    from mergesmith.evaluate import evaluate, format_table, load_tasks

    task_list = load_tasks(Path(tasks)) if tasks else None
    body = None
    if text:
        try:
            body = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MergeError(f"cannot read text file {text}: {e}") from None
    for m in models:
        if not Path(m).is_dir():
            raise MergeError(f"model folder not found: {m}")
    results = evaluate([Path(m) for m in models], tasks=task_list, text=body)
    click.echo(json.dumps({"models": results}, indent=2) if as_json else format_table(results))


@cli.command("demo")
@click.option("--out", "out_dir", default="out/demo", show_default=True, type=click.Path(),
              help="Where the merged folders go.")
@click.option("--compare", is_flag=True, help="Also merge with linear, task_arithmetic, ties, dare_linear, della.")
@click.option("--all-methods", "all_methods", is_flag=True,
              help="Merge with every method: the --compare set plus the example recipe of each other method "
                   "(examples/methods/).")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-v", "--verbose", is_flag=True)
def demo_cmd(out_dir, compare, all_methods, seed, as_json, verbose):
    """Merge the bundled tiny models with the Stellar Odyssey recipe and print what each model can do."""
    import json

    from mergesmith.demo import recipe_path, run_demo

    if not as_json:
        click.echo(f"merging the bundled tiny models with {recipe_path().name} (della_linear"
                   f"{' and every other method' if all_methods else ' and five other methods' if compare else ''}"
                   f") into {out_dir}/ ...", err=True)
    result = run_demo(Path(out_dir), compare=compare, seed=seed, all_methods=all_methods)
    if as_json:
        click.echo(json.dumps({"models": result["models"]}, indent=2))
    else:
        click.echo(result["table"])
        click.echo("\nexact match: greedy answer equals the truth; answer-token accuracy: next answer token right "
                   "given the prompt and the answer so far;\nrecovered: mean over skills of (merge - base) / "
                   "(expert - base) in answer-token accuracy.")
        click.echo(f"\nwhat the merge did, layer by layer: mergesmith inspect {Path(out_dir) / 'della_linear'} "
                   f"--plot {Path(out_dir) / 'della_linear.svg'}")


@cli.command("extract-lora")
@click.argument("out_dir", type=click.Path())
@click.option("--model", "model", required=True, help="The fine-tuned (or merged) model: a folder or Hub id.")
@click.option("--base", "base", required=True, help="The model it was made from.")
@click.option("--rank", type=int, required=True, help="LoRA rank (the most, with --energy).")
@click.option("--energy", type=float, default=None,
              help="Per tensor, the smallest rank keeping this share of the delta's squared singular values.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="dtype of the saved factors.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if mergesmith wrote it (never another folder).")
@click.option("-v", "--verbose", is_flag=True)
def extract_lora_cmd(out_dir, model, base, rank, energy, dtype, overwrite, verbose):
    """Write a PEFT LoRA adapter to OUT_DIR approximating MODEL - BASE (truncated SVD per linear weight)."""
    import torch

    from mergesmith.lora import extract_lora

    out = Path(out_dir)
    t0 = time.monotonic()
    res = extract_lora(model, base, out, rank, energy, dtype=getattr(torch, dtype), overwrite=overwrite)
    errs = sorted(res.errors.values())
    click.echo(f"wrote {out}: {len(res.modules)} modules, rank {min(res.modules.values())}-{max(res.modules.values())}, "
               f"relative error median {errs[len(errs) // 2]:.2e}, max {errs[-1]:.2e}, "
               f"{time.monotonic() - t0:.1f} s", err=True)
    if res.left_out:
        from mergesmith.errors import warn

        warn(f"{len(res.left_out)} tensor(s) differ but are not linear weights, so the adapter does not hold them "
             f"(norms, embeddings, head): {', '.join(res.left_out[:4])}{' ...' if len(res.left_out) > 4 else ''}")


@cli.command("evolve")
@click.argument("config", type=click.Path())
@click.option("--storage", "--storage-path", "storage", required=True, type=click.Path(),
              help="Folder for the journal, best.yml, report.json and scores.svg (a rerun resumes from it).")
@click.option("--max-fevals", type=int, default=100, show_default=True, help="Candidates to score.")
@click.option("--random-seed", type=int, default=0, show_default=True,
              help="Seeds the search and randomized merge methods: the same seed gives the same journal.")
@click.option("--sigma0", type=float, default=1 / 6, show_default=True, help="CMA-ES's initial step size.")
@click.option("--strategy", "-s", type=click.Choice(["cma", "random", "grid", "pool", "buffered", "serial"]),
              default="cma", show_default=True, help="How candidates are chosen (pool/buffered/serial: cma).")
@click.option("--grid-levels", type=int, default=3, show_default=True, help="Values per gene for --strategy grid.")
@click.option("--force-population-size", "popsize", type=int, default=None, help="CMA-ES population size.")
@click.option("--workers", type=int, default=None,
              help="Workers (default: this machine's cores, or the cluster's CPUs); 1 without --ray-address: "
                   "no Ray, this process.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (ray start --head ...) instead of a local one.")
@click.option("--num-gpus", type=float, default=0, help="GPUs for the workers, shared among them.")
@click.option("--device", default="cpu", show_default=True, help="Where workers merge and score: cpu, cuda or auto.")
@click.option("--threads", type=int, default=1, show_default=True, help="Torch threads per worker.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Prompts per forward pass.")
@click.option("--timeout", type=float, default=None, help="Stop asking for candidates after this many seconds.")
@click.option("--task-search-path", multiple=True, help="A folder of lm-eval task YAMLs (repeatable).")
@click.option("--i-understand-the-depths-of-the-evils-i-am-unleashing", "allow_benchmark_tasks", is_flag=True,
              help="Allow common benchmarks as search tasks.")
@click.option("--restart", is_flag=True, help="Discard the storage folder's journal and search again.")
@click.option("--merge-best", type=click.Path(), default=None, help="Also merge the best recipe into this folder.")
@click.option("--overwrite", is_flag=True, help="With --merge-best: replace a folder mergesmith wrote.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line or table.")
@click.option("--in-memory/--no-in-memory", default=True, hidden=True, help="Always in memory (accepted).")
@click.option("--vllm/--no-vllm", default=False, hidden=True)
@click.option("--load-in-8bit", is_flag=True, hidden=True)
@click.option("--load-in-4bit", is_flag=True, hidden=True)
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, hidden=True)
@click.option("--wandb/--no-wandb", "use_wandb", default=False, hidden=True)
@click.option("--merge-cuda/--no-merge-cuda", default=False, hidden=True, help="Accepted (see --device).")
@click.option("--reshard/--no-reshard", default=False, hidden=True, help="Accepted (inputs are read once anyway).")
@click.option("-v", "--verbose", is_flag=True)
def evolve_cmd(config, storage, strategy, quiet, merge_best, overwrite, task_search_path, vllm, load_in_8bit,
               load_in_4bit, trust_remote_code, use_wandb, in_memory, merge_cuda, reshard, verbose, **options):
    """Search for the merge recipe of CONFIG (mergekit-evolve's genome and tasks) with CMA-ES, on workers that
    merge and score candidates in memory; writes STORAGE/best.yml. See docs/evolve.md."""
    from mergesmith.evolve.command import evolve_command, refuse_unsupported, strategy_name
    from mergesmith.evolve.search import EvolveOptions

    refuse_unsupported(vllm, load_in_8bit, load_in_4bit, trust_remote_code, use_wandb)
    opts = EvolveOptions(storage=Path(storage), strategy=strategy_name(strategy), progress=not quiet,
                         task_search_path=tuple(task_search_path), **options)
    evolve_command(config, opts, merge_best, overwrite, quiet)


def entry() -> None:
    """The `mergesmith` command."""
    main()


def main(argv: Optional[list] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args or "--verbose" in args
    _setup_logging(verbose)
    try:
        rc = cli.main(args=args, prog_name="mergesmith", standalone_mode=False)
    except MergeError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - our bug: short line, traceback with -v
        if verbose:
            traceback.print_exc()
        click.echo(f"internal error: {type(e).__name__}: {e} (this is a mergesmith bug; rerun with -v for the "
                   "traceback)", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
