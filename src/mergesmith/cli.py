"""The `mergesmith` command line (thin: parsing, then calls into mergesmith.api and the other modules)."""

from __future__ import annotations

import gc
import logging
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import click

from mergesmith.errors import MergeError
from mergesmith.version import __version__


def _flag(name: str, default: bool, help: str, hidden: bool = False, short: str = ""):
    """A --name/--no-name switch, as mergekit-yaml gives every boolean option."""
    decls = [f"--{name}/--no-{name}"] + ([short] if short else [])
    return click.option(*decls, default=default, show_default=True, hidden=hidden, help=help)


# mergekit-yaml 0.1.5's options (mergekit/options.py), each with its meaning there, and mergesmith's own.
_COMMON_PLAN_OPTIONS = [
    click.option(
        "--seed",
        "--random-seed",
        "seed",
        type=int,
        default=None,
        help="Seed for randomized methods (dare, della); chosen and recorded when omitted.",
    ),
    click.option("--dtype", default=None, help="Override the recipe's dtype (bfloat16, float16, float32)."),
    click.option("--out-dtype", default=None, help="Override the recipe's out_dtype."),
    click.option(
        "--out-shard-size",
        default="5B",
        show_default=True,
        help="Most tensor bytes per output shard: a count as mergekit takes it (5B, 500M: its writer "
        "compares it with bytes, so the shards are mergekit's) or bytes (2GB, 2GiB).",
    ),
    _flag("allow-crimes", False, "Merge models of different architectures anyway."),
    _flag(
        "unsafe-truncate-embeddings",
        False,
        "Vocabularies of different sizes and no tokenizer setting: merge row for row in the first model's size "
        "(assumes the same token ids; tokenizer_source: in the recipe is the safe way).",
    ),
    _flag(
        "allow-extrapolation",
        False,
        "Accept parameters beyond interpolation, as mergekit does (slerp t outside [0, 1], negative "
        "nuslerp/multislerp weights).",
    ),
    click.option(
        "--gradient-span",
        type=click.Choice(["slice", "output"]),
        default="slice",
        show_default=True,
        help="Evaluate layer gradients over each slice's layers (mergekit) or over the whole output.",
    ),
    _flag("strict", False, "Refuse unknown recipe keys and NaN/Inf inputs instead of warning."),
    click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cpu, or cuda with --cuda)."),
    _flag("cuda", False, "Compute on the GPU: --device cuda, unless --device says otherwise."),
    click.option(
        "--gpu-rich",
        is_flag=True,
        help="mergekit's alias for --cuda --low-cpu-memory --read-to-gpu --multi-gpu: --device cuda.",
    ),
    _flag("multi-gpu", False, "Compute on a GPU (--device cuda unless --device says otherwise); mergesmith uses one."),
    click.option(
        "--threads",
        "-j",
        "--num-threads",
        "threads",
        type=int,
        default=None,
        help="Torch threads (default: all cores).",
    ),
    _flag("copy-tokenizer", True, "Give the output the tokenizer."),
    _flag("write-model-card", True, "Give the output a README.md model card."),
    _flag("quiet", False, "No progress bar and no summary line.", short="-q"),
    click.option("-v", "--verbose", "verbose", count=True, help="Show tracebacks and debug logging."),
    _flag("trust-remote-code", False, "Accepted: mergesmith never runs code that comes with a model.", hidden=True),
    _flag("safe-serialization", True, "Accepted: mergesmith writes only safetensors.", hidden=True),
    click.option(
        "--transformers-cache",
        default=None,
        hidden=True,
        help="Not used: Hub models are found in the Hugging Face cache (set HF_HUB_CACHE).",
    ),
    click.option(
        "--lora-merge-dtype",
        default=None,
        hidden=True,
        help="Accepted: adapters are applied in float32 while reading, with no rounding.",
    ),
    click.option(
        "--write-threads",
        type=int,
        default=1,
        hidden=True,
        help="Accepted: each tensor is written as soon as it is computed.",
    ),
    # mergekit's options that change nothing here (mergesmith streams row blocks, reads lazily, writes safetensors
    # in place and never shares tensors between output names): accepted, silently
    *[
        _flag(name, False, "Accepted for mergekit-yaml's command lines; changes nothing.", hidden=True)
        for name in ("lazy-unpickle", "low-cpu-memory", "clone-tensors", "read-to-gpu", "async-write")
    ],
    click.option(
        "--lora-merge-cache",
        default=None,
        hidden=True,
        help="Accepted: adapters are applied while reading, no merged copy is stored.",
    ),
]

