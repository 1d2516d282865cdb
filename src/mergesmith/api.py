"""The Python API: load a recipe, plan it, merge it into a model folder or into memory.

    import mergesmith

    result = mergesmith.merge("recipe.yml", "out/merged", mergesmith.MergeOptions(seed=1))
    tensors = mergesmith.merge_in_memory("recipe.yml")  # {name: tensor}, no folder written

`mergesmith run` and `mergesmith plan` are thin layers over `merge` and `plan_merge`: the same checks, the same
bytes. Every problem the user can fix is a MergeError with one line.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePath
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
import yaml

from mergesmith import outdir
from mergesmith.errors import MergeError, log
from mergesmith.device import pick_device
from mergesmith.execute import compute_tensor, execute
from mergesmith.io.writer import parse_size
from mergesmith.plan import Plan, describe, make_plan, row_blocks  # describe: exported
from mergesmith.recipe import DTYPES, Recipe, parse_recipe
from mergesmith.recipe import load_recipe as read_recipe_file

__all__ = [
    "MergeOptions",
    "MergeResult",
    "Plan",
    "Recipe",
    "describe",
    "iter_merged",
    "load_recipe",
    "merge",
    "merge_in_memory",
    "plan_merge",
]

GRADIENT_SPANS = ("slice", "output")
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
_FLAGS = {
    "seed": "--seed",
    "device": "--device",
    "threads": "--threads",
    "out_shard_size": "--out-shard-size",
    "dtype": "--dtype",
    "out_dtype": "--out-dtype",
    "gradient_span": "--gradient-span",
    "intermediate_dir": "--intermediate-dir",
}


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge or a plan, with `mergesmith run`'s defaults except `tune_allocator`; checked when
    made (MergeError). Derive variants with `dataclasses.replace(options, seed=2)`."""

    seed: Optional[int] = None  # randomized methods (dare, della); None: drawn, and reported in the result
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    threads: Optional[int] = None  # torch threads; None: every core
    out_shard_size: Union[str, int] = "5B"  # most bytes of tensors per shard: "5B", "500M" (mergekit's counts, which
    # its writer compares with bytes), "5GB", "2GiB" or an int
    dtype: Optional[str] = None  # overrides the recipe's dtype (bfloat16, float16, float32)
    out_dtype: Optional[str] = None  # overrides the recipe's out_dtype
    strict: bool = False  # refuse unknown recipe keys (a Recipe passed in keeps how it was loaded), NaN/Inf inputs
    allow_crimes: bool = False  # merge models of different architectures anyway
    unsafe_truncate_embeddings: bool = False  # vocabularies of different sizes, no tokenizer setting: row for row
    allow_extrapolation: bool = False  # accept parameters beyond interpolation, as mergekit does
    gradient_span: str = "slice"  # layer gradients over each slice's layers (mergekit) or over the whole "output"
    copy_tokenizer: bool = True  # the output folder gets the tokenizer
    write_model_card: bool = True  # the output folder gets a README.md
    overwrite: bool = False  # replace an output folder mergesmith wrote (never another folder)
    restart: bool = False  # discard an interrupted run's OUT_DIR.partial/ instead of continuing it
    progress: bool = True  # a progress bar on stderr while writing a folder
    tune_allocator: bool = False  # glibc allocator settings for row-block merges (mergesmith.allocator)
    intermediate_dir: Optional[str] = None  # multi-stage recipes: where named stages go (None: OUT_DIR.stages)
    lazy: bool = True  # multi-stage recipes: skip a stage whose finished output is current

    def __post_init__(self) -> None:
        _check_options(self)

    @property
    def shard_bytes(self) -> int:
        """out_shard_size in bytes."""
        return parse_size(self.out_shard_size)


