"""Multi-stage recipes (mergekit-multi's format): several YAML documents in one file, separated by `---`, each a
recipe with a `name:`; a later stage uses an earlier one as a model by that name.

- The stages run in dependency order. Each named stage is written to WORK/<name>/ (WORK: OUT_DIR.stages/ or the
  --intermediate-dir folder), the output stage (the document without `name:`, else the last document) to OUT_DIR.
- Refused before any work, in one line with the recipe line: a name given twice, two documents without a name, a
  name that is no plain folder name, stages that use each other in a cycle, a stage that uses the output stage, a
  model that is neither a stage, a folder nor a Hub id.
- A rerun continues where a run stopped: a stage whose output is complete and was made from the same plan (the
  resume journal's fingerprint: recipe, seed, every input file) is skipped (mergekit's --lazy; --no-lazy merges
  every stage again), an interrupted one resumes from its journal, and a stage whose recipe or inputs changed is
  merged again, as is every stage that uses it.
- WORK holds mergesmith's marker and WORK/mergesmith_pipeline.json: the pipeline's seed (drawn when --seed is not
  given, so a rerun draws the same) and the fingerprint of each finished stage. Each stage draws from its own seed,
  derived from the pipeline's seed and its name (each output's mergesmith_config.yml records it).
- The output's model card holds the whole file, so it records every stage's recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from mergesmith import outdir
from mergesmith.errors import MergeError, did_you_mean, log, where
from mergesmith.recipe import Recipe, RecipeDocument, parse_recipe, read_recipe_text, short, split_documents

STATE = "mergesmith_pipeline.json"
STATE_FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class Stage:
    """One document of a multi-stage file: its recipe, the stages it uses and where its output goes."""

    name: Optional[str]  # None: the document without a name, the output
    recipe: Recipe
    line: int  # where its document starts in the file
    uses: Tuple[str, ...] = ()
    out: Optional[Path] = None
    final: bool = False

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "output"


@dataclass
class Pipeline:
    path: Path
    text: str
    stages: List[Stage]  # in run order, the output stage last


def is_multi_stage(source: Any) -> bool:
    """A recipe file of several YAML documents (anything else, and files that cannot be read, are not)."""
    if not isinstance(source, (str, os.PathLike)) or (isinstance(source, str) and "\n" in source):
        return False
    p = Path(source)
    if not p.is_file():
        return False
    try:
        return len(split_documents(read_recipe_text(p), p.name)) > 1
    except MergeError:
        return False  # the single-recipe reader says what is wrong


# ----------------------------------------------------------------------------------------------- loading


def load_pipeline(path: Path, strict: bool = False) -> Pipeline:
    """Parse every stage of the file at `path` and order them; every refusal before any work."""
    path = Path(path)
    text = read_recipe_text(path)
    docs = split_documents(text, path.name)
    if not docs:
        raise MergeError(f"{path.name}: the recipe is empty")
    names = _check_names(docs, path.name)
    stages = []
    for d in docs:
        r = parse_recipe(d.text, source=path.name, strict=strict)
        r.path, r.folder, r.text = path.absolute(), path.resolve().parent, d.text.lstrip("\n")
        stages.append(Stage(d.name, r, d.line, _uses(r, names)))
    final = next((s for s in stages if s.name is None), stages[-1])
    final.final = True
    for s in stages:
        if final.name is not None and final.name in s.uses:
            raise MergeError(
                f"{s.recipe.at(*_ref_path(s.recipe, final.name))}: stage {s.label} uses {final.name}, "
                "the output stage (the last document, as none goes without a name); put the output "
                "stage last, or leave out its name"
            )
    return Pipeline(path, text, _order(stages, path.name))


def _check_names(docs: List[RecipeDocument], source: str) -> Set[str]:
    """Names are plain folder names, each given once; one document at most goes without a name."""
    seen: Dict[str, int] = {}
    unnamed: Optional[int] = None
    for d in docs:
        if d.name is None:
            if unnamed is not None:
                raise MergeError(
                    f"{where(source, d.line)}: the documents at lines {unnamed} and {d.line} both lack "
                    "'name:'; only the output stage may go without a name"
                )
            unnamed = d.line
            continue
        if (
            not isinstance(d.name, str)
            or not _NAME.fullmatch(d.name)
            or d.name.endswith(outdir.WORK_SUFFIXES)
            or d.name == STATE
        ):
            raise MergeError(
                f"{where(source, d.name_line)}: stage name {short(d.name)} must be a plain folder name "
                "(letters, digits, '.', '_', '-'; at most 100) as it names the stage's output folder"
            )
        if d.name in seen:
            raise MergeError(
                f"{where(source, d.name_line)}: stage name '{d.name}' is given twice (lines "
                f"{seen[d.name]} and {d.name_line}); give each stage its own name"
            )
        seen[d.name] = d.name_line
    return set(seen)


def _slots(r: Recipe) -> Iterator[Tuple[Any, Any, tuple]]:
    """(holder, key, recipe path) of every model reference of a recipe; holder is a schema object (attribute) or a
    dict (item)."""
    c = r.config
    for i, m in enumerate(c.models or []):
        yield m, "model", ("models", i, "model")
    for si, s in enumerate(c.slices or []):
        for j, src in enumerate(s.sources):
            yield src, "model", ("slices", si, "sources", j, "model")
        if s.base_model is not None:
            yield s, "base_model", ("slices", si, "base_model")
    if c.base_model is not None:
        yield c, "base_model", ("base_model",)
    if c.tokenizer_source not in (None, "base", "union"):
        yield c, "tokenizer_source", ("tokenizer_source",)
    if c.tokenizer is not None:
        if c.tokenizer.source not in ("base", "union"):
            yield c.tokenizer, "source", ("tokenizer", "source")
        for tok, spec in (c.tokenizer.tokens or {}).items():
            src = spec.get("source") if isinstance(spec, dict) else None
            if isinstance(src, str):
                yield spec, "source", ("tokenizer", "tokens", tok)
            elif isinstance(src, dict) and isinstance(src.get("model"), str):
                yield src, "model", ("tokenizer", "tokens", tok)


def _get(holder: Any, key: str) -> Any:
    return holder[key] if isinstance(holder, dict) else getattr(holder, key)


def _set(holder: Any, key: str, value: str) -> None:
    if isinstance(holder, dict):
        holder[key] = value
    else:
        setattr(holder, key, value)


def _split(ref: str) -> Tuple[str, str]:
    """(model, '+adapter' or '') of a reference."""
    model, plus, adapter = ref.rpartition("+")
    return (model, plus + adapter) if plus and model and adapter else (ref, "")


def _uses(r: Recipe, names: Set[str]) -> Tuple[str, ...]:
    """The stages a recipe uses, in recipe order; a reference that is no stage must be a folder or a Hub id."""
    from mergesmith.io.resolve import is_hub_id

    used: List[str] = []
    for holder, key, path in _slots(r):
        model = _split(_get(holder, key))[0]
        if model in names:
            used += [model] if model not in used else []
        elif not is_hub_id(model) and not _exists(model, r.folder):
            raise MergeError(
                f"{r.at(*path)}: model {short(model)} is neither a stage of this file "
                f"({', '.join(sorted(names)) or 'none is named'}) nor a folder"
                f"{did_you_mean(model, names)}"
            )
    return tuple(used)


def _exists(ref: str, folder: Optional[Path]) -> bool:
    p = Path(ref).expanduser()
    return p.exists() or (folder is not None and not p.is_absolute() and (folder / p).exists())


def _ref_path(r: Recipe, name: str) -> tuple:
    return next(path for holder, key, path in _slots(r) if _split(_get(holder, key))[0] == name)


def _order(stages: List[Stage], source: str) -> List[Stage]:
    """Dependency order, file order among independent stages, the output stage last; a cycle is refused."""
    by_name = {s.name: s for s in stages if s.name is not None}
    done: List[Stage] = []
    state: Dict[int, str] = {}

    def visit(s: Stage, trail: List[Stage]) -> None:
        if state.get(id(s)) == "done":
            return
        if state.get(id(s)) == "open":
            cycle = trail[trail.index(s) :] + [s]
            steps = " -> ".join(f"{c.label} (line {c.line})" for c in cycle)
            user = trail[-1].recipe
            raise MergeError(
                f"{where(source, user.line(*_ref_path(user, s.label)))}: the stages "
                f"use each other in a cycle: {steps}; a stage may use only stages that do not use it"
            )
        state[id(s)] = "open"
        for n in s.uses:
            visit(by_name[n], trail + [s])
        state[id(s)] = "done"
        done.append(s)

    for s in sorted(stages, key=lambda s: s.final):
        visit(s, [])
    return done


def assign(p: Pipeline, out: Path, work: Path) -> None:
    """Each stage's output folder, and every reference to a stage made the absolute path of its output."""
    for s in p.stages:
        s.out = out if s.final else work / s.name
    outs = {s.name: s.out for s in p.stages if s.name is not None}
    for s in p.stages:
        for holder, key, _ in _slots(s.recipe):
            model, adapter = _split(_get(holder, key))
            if model in outs:
                _set(holder, key, str(outs[model]) + adapter)