# mergekit's options that only say how mergekit works: nothing to do, nothing to say.
_NO_EFFECT = ("lazy_unpickle", "low_cpu_memory", "clone_tensors", "read_to_gpu", "async_write", "lora_merge_cache")


def _plan_options(f):
    for opt in reversed(_COMMON_PLAN_OPTIONS):
        f = opt(f)
    return f


def _merge_options(kw: dict) -> dict:
    """mergekit-yaml's options mapped to MergeOptions fields; notes for those that cannot mean here what they
    mean there."""
    from mergesmith.errors import warn
    from mergesmith.recipe import DTYPES

    for name in _NO_EFFECT:
        kw.pop(name)
    if kw.pop("write_threads") < 1:
        raise MergeError(
            "option --write-threads: give at least 1 (it changes nothing here: each tensor is written "
            "as soon as it is computed)"
        )
    gpu = kw.pop("cuda") | kw.pop("gpu_rich") | kw.pop("multi_gpu")
    kw["device"] = kw["device"] or ("cuda" if gpu else "cpu")  # mergekit: --device wins over --cuda
    if kw.pop("trust_remote_code"):
        warn("--trust-remote-code changes nothing: mergesmith never runs code that comes with a model")
    if not kw.pop("safe_serialization"):
        warn("--no-safe-serialization changes nothing: mergesmith writes only safetensors, never pickles")
    if kw.pop("transformers_cache") is not None:
        warn(
            "--transformers-cache is not used: mergesmith finds Hub models in the Hugging Face cache; set "
            "HF_HUB_CACHE to that folder instead"
        )
    dtype = kw.pop("lora_merge_dtype")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"option --lora-merge-dtype {dtype!r}: not a dtype; use bfloat16, float16 or float32")
    return kw


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
def plan_cmd(recipe, verbose, quiet, **options):
    """Validate RECIPE and print what a run would do, without merging. A multi-stage RECIPE (several YAML
    documents) lists its stages in run order."""
    from mergesmith import stages
    from mergesmith.api import MergeOptions, describe, plan_merge

    from mergesmith.moe import is_moe_recipe, plan_text

    o = MergeOptions(**_merge_options(options))
    if is_moe_recipe(recipe):  # a mergekit-moe recipe: what `mergesmith moe` would build
        click.echo(plan_text(recipe, strict=o.strict))
    elif stages.is_multi_stage(recipe):
        click.echo(stages.describe_pipeline(Path(recipe), o, plan_merge))
    else:
        click.echo(describe(plan_merge(Path(recipe), o)))  # "tensors: N in K file(s)": K shards


