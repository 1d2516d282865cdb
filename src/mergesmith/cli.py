"""The `mergesmith` command line (thin: parsing, then calls into recipe/plan/execute/folder)."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import click

from mergesmith import __version__
from mergesmith.errors import MergeError

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


def _load(recipe: str, strict: bool, seed, dtype, out_dtype, out_shard_size, allow_crimes, gradient_span="slice",
          allow_extrapolation=False):
    from mergesmith.io.writer import parse_size
    from mergesmith.plan import make_plan
    from mergesmith.recipe import DTYPES, load_recipe

    for flag, v in (("--dtype", dtype), ("--out-dtype", out_dtype)):
        if v is not None and v not in DTYPES:
            raise MergeError(f"{flag} {v!r} is not a dtype; use bfloat16, float16 or float32")
    shard = parse_size(out_shard_size)
    r = load_recipe(recipe, strict=strict)
    plan = make_plan(r, seed=seed, dtype=dtype, out_dtype=out_dtype, shard_size=shard, allow_crimes=allow_crimes,
                     recipe_dir=Path(recipe).resolve().parent, gradient_span=gradient_span,
                     allow_extrapolation=allow_extrapolation, strict=strict)
    return plan


@cli.command("plan")
@click.argument("recipe", type=click.Path())
@_plan_options
def plan_cmd(recipe, seed, dtype, out_dtype, out_shard_size, allow_crimes, allow_extrapolation, gradient_span, strict,
             verbose):
    """Validate RECIPE and print what a run would do, without merging."""
    from mergesmith.plan import describe

    p = _load(recipe, strict, seed, dtype, out_dtype, out_shard_size, allow_crimes, gradient_span, allow_extrapolation)
    _chat_template(p, Path(recipe).resolve().parent)
    click.echo(describe(p))


def _chat_template(p, recipe_dir: Path, tokenizer: bool = True) -> Optional[str]:
    """Before any work: the tokenizer files the output will take are checked, and the recipe's chat_template
    resolved (a file only from `recipe_dir`, the recipe's folder, or a model's folder)."""
    from mergesmith.chat_templates import choose_template
    from mergesmith.folder import check_tokenizer
    from mergesmith.io.index import model_folder

    if tokenizer:
        check_tokenizer(p)
    spec = p.recipe.config.chat_template
    if not spec:
        return None
    base = p.models.get(p.base_model) if p.base_model else None
    return choose_template(spec, [model_folder(m) for m in p.models.values()], model_folder(base) if base else None,
                           recipe_dir, p.recipe.at("chat_template"))


def run_recipe(recipe: str, out_dir: str, *, seed=None, device="cpu", threads=None, out_shard_size="5GB",
               dtype=None, out_dtype=None, overwrite=False, quiet=False, copy_tokenizer=True, write_model_card=True,
               allow_crimes=False, strict=False, restart=False, gradient_span="slice",
               allow_extrapolation=False) -> "object":
    """The whole `mergesmith run`; returns the Plan. Used by the CLI, the demo and tests.

    An interrupted run left OUT_DIR.partial/ with a journal: the same command continues it (same seed, even when
    it was drawn), a different recipe or input is refused, and `restart` starts over. What may be written,
    replaced or removed, and the lock that keeps a second run off the same OUT_DIR: mergesmith.outdir.
    """
    from mergesmith import outdir
    from mergesmith.allocator import reuse_freed_blocks
    from mergesmith.execute import execute, pick_device
    from mergesmith.plan import row_blocks
    from mergesmith.folder import folder_bytes, write_folder
    from mergesmith.verify import verify_weights

    if threads is not None and threads < 1:
        raise MergeError(f"--threads {threads}: give at least 1 thread (or leave --threads out to use every core)")
    out = outdir.output_path(out_dir)
    pick_device(device)
    head = None if restart else outdir.resume_header(outdir.partial_of(out))
    if seed is None and head is not None:
        seed = head.get("seed")
    p = _load(recipe, strict, seed, dtype, out_dtype, out_shard_size, allow_crimes, gradient_span, allow_extrapolation)
    template = _chat_template(p, Path(recipe).resolve().parent, copy_tokenizer)
    with outdir.claim(out, _inputs(p, recipe), overwrite, f"mergesmith run {recipe} {out_dir}") as partial:
        resume = not restart and _continues(p, partial)
        if not resume:
            _fresh(p, partial, folder_bytes(p, out.name, copy_tokenizer, write_model_card, template))
        if any(len(row_blocks(p, t)) > 1 for t in p.tasks):
            reuse_freed_blocks()
        done = execute(p, partial, device=device, threads=threads, progress=not quiet, resume=resume)
        if done:
            from mergesmith.errors import log

            log.info(f"resumed {partial}: {done} of {len(p.tasks)} tensors were already done")
        write_folder(p, partial, name=out.name, tokenizer=copy_tokenizer, card=write_model_card,
                     chat_template=template)
        verify_weights(partial, {t.name: (t.out_dtype, tuple(t.shape)) for t in p.tasks})
        outdir.finish(partial, out)
    return p


def _fresh(p, partial: Path, other_bytes: int) -> None:
    """A new OUT_DIR.partial/, kept only when the disk has room for the whole output folder."""
    from mergesmith import outdir

    outdir.fresh_partial(partial)
    try:
        outdir.check_disk(partial, outdir.disk_need(sum(p.layout.sizes), list(p.layout.slots), other_bytes))
    except MergeError:
        outdir.remove_ours(partial)  # nothing in it yet: a refused run leaves no trace
        raise


def _inputs(p, recipe: str) -> list:
    """What the output must keep apart from: every model (folder, weight files, adapter) and the recipe."""
    from mergesmith.outdir import model_inputs

    items = [("the recipe", Path(recipe))]
    for ref, idx in p.models.items():
        items += model_inputs(f"model {ref}", idx)
    return items


def _continues(p, partial: Path) -> bool:
    """`partial` holds an interrupted run of this same merge, to be continued; an interrupted different merge is
    refused."""
    from mergesmith.execute import can_resume
    from mergesmith.journal import differences, fingerprint
    from mergesmith.outdir import resume_header

    head = resume_header(partial)  # read again under the lock: the one read before planning gave only the seed
    if head is None:
        return False
    changed = differences(head.get("fingerprint", {}), fingerprint(p))
    if changed != "nothing":
        raise MergeError(f"{partial} holds an interrupted merge that differs from this one (changed: {changed}); "
                         "rerun with --restart to start over")
    return can_resume(p, partial)


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
def run_cmd(recipe, out_dir, seed, dtype, out_dtype, out_shard_size, allow_crimes, allow_extrapolation, gradient_span,
            strict, verbose, device, cuda,
            threads, overwrite, restart, quiet, copy_tokenizer, write_model_card, lazy_unpickle, lora_merge_cache,
            transformers_cache):
    """Merge the models of RECIPE into the Hugging Face model folder OUT_DIR."""
    from mergesmith.moe import is_moe_recipe

    if is_moe_recipe(recipe):  # a mergekit-moe recipe (experts:, no merge_method:)
        return _moe(recipe, out_dir, device="cuda" if cuda else device, seed=seed, out_shard_size=out_shard_size,
                    overwrite=overwrite, restart=restart, quiet=quiet, copy_tokenizer=copy_tokenizer,
                    write_model_card=write_model_card, strict=strict, dtype=out_dtype or dtype)
    t0 = time.monotonic()
    p = run_recipe(recipe, out_dir, seed=seed, device="cuda" if cuda else device, threads=threads,
                   out_shard_size=out_shard_size, dtype=dtype, out_dtype=out_dtype, overwrite=overwrite, quiet=quiet,
                   copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, allow_crimes=allow_crimes,
                   strict=strict, restart=restart, gradient_span=gradient_span,
                   allow_extrapolation=allow_extrapolation)
    if not quiet:
        click.echo(f"wrote {out_dir}: {len(p.tasks)} tensors, {p.bytes_written / 1e6:.1f} MB in "
                   f"{len(p.layout.files)} file(s), {time.monotonic() - t0:.1f} s"
                   + (f"; seed {p.seed}" if p.method.randomized else ""), err=True)


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
@click.option("--compare", is_flag=True, help="Also merge with linear, task_arithmetic, ties, dare_linear, della, "
              "and build a mixture of the experts (docs/moe.md).")
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


def _moe(recipe: str, out_dir: str, **kw) -> None:
    from mergesmith.moe import build_moe, format_report

    b = build_moe(recipe, out_dir, **kw)
    p = b.plan
    if b.report is not None and not kw.get("quiet"):
        click.echo(format_report(b.report), err=True)
    if not kw.get("quiet"):
        click.echo(f"wrote {out_dir}: {p.family.name} of {len(p.recipe.config.experts)} experts, {len(p.tensors)} "
                   f"tensors, {p.bytes_written / 1e6:.1f} MB in {len(p.layout.files)} file(s), {b.seconds:.1f} s; "
                   f"seed {p.seed}", err=True)


@cli.command("moe")
@click.argument("recipe", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--calibrate", is_flag=True,
              help="Fit each layer's router on the positive prompts (logistic regression) instead of mergekit's "
                   "mean vectors.")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True,
              help="Build even when every expert is the same model (for training afterwards).")
@click.option("--load-in-4bit", is_flag=True, help="Accepted for mergekit-moe compatibility (see the warning).")
@click.option("--load-in-8bit", is_flag=True, help="Accepted for mergekit-moe compatibility (see the warning).")
@click.option("--device", default="cpu", show_default=True, help="Where the router prompts run: cpu, cuda or auto.")
@click.option("--cuda", is_flag=True, help="Same as --device cuda.")
@click.option("--seed", "--random-seed", "seed", type=int, default=None,
              help="Seed for random gates and expert noise; chosen and recorded when omitted.")
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
def moe_cmd(recipe, out_dir, calibrate, allow_all_same, load_in_4bit, load_in_8bit, device, cuda, seed,
            out_shard_size, overwrite, restart, quiet, copy_tokenizer, write_model_card, no_report, strict,
            lazy_unpickle, transformers_cache, verbose):
    """Build a mixture of experts from dense fine-tunes of one base (a mergekit-moe recipe) into OUT_DIR."""
    from mergesmith.errors import warn

    if load_in_4bit or load_in_8bit:
        warn("--load-in-4bit/--load-in-8bit: mergesmith runs the router prompts in float32 and writes the "
             "recipe's dtype; it does not quantize")
    _moe(recipe, out_dir, device="cuda" if cuda else device, seed=seed, calibrate=calibrate,
         allow_all_same=allow_all_same, out_shard_size=out_shard_size, overwrite=overwrite, restart=restart,
         quiet=quiet, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, strict=strict,
         report=not no_report)


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