# ----------------------------------------------------------------------------------------------- seeds and state


def stage_seed(seed: int, name: Optional[str]) -> int:
    """A stage's seed: drawn from the pipeline's seed and the stage's name, so that stages draw apart."""
    digest = hashlib.sha256(f"{seed}/{name or ''}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def work_dir(out: Path, intermediate_dir: Optional[str]) -> Path:
    """Where the named stages go: --intermediate-dir, else OUT_DIR.stages; apart from OUT_DIR."""
    work = outdir.output_path(intermediate_dir) if intermediate_dir else out.parent / (out.name + ".stages")
    if work == out or out in work.parents or work in out.parents:
        raise MergeError(
            f"intermediate folder {work} and output {out} hold one another; choose an "
            "--intermediate-dir apart from OUT_DIR"
        )
    return work


def _read_state(work: Path) -> Dict[str, Any]:
    f = work / STATE
    if not f.exists():
        return {}
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT and isinstance(state.get("done"), dict):
            return state
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    raise MergeError(
        f"{f}: not mergesmith's pipeline state (expected its JSON); remove it, or choose another --intermediate-dir"
    )


def _write_state(work: Path, state: Dict[str, Any]) -> None:
    tmp = work / f".{STATE}.tmp"
    try:
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, work / STATE)
    except OSError as e:
        raise MergeError(f"cannot write {work / STATE}: {e.strerror}") from None