@cli.command("run")
@click.argument("recipe", type=click.Path())
@click.argument("out_dir", type=click.Path())
@_plan_options
@_flag("overwrite", False, "Replace an OUT_DIR that mergesmith wrote (never another folder).")
@_flag("restart", False, "Discard an interrupted run's OUT_DIR.partial/ instead of resuming.")
@click.option(
    "--intermediate-dir",
    "-I",
    default=None,
    type=click.Path(),
    help="Multi-stage recipes: where the named stages go (default: OUT_DIR.stages/).",
)
@click.option(
    "--lazy/--no-lazy",
    default=True,
    show_default=True,
    help="Multi-stage recipes: skip a stage whose finished output is current.",
)
def run_cmd(recipe, out_dir, verbose, quiet, **options):
    """Merge the models of RECIPE into the Hugging Face model folder OUT_DIR. A multi-stage RECIPE (several YAML
    documents, as mergekit-multi takes) merges every stage, the output stage into OUT_DIR."""
    from mergesmith.api import MergeOptions, merge
    from mergesmith.moe import is_moe_recipe

    kw = _merge_options(options)
    if is_moe_recipe(recipe):  # a mergekit-moe recipe (experts:, no merge_method:)
        return _moe(
            recipe,
            out_dir,
            device=kw["device"],
            seed=kw["seed"],
            out_shard_size=kw["out_shard_size"],
            overwrite=kw["overwrite"],
            restart=kw["restart"],
            quiet=quiet,
            copy_tokenizer=kw["copy_tokenizer"],
            write_model_card=kw["write_model_card"],
            strict=kw["strict"],
            dtype=kw["out_dtype"] or kw["dtype"],
        )
    # the options' names are the flags' names (MergeOptions)
    o = MergeOptions(progress=not quiet, tune_allocator=True, **kw)
    res = merge(Path(recipe), out_dir, o)
    if not quiet:
        click.echo(
            f"wrote {out_dir}: {res.tensors} tensors, {res.bytes_written / 1e6:.1f} MB in "
            f"{len(res.plan.layout.files)} file(s), {res.seconds:.1f} s"
            + (f"; seed {res.seed}" if res.plan.method.randomized else ""),
            err=True,
        )


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
@click.option(
    "--model",
    "models",
    multiple=True,
    help="An input model; repeat in recipe order (default: the models of MERGED's recipe copy).",
)
@click.option(
    "--by",
    type=click.Choice(["layer", "module", "tensor"]),
    default="layer",
    show_default=True,
    help="One row per layer (plus embeddings, head & norm), per module kind, or per tensor.",
)
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
    report = inspection.inspect_merge(
        idx, open_model(base) if base else None, [open_model(m) for m in models], by=by, progress=not as_json
    )
    names = inspection.labels(models)
    report["inputs"] = dict(zip(names, models))
    report["base"] = base
    if plot:
        try:
            Path(plot).write_text(
                inspection.svg_plot(report, names, f"{folder.name}: what the merge did"), encoding="utf-8"
            )
        except OSError as e:
            raise MergeError(f"cannot write {plot}: {e.strerror}") from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"{folder}: base {base or '(none: inputs compared as they are)'}; inputs "
            + ", ".join(f"{n} = {m}" for n, m in zip(names, models))
        )
        click.echo(inspection.format_table(report, names))
        if plot:
            click.echo(f"chart: {plot}")


@cli.command("methods")
def methods_cmd():
    """List the merge methods with their parameters."""
    from mergesmith.methods import METHODS

    bases = {
        "required": "base_model required",
        "optional": "base_model optional (merges task vectors)",
        "input": "base_model, if given, is one more input",
        "ignored": "no base_model",
    }
    for m in METHODS.values():
        click.echo(f"{m.name:18s} {m.description}  [{m.url}]")
        n = (
            f"exactly {m.min_inputs}"
            if m.max_inputs == m.min_inputs
            else f"{m.min_inputs}+"
            if m.max_inputs is None
            else f"{m.min_inputs}-{m.max_inputs}"
        )
        extra = ("; randomized (seeded)" if m.randomized else "") + ("" if m.builtin else "; plugin")
        click.echo(f"    {bases[m.base_policy]}; {n} other model(s){extra}")
        for prm in m.params:
            default = "required" if prm.required else f"default {prm.default}"
            scope = "per model" if prm.scope != "shared" else "global"
            limits = (f" (one of {', '.join(prm.choices)})" if prm.choices else "") + (
                f" (in {prm.range})" if prm.range else ""
            )
            click.echo(f"    {prm.name:14s} {prm.kind.__name__:5s} {scope:9s} {default:14s} {prm.doc}{limits}")


@cli.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option(
    "--tasks",
    type=click.Path(),
    default=None,
    help='JSONL of {"prompt", "answer"[, "skill"]} (default: the tiny family\'s held-out skills).',
)
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
@click.option(
    "--out", "out_dir", default="out/demo", show_default=True, type=click.Path(), help="Where the merged folders go."
)
@click.option(
    "--compare",
    is_flag=True,
    help="Also merge with linear, task_arithmetic, ties, dare_linear, della, "
    "and build a mixture of the experts (docs/moe.md).",
)
@click.option(
    "--all-methods",
    "all_methods",
    is_flag=True,
    help="Merge with every method: the --compare set plus the example recipe of each other method (examples/methods/).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-v", "--verbose", is_flag=True)