def _bad(name: str, value: Any, what: str) -> MergeError:
    flag = f" ({_FLAGS[name]})" if name in _FLAGS else ""
    return MergeError(f"option {name}{flag} {value!r}: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_options(o: MergeOptions) -> None:
    """The one place options are checked; the first problem is a MergeError."""
    for f in fields(o):
        v = getattr(o, f.name)
        if isinstance(f.default, bool) and not isinstance(v, bool):
            raise _bad(f.name, v, "give True or False")
    if o.seed is not None and not _is_int(o.seed):
        raise _bad("seed", o.seed, "give a whole number, or None to draw one")
    if not isinstance(o.device, str) or not _DEVICE.fullmatch(o.device):
        raise _bad("device", o.device, "use cpu, cuda, cuda:N or auto")
    if o.threads is not None and (not _is_int(o.threads) or o.threads < 1):
        raise _bad("threads", o.threads, "give at least 1 thread, or leave it out to use every core")
    if not _is_int(o.out_shard_size) and not isinstance(o.out_shard_size, str):
        raise _bad("out_shard_size", o.out_shard_size, "give a size like '5GB' or a number of bytes")
    try:
        parse_size(o.out_shard_size)
    except MergeError as e:
        raise _bad("out_shard_size", o.out_shard_size, str(e)) from None
    for name in ("dtype", "out_dtype"):
        v = getattr(o, name)
        if v is not None and v not in DTYPES:
            raise _bad(name, v, "not a dtype; use bfloat16, float16 or float32")
    if o.gradient_span not in GRADIENT_SPANS:
        raise _bad("gradient_span", o.gradient_span, "use slice or output")
    if o.intermediate_dir is not None and not isinstance(o.intermediate_dir, (str, os.PathLike)):
        raise _bad("intermediate_dir", o.intermediate_dir, "give a folder path, or None for OUT_DIR.stages")


def _options(options: Optional[MergeOptions]) -> MergeOptions:
    if options is None:
        return MergeOptions()
    if not isinstance(options, MergeOptions):
        raise MergeError(f"options: give a mergesmith.MergeOptions, not {type(options).__name__}")
    return options


@dataclass(frozen=True)
class MergeResult:
    """What `merge` did: the finished folder, the seed (given, drawn or continued), wall seconds, bytes of tensors
    written, output tensors, how many of them an interrupted run had already written, and the Plan."""

    path: Path
    seed: int
    seconds: float
    bytes_written: int
    tensors: int
    resumed_tensors: int
    plan: Plan = field(repr=False)


# ------------------------------------------------------------------------------------------- recipes


class _Dumper(yaml.SafeDumper):
    """YAML for recipe dicts: paths become strings, tuples lists."""


_Dumper.add_multi_representer(PurePath, lambda d, p: d.represent_str(str(p)))
_Dumper.add_representer(tuple, lambda d, t: d.represent_list(list(t)))
_TEXT = re.compile(r"merge_method\s*:")


def _dict_text(data: dict) -> str:
    try:
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as e:
        raise MergeError(
            f"<recipe dict>: {' '.join(str(e).split())}; use strings, numbers, booleans, lists and dicts"
        ) from None


def load_recipe(source: Union[str, os.PathLike, dict, Recipe], strict: bool = False) -> Recipe:
    """A Recipe from a YAML file's path (str or Path), YAML text (a str with a newline or a `merge_method:` key)
    or a dict; a Recipe is returned as it is. Relative model paths resolve against the file's folder, or against
    the working directory at this call for text and dicts. `strict` refuses unknown keys. Raises MergeError."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        recipe = parse_recipe(_dict_text(source), source="<recipe dict>", strict=strict)
    elif isinstance(source, str) and ("\n" in source or _TEXT.search(source)):
        recipe = parse_recipe(source, source="<recipe text>", strict=strict)
    elif isinstance(source, (str, os.PathLike)):
        return read_recipe_file(source, strict=strict)
    else:
        raise MergeError(f"a recipe is a YAML file's path, YAML text, a dict or a Recipe, not {type(source).__name__}")
    recipe.folder = Path.cwd()
    return recipe


def _chat_template(p: Plan, recipe_dir: Path, tokenizer: bool = True) -> Optional[str]:
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
    return choose_template(
        spec,
        [model_folder(m) for m in p.models.values()],
        model_folder(base) if base else None,
        recipe_dir,
        p.recipe.at("chat_template"),
    )


def _planned(recipe: Recipe, o: MergeOptions) -> Tuple[Plan, Optional[str]]:
    """The plan of a recipe under the options, and the chat template its output gets."""
    p = make_plan(
        recipe,
        seed=o.seed,
        dtype=o.dtype,
        out_dtype=o.out_dtype,
        shard_size=o.shard_bytes,
        allow_crimes=o.allow_crimes,
        recipe_dir=recipe.folder,
        gradient_span=o.gradient_span,
        allow_extrapolation=o.allow_extrapolation,
        strict=o.strict,
        unsafe_truncate_embeddings=o.unsafe_truncate_embeddings,
    )
    return p, _chat_template(p, recipe.folder, o.copy_tokenizer)


def plan_merge(recipe: Union[str, os.PathLike, dict, Recipe], options: Optional[MergeOptions] = None) -> Plan:
    """Check `recipe` (anything load_recipe takes) against its models and return the Plan a merge would follow,
    reading no tensor; `describe(plan)` is `mergesmith plan`'s text. Raises MergeError."""
    o = _options(options)
    return _planned(load_recipe(recipe, o.strict), o)[0]


# ------------------------------------------------------------------------------------------- merging


def _tune(p: Plan, o: MergeOptions) -> None:
    """Allocator settings, when asked for and the plan streams row blocks (mergesmith.allocator says why)."""
    if o.tune_allocator and any(len(row_blocks(p, t)) > 1 for t in p.tasks):
        from mergesmith.allocator import reuse_freed_blocks

        reuse_freed_blocks()


def merge(
    recipe: Union[str, os.PathLike, dict, Recipe],
    out_dir: Union[str, os.PathLike],
    options: Optional[MergeOptions] = None,
) -> MergeResult:
    """Merge `recipe` (anything load_recipe takes) into the Hugging Face model folder `out_dir`; returns a
    MergeResult. Raises MergeError.

    An interrupted merge left OUT_DIR.partial/ with a journal: the same merge continues it (same seed, even when
    it was drawn), a different recipe or input is refused, and `restart` starts over. What may be written,
    replaced or removed, and the lock that keeps a second run off the same OUT_DIR: mergesmith.outdir.

    A file of several YAML documents is a multi-stage recipe (mergekit-multi's): every stage is merged, in
    dependency order, and the result is the output stage's (mergesmith.stages).
    """
    from mergesmith import stages
    from mergesmith.journal import resume_header

    o = _options(options)
    if stages.is_multi_stage(recipe):
        return _merge_stages(Path(recipe), out_dir, o)
    t0 = time.monotonic()
    out = outdir.output_path(out_dir)
    pick_device(o.device)
    head = None if o.restart else resume_header(outdir.partial_of(out))
    if o.seed is None and head is not None and _is_int(head.get("seed")):
        o = replace(o, seed=head["seed"])
    r = load_recipe(recipe, o.strict)
    p, template = _planned(r, o)
    with outdir.claim(out, _inputs(p), o.overwrite, f"mergesmith run {r.path or r.source} {out_dir}") as partial:
        done = _write(p, partial, out, o, template)
        outdir.finish(partial, out)
    return MergeResult(
        path=out,
        seed=p.seed,
        seconds=time.monotonic() - t0,
        bytes_written=p.bytes_written,
        tensors=len(p.tasks),
        resumed_tensors=done,
        plan=p,
    )


def _merge_stages(path: Path, out_dir, o: MergeOptions) -> MergeResult:
    """Every stage of a multi-stage file (mergesmith.stages); the output stage's result."""
    from mergesmith import stages

    t0 = time.monotonic()
    res, p = stages.merge_pipeline(path, out_dir, o, plan_merge, merge)
    if res is None:  # the output was current: nothing written
        res = MergeResult(
            path=outdir.output_path(out_dir),
            seed=p.seed,
            seconds=0.0,
            bytes_written=p.bytes_written,
            tensors=len(p.tasks),
            resumed_tensors=len(p.tasks),
            plan=p,
        )
    return replace(res, seconds=time.monotonic() - t0)


def _write(p: Plan, partial: Path, out: Path, o: MergeOptions, template: Optional[str]) -> int:
    """The whole output folder in `partial` (continued when it holds this merge, interrupted); returns how many
    tensors were already done."""
    from mergesmith.folder import folder_bytes, write_folder
    from mergesmith.verify import verify_weights

    resume = not o.restart and _continues(p, partial)
    if not resume:
        _fresh(p, partial, folder_bytes(p, out.name, o.copy_tokenizer, o.write_model_card, template))
    _tune(p, o)
    done = execute(p, partial, device=o.device, threads=o.threads, progress=o.progress, resume=resume)
    if done:
        log.info(f"resumed {partial}: {done} of {len(p.tasks)} tensors were already done")
    write_folder(p, partial, name=out.name, tokenizer=o.copy_tokenizer, card=o.write_model_card, chat_template=template)
    verify_weights(partial, {t.name: (t.out_dtype, tuple(t.shape)) for t in p.tasks})
    return done


def _fresh(p: Plan, partial: Path, other_bytes: int) -> None:
    """A new OUT_DIR.partial/, kept only when the disk has room for the whole output folder."""
    outdir.fresh_partial(partial)
    try:
        outdir.check_disk(partial, outdir.disk_need(sum(p.layout.sizes), list(p.layout.slots), other_bytes))
    except MergeError:
        outdir.remove_ours(partial)  # nothing in it yet: a refused run leaves no trace
        raise


def _inputs(p: Plan) -> list:
    """What the output must keep apart from: every model (folder, weight files, adapter) and the recipe file."""
    items = [("the recipe", p.recipe.path)] if p.recipe.path is not None else []
    for ref, idx in p.models.items():
        items += outdir.model_inputs(f"model {ref}", idx)
    return items


def _continues(p: Plan, partial: Path) -> bool:
    """`partial` holds an interrupted run of this same merge, to be continued; an interrupted different merge is
    refused."""
    from mergesmith.execute import can_resume
    from mergesmith.journal import differences, fingerprint, resume_header

    head = resume_header(partial)  # read again under the lock: the one read before planning gave only the seed
    if head is None:
        return False
    changed = differences(head.get("fingerprint", {}), fingerprint(p))
    if changed != "nothing":
        raise MergeError(
            f"{partial} holds an interrupted merge that differs from this one (changed: {changed}); "
            "rerun with --restart to start over"
        )
    return can_resume(p, partial)


def iter_merged(
    recipe: Union[str, os.PathLike, dict, Recipe], options: Optional[MergeOptions] = None
) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of every output tensor of `recipe` (anything load_recipe takes), in the output files' order,
    each computed when asked for, on the CPU, in the output dtype: the bytes `merge` would write, and no folder.
    The recipe is planned and checked before this returns (MergeError); the folder options are not used."""
    o = _options(options)
    dev = pick_device(o.device)
    p, _ = _planned(load_recipe(recipe, o.strict), o)
    if o.threads:
        torch.set_num_threads(o.threads)
    _tune(p, o)
    return _tensors(p, dev)


def _tensors(p: Plan, dev: torch.device) -> Iterator[Tuple[str, torch.Tensor]]:
    slots = p.layout.slots
    for t in sorted(p.tasks, key=lambda t: (slots[t.name].shard, slots[t.name].offset)):
        yield t.name, compute_tensor(p, t, dev)


def merge_in_memory(
    recipe: Union[str, os.PathLike, dict, Recipe], options: Optional[MergeOptions] = None
) -> Dict[str, torch.Tensor]:
    """{name: tensor} of every output tensor of `recipe` (anything load_recipe takes), as iter_merged gives them:
    for scoring many candidate recipes without writing folders. Raises MergeError."""
    return dict(iter_merged(recipe, options))