def _prepare(work: Path) -> None:
    """WORK exists with mergesmith's marker (outdir.claim has checked that it is absent, empty or ours)."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        if not (work / outdir.MARKER).exists():
            (work / outdir.MARKER).write_text(outdir.MARKER_TEXT, encoding="utf-8")
    except OSError as e:
        raise MergeError(f"cannot create {work}: {e.strerror}") from None


def _start(work: Path, seed: Optional[int]) -> Dict[str, Any]:
    """WORK ready and its state: the pipeline's seed (given, an earlier run's, or drawn now) and the stages done
    with it."""
    _prepare(work)
    state = _read_state(work)
    if seed is None:
        seed = state.get("seed")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else secrets.randbits(31)
    if state.get("seed") != seed:
        state = {"format": STATE_FORMAT, "seed": seed, "done": {}}
        _write_state(work, state)
    return state


def _complete(folder: Path) -> bool:
    return outdir.is_ours(folder) and (folder / outdir.RECIPE_COPY).is_file() and not (folder / outdir.JOURNAL).exists()


def _key(plan, o) -> str:
    """What a finished stage's output was made from: the plan's fingerprint and the folder options."""
    from mergesmith.journal import fingerprint

    data = [fingerprint(plan), o.copy_tokenizer, o.write_model_card, plan.recipe.pipeline]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- running


def merge_pipeline(path: Path, out_dir, options, plan_merge: Callable, merge: Callable) -> Tuple[Any, Any]:
    """Run every stage of the multi-stage file at `path`, the output stage into `out_dir`, with the API's
    `plan_merge` and `merge` (MergeOptions `options`); returns (the output stage's MergeResult, or None when its
    output was current and skipped; its Plan). Raises MergeError."""
    out = outdir.output_path(out_dir)
    p = load_pipeline(Path(path), options.strict)
    work = work_dir(out, options.intermediate_dir)
    assign(p, out, work)
    result, plan = None, None
    with outdir.claim(work, [("the recipe", p.path)], True, f"mergesmith run {path} {out_dir}"):
        state = _start(work, options.seed)
        seed = state["seed"]
        p.stages[-1].recipe.pipeline = (
            f"# seed: {seed}  (each stage's seed derives from it; reproduce with: "
            f"mergesmith run {p.path.name} OUT_DIR --seed {seed})\n{p.text}"
        )
        merged: Set[str] = set()
        for s in p.stages:
            o = replace(
                options,
                seed=stage_seed(seed, s.name),
                overwrite=options.overwrite if s.final else True,
                restart=options.restart or bool(merged & set(s.uses)),
            )
            plan = plan_merge(s.recipe, o)
            key = _key(plan, o)
            if options.lazy and _complete(s.out) and state["done"].get(str(s.out)) == key:
                log.info(f"stage {s.label}: {s.out} is complete and current; skipped")
                result = None
                continue
            log.info(f"stage {s.label} ({s.recipe.config.merge_method}, line {s.line}): merging into {s.out}")
            result = merge(s.recipe, s.out, o)
            merged.add(s.label)
            state["done"][str(s.out)] = key
            _write_state(work, state)
    return result, plan


# ----------------------------------------------------------------------------------------------- plan


def describe_pipeline(path: Path, options, plan_merge: Callable) -> str:
    """`mergesmith plan` of a multi-stage file: the stages in run order, and the plan of each stage whose inputs
    exist now (the others are planned when the stages they use are merged), made with the API's `plan_merge`."""
    from mergesmith.plan import describe

    p = load_pipeline(Path(path), options.strict)
    lines = [
        f"stages: {len(p.stages)} in {p.path.name}, run in this order (each named stage is written to "
        "OUT_DIR.stages/NAME/ or --intermediate-dir/NAME/, the output stage to OUT_DIR):"
    ]
    for i, s in enumerate(p.stages, 1):
        role = ", the output" if s.final else ""
        uses = f"; uses {', '.join(s.uses)}" if s.uses else ""
        lines.append(f"  {i}. {s.label} (line {s.line}{role}): {s.recipe.config.merge_method}{uses}")
    seed = options.seed
    lines.append(
        f"seed: {seed} (each stage's seed derives from it)"
        if seed is not None
        else "seed: drawn when the run starts (pass --seed to fix it); each stage's seed derives from it"
    )
    for s in p.stages:
        if s.uses:
            lines.append(
                f"\nstage {s.label}: planned when {', '.join(s.uses)} {'is' if len(s.uses) == 1 else 'are'} merged"
            )
            continue
        o = replace(options, seed=None if seed is None else stage_seed(seed, s.name))
        plan = plan_merge(s.recipe, o)
        lines.append(f"\nstage {s.label}:")
        lines += ["  " + line for line in describe(plan).splitlines()]
    return "\n".join(lines)