def demo_cmd(out_dir, compare, all_methods, seed, as_json, verbose):
    """Merge the bundled tiny models with the Stellar Odyssey recipe and print what each model can do."""
    import json

    from mergesmith.demo import recipe_path, run_demo

    if not as_json:
        click.echo(
            f"merging the bundled tiny models with {recipe_path().name} (della_linear"
            f"{' and every other method' if all_methods else ' and five other methods' if compare else ''}"
            f") into {out_dir}/ ...",
            err=True,
        )
    result = run_demo(Path(out_dir), compare=compare, seed=seed, all_methods=all_methods)
    if as_json:
        click.echo(json.dumps({"models": result["models"]}, indent=2))
    else:
        click.echo(result["table"])
        click.echo(
            "\nexact match: greedy answer equals the truth; answer-token accuracy: next answer token right "
            "given the prompt and the answer so far;\nrecovered: mean over skills of (merge - base) / "
            "(expert - base) in answer-token accuracy."
        )
        click.echo(
            f"\nwhat the merge did, layer by layer: mergesmith inspect {Path(out_dir) / 'della_linear'} "
            f"--plot {Path(out_dir) / 'della_linear.svg'}"
        )


@cli.command("extract-lora")
@click.argument("out_dir", required=False, type=click.Path())
@click.option("--out-path", "out_path", type=click.Path(), default=None, help="OUT_DIR, by mergekit's name.")
@click.option(
    "--model",
    "model",
    required=True,
    help="The fine-tuned (or merged) model: a folder or Hub id (`model+adapter` applies a LoRA first).",
)
@click.option("--base", "--base-model", "base", required=True, help="The model it was made from.")
@click.option(
    "--rank", "--max-rank", "rank", type=int, default=128, show_default=True, help="LoRA rank: the most per module."
)
@click.option(
    "--energy",
    type=float,
    default=None,
    help="Per module, the smallest rank keeping this share of the delta's squared singular values.",
)
@click.option(
    "--sv-epsilon",
    type=float,
    default=0.0,
    show_default=True,
    help="Drop singular values at or below this (absolute, as mergekit).",
)
@click.option(
    "--embed-lora/--no-embed-lora",
    default=False,
    show_default=True,
    help="LoRA for the embeddings and the head instead of saving them whole in modules_to_save.",
)
@click.option(
    "--save-module",
    "save_modules",
    multiple=True,
    help="Save this module whole (modules_to_save; PEFT takes every module whose name ends with it). Repeatable.",
)
@click.option(
    "-i",
    "--include-regex",
    "include",
    multiple=True,
    help="Extract only modules whose name matches (re.search). Repeatable.",
)
@click.option(
    "-e",
    "--exclude-regex",
    "exclude",
    multiple=True,
    help="Leave out modules whose name matches (re.search). Repeatable.",
)
@click.option(
    "--skip-undecomposable",
    is_flag=True,
    help="Leave out norms and other modules LoRA cannot hold, instead of saving them whole.",
)
@click.option(
    "--distribute-scale/--no-distribute-scale",
    default=True,
    show_default=True,
    help="Split the singular values as sqrt(S) into A and B (else all into B).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="dtype of the saved LoRA factors (tensors saved whole keep their own).",
)
@click.option("--device", default=None, help="Where the SVDs run: cpu, cuda or auto.")
@click.option("--cuda/--no-cuda", default=False, help="Same as --device cuda.")
@click.option(
    "--lora-merge-cache",
    default=None,
    help="Accepted for mergekit; not needed: an adapter on --model or --base is applied while reading.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if mergesmith wrote it (never another folder).")
@click.option("-v", "--verbose", is_flag=True)
def extract_lora_cmd(
    out_dir,
    out_path,
    model,
    base,
    rank,
    energy,
    sv_epsilon,
    embed_lora,
    save_modules,
    include,
    exclude,
    skip_undecomposable,
    distribute_scale,
    dtype,
    device,
    cuda,
    lora_merge_cache,
    overwrite,
    verbose,
):
    """Write a PEFT LoRA adapter to OUT_DIR (or --out-path) approximating MODEL - BASE: a truncated SVD per linear
    weight; embeddings, head and norms saved whole (modules_to_save), as mergekit-extract-lora does."""
    import torch

    from mergesmith.errors import warn
    from mergesmith.lora import ExtractOptions, extract_lora

    if out_dir and out_path and Path(out_dir) != Path(out_path):
        raise MergeError(f"OUT_DIR {out_dir} and --out-path {out_path} differ; give the output folder once")
    if not (out_dir or out_path):
        raise MergeError("no output folder: give OUT_DIR or --out-path")
    out = Path(out_dir or out_path)
    opts = ExtractOptions(
        rank=rank,
        energy=energy,
        sv_epsilon=sv_epsilon,
        embed_lora=embed_lora,
        save_modules=tuple(save_modules),
        include=tuple(include),
        exclude=tuple(exclude),
        skip_undecomposable=skip_undecomposable,
        distribute_scale=distribute_scale,
        dtype=getattr(torch, dtype),
        device="cuda" if cuda else device or "cpu",
    )
    t0 = time.monotonic()
    res = extract_lora(model, base, out, overwrite=overwrite, options=opts)
    errs = sorted(res.errors.values())
    click.echo(
        f"wrote {out}: {len(res.modules)} LoRA modules, rank {min(res.modules.values())}-"
        f"{max(res.modules.values())} (relative error median {errs[len(errs) // 2]:.2e}, max {errs[-1]:.2e}), "
        f"{len(res.saved)} tensors saved whole; relative error of the whole delta {res.delta_error:.3f}, "
        f"{time.monotonic() - t0:.1f} s",
        err=True,
    )
    if res.left_out:
        warn(
            f"{len(res.left_out)} tensor(s) differ but the adapter does not hold them (filtered out, skipped, or "
            f"a bias of a LoRA module; --save-module keeps a module whole): {', '.join(res.left_out[:4])}"
            f"{' ...' if len(res.left_out) > 4 else ''}"
        )


def _moe(recipe: str, out_dir: str, **kw) -> None:
    from mergesmith.moe import build_moe, format_report

    b = build_moe(recipe, out_dir, **kw)
    p = b.plan
    if b.report is not None and not kw.get("quiet"):
        click.echo(format_report(b.report), err=True)
    if not kw.get("quiet"):
        click.echo(
            f"wrote {out_dir}: {p.family.name} of {len(p.recipe.config.experts)} experts, {len(p.tensors)} "
            f"tensors, {p.bytes_written / 1e6:.1f} MB in {len(p.layout.files)} file(s), {b.seconds:.1f} s; "
            f"seed {p.seed}",
            err=True,
        )


@cli.command("moe")
@click.argument("recipe", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option(
    "--calibrate",
    is_flag=True,
    help="Fit each layer's router on the positive prompts (logistic regression) instead of mergekit's mean vectors.",
)
@click.option(
    "--i-understand-this-is-not-useful-without-training",
    "allow_all_same",
    is_flag=True,
    help="Build even when every expert is the same model (for training afterwards).",
)
@click.option("--load-in-4bit", is_flag=True, help="Accepted for mergekit-moe compatibility (see the warning).")
@click.option("--load-in-8bit", is_flag=True, help="Accepted for mergekit-moe compatibility (see the warning).")
@click.option("--device", default="cpu", show_default=True, help="Where the router prompts run: cpu, cuda or auto.")
@click.option("--cuda", is_flag=True, help="Same as --device cuda.")
@click.option(
    "--seed",
    "--random-seed",
    "seed",
    type=int,
    default=None,
    help="Seed for random gates and expert noise; chosen and recorded when omitted.",
)
@click.option("--out-shard-size", default="5GB", show_default=True, help="Maximum bytes per output shard.")
@click.option("--overwrite", is_flag=True, help="Replace an OUT_DIR that mergesmith wrote (never another folder).")
@click.option("--restart", is_flag=True, help="Discard an interrupted build's OUT_DIR.partial/ instead of resuming.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or report.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True)
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True)
@click.option("--no-report", is_flag=True, help="Skip the routing report (routing_report.json).")
@click.option("--strict", is_flag=True, help="Refuse unknown recipe keys and NaN/Inf inputs instead of warning.")
@click.option("--lazy-unpickle", is_flag=True, hidden=True, help="Accepted for mergekit compatibility (no-op).")
@click.option("--transformers-cache", default=None, hidden=True)
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug logging.")
def moe_cmd(
    recipe,
    out_dir,
    calibrate,
    allow_all_same,
    load_in_4bit,
    load_in_8bit,
    device,
    cuda,
    seed,
    out_shard_size,
    overwrite,
    restart,
    quiet,
    copy_tokenizer,
    write_model_card,
    no_report,
    strict,
    lazy_unpickle,
    transformers_cache,
    verbose,
):
    """Build a mixture of experts from dense fine-tunes of one base (a mergekit-moe recipe) into OUT_DIR."""
    from mergesmith.errors import warn

    if load_in_4bit or load_in_8bit:
        warn(
            "--load-in-4bit/--load-in-8bit: mergesmith runs the router prompts in float32 and writes the "
            "recipe's dtype; it does not quantize"
        )
    _moe(
        recipe,
        out_dir,
        device="cuda" if cuda else device,
        seed=seed,
        calibrate=calibrate,
        allow_all_same=allow_all_same,
        out_shard_size=out_shard_size,
        overwrite=overwrite,
        restart=restart,
        quiet=quiet,
        copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card,
        strict=strict,
        report=not no_report,
    )


@cli.command("evolve")
@click.argument("config", type=click.Path())
@click.option(
    "--storage",
    "--storage-path",
    "storage",
    required=True,
    type=click.Path(),
    help="Folder for the journal, best.yml, report.json and scores.svg (a rerun resumes from it).",
)
@click.option("--max-fevals", type=int, default=100, show_default=True, help="Candidates to score.")
@click.option(
    "--random-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seeds the search and randomized merge methods: the same seed gives the same journal.",
)
@click.option("--sigma0", type=float, default=1 / 6, show_default=True, help="CMA-ES's initial step size.")
@click.option(
    "--strategy",
    "-s",
    type=click.Choice(["cma", "random", "grid", "pool", "buffered", "serial"]),
    default="cma",
    show_default=True,
    help="How candidates are chosen (pool/buffered/serial: cma).",
)
@click.option("--grid-levels", type=int, default=3, show_default=True, help="Values per gene for --strategy grid.")
@click.option("--force-population-size", "popsize", type=int, default=None, help="CMA-ES population size.")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Workers (default: this machine's cores, or the cluster's CPUs); 1 without --ray-address: "
    "no Ray, this process.",
)
@click.option(
    "--ray-address", default=None, help="Join this Ray cluster (ray start --head ...) instead of a local one."
)
@click.option("--num-gpus", type=float, default=0, help="GPUs for the workers, shared among them.")
@click.option("--device", default="cpu", show_default=True, help="Where workers merge and score: cpu, cuda or auto.")
@click.option("--threads", type=int, default=1, show_default=True, help="Torch threads per worker.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Prompts per forward pass.")
@click.option("--timeout", type=float, default=None, help="Stop asking for candidates after this many seconds.")
@click.option("--task-search-path", multiple=True, help="A folder of lm-eval task YAMLs (repeatable).")
@click.option(
    "--i-understand-the-depths-of-the-evils-i-am-unleashing",
    "allow_benchmark_tasks",
    is_flag=True,
    help="Allow common benchmarks as search tasks.",
)
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
def evolve_cmd(
    config,
    storage,
    strategy,
    quiet,
    merge_best,
    overwrite,
    task_search_path,
    vllm,
    load_in_8bit,
    load_in_4bit,
    trust_remote_code,
    use_wandb,
    in_memory,
    merge_cuda,
    reshard,
    verbose,
    **options,
):
    """Search for the merge recipe of CONFIG (mergekit-evolve's genome and tasks) with CMA-ES, on workers that
    merge and score candidates in memory; writes STORAGE/best.yml. See docs/evolve.md."""
    from mergesmith.evolve.command import evolve_command, refuse_unsupported, strategy_name
    from mergesmith.evolve.search import EvolveOptions

    refuse_unsupported(vllm, load_in_8bit, load_in_4bit, trust_remote_code, use_wandb)
    opts = EvolveOptions(
        storage=Path(storage),
        strategy=strategy_name(strategy),
        progress=not quiet,
        task_search_path=tuple(task_search_path),
        **options,
    )
    evolve_command(config, opts, merge_best, overwrite, quiet)


def entry() -> None:
    """The `mergesmith` command."""
    main()


def _import_torch(args: list) -> None:
    """Import torch before a command runs, with the cyclic collector off, and freeze what the import made.

    torch's import makes a few hundred thousand objects that live as long as the process: collections during the
    import, and the collection at interpreter exit, walk them all for nothing (about 0.8 s of every command on a
    2-core machine). gc.freeze is process-wide, so this is only for a process that the command line started."""
    if not args or args[0] not in cli.commands or {"-h", "--help"} & set(args):
        return
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def main(argv: Optional[list] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or any(re.fullmatch(r"-v+", a) for a in args)
    _setup_logging(verbose)
    try:
        if argv is None:
            _import_torch(args)
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
        click.echo(
            f"internal error: {type(e).__name__}: {e} (this is a mergesmith bug; rerun with -v for the traceback)",
            err=True,
        )
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
