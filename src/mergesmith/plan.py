"""The Plan: a pure function of (Recipe, model indexes, options) -> every output tensor with its inputs, resolved
parameters, dtype and place in the output shards. Every validation error surfaces here, before a tensor is read.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mergesmith.errors import MergeError, did_you_mean, warn
from mergesmith.io.index import ModelIndex, TensorInfo, index_model
from mergesmith.io.resolve import resolve_model
from mergesmith.io.writer import Layout, plan_layout
from mergesmith.methods import Method, check_params, get_method
from mergesmith.methods.rng import stream_key
from mergesmith.params import _LAYER_RE, ParameterResolver, is_embedding, layer_index
from mergesmith.recipe import (
    InputModelDefinition,
    OutputModuleDefinition,
    OutputSliceDefinition,
    Recipe,
    normalize_dtype,
)
from mergesmith.stacks import Anatomy, anatomy, claimed_layers, is_front, uncountable

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class InputRef:
    model: str  # recipe reference
    name: str  # tensor name in that model
    take: Optional[Tuple[int, ...]] = None  # read only this leading sub-block (embedding rows beyond the base's)


@dataclass(frozen=True)
class TensorTask:
    name: str
    shape: Tuple[int, ...]
    out_dtype: torch.dtype
    kind: str  # "merge" or "copy"
    base: Optional[InputRef]
    inputs: List[InputRef]
    shared: Dict[str, Any] = field(default_factory=dict)
    per_input: List[Dict[str, Any]] = field(default_factory=list)
    keys: List[int] = field(default_factory=list)
    vocab: bool = False  # rows are token ids: permute each input into the output vocabulary first

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Plan:
    """What a run does, decided before the first tensor is read; not changed afterwards (the run's options that
    the executor needs, like `strict`, are part of it)."""

    recipe: Recipe
    method: Method
    models: "OrderedDict[str, ModelIndex]"
    base_model: Optional[str]
    seed: int
    seed_given: bool
    tasks: Tuple[TensorTask, ...]
    layout: Layout
    notes: Tuple[str, ...] = ()
    template: Optional[str] = None  # the model whose config.json the output takes
    # each layer stack of the output (its tensor prefix, None for a model without layers), with (model, its layer)
    # per output layer
    stacks: Tuple[Tuple[Optional[str], Tuple[Tuple[str, int], ...]], ...] = ()
    sliced: bool = False  # `slices:` or `modules:`: layers may move
    vocabulary: Any = None  # mergesmith.vocab.Vocabulary when the recipe builds an output tokenizer
    strict: bool = False  # NaN/Inf in inputs: an error instead of a warning

    @property
    def num_layers(self) -> int:
        """The output's layer count, every stack together."""
        return len(self.layer_sources)

    @property
    def layer_sources(self) -> Tuple[Tuple[str, int], ...]:
        """(model, its layer) per output layer, stack after stack."""
        return tuple(src for _, layers in self.stacks for src in layers)

    @property
    def bytes_read(self) -> int:
        total = 0
        for t in self.tasks:
            for ref in ([t.base] if t.base else []) + t.inputs:
                total += self.models[ref.model].tensors[ref.name].nbytes
        return total

    @property
    def bytes_written(self) -> int:
        return self.layout.total_bytes

    @property
    def peak_bytes_estimate(self) -> int:
        """The blocks in flight, each with its float32 working set (the inputs, their deltas, sorting and masks,
        and the output): two tensors at a time, three blocks in all (execute.BLOCKS), all three of one tensor in row
        blocks at most; and the saved masks (1 bit per element and model) of one two-pass tensor in row blocks
        (they take turns: execute.keeps_state)."""
        singles, blocked, masks = [0, 0], [0, 0], [0]
        for t in self.tasks:
            n_in = len(t.inputs) + (1 if t.base else 0)
            blocks = row_blocks(self, t)
            elems = max(b - a for a, b in blocks) * (t.numel // max(1, t.shape[0] if t.shape else 1))
            # a copy holds the tensor as read (written as it is); a merge its float32 working set
            work = elems * (t.out_dtype.itemsize if t.kind != "merge" else 4 * (2 * n_in + 6))
            (blocked if len(blocks) > 1 and t.kind == "merge" else singles).append(work)  # copies: a block at a time
            if len(blocks) > 1 and self.method.keeps_state(t.shared):
                masks.append(t.numel * n_in // 8)
        singles.sort(reverse=True)
        blocked.sort(reverse=True)
        most = max(singles[0] + singles[1], 3 * blocked[0], 2 * blocked[0] + max(blocked[1], singles[0]))
        return most + max(masks)


# Tensors above this many elements are merged in blocks of rows when the method allows it. A constant: the
# blocking (and so every rounding) depends only on the tensor's shape, never on the machine.
BLOCK_ELEMENTS = 1 << 22


def row_blocks(plan: "Plan", task: TensorTask) -> List[Tuple[int, int]]:
    """[(first_row, end_row)] for a task: one block unless it is large and a copy or merged by a row-wise method."""
    rows = task.shape[0] if task.shape else 1
    if (
        task.vocab
        or len(task.shape) < 2
        or task.numel <= BLOCK_ELEMENTS
        or (task.kind == "merge" and not plan.method.in_row_blocks(task.shared))
        or (task.kind == "copy" and task.inputs[0].take is not None)
    ):
        return [(0, rows)]
    per = max(1, BLOCK_ELEMENTS // (task.numel // rows))
    return [(a, min(rows, a + per)) for a in range(0, rows, per)]


def _natural_key(name: str):
    i = layer_index(name)
    pre = 0 if (i is None and is_front(name)) else (1 if i is not None else 2)
    return (pre, i if i is not None else 0, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def _architecture(idx: ModelIndex, layers: bool) -> Tuple[Tuple[str, ...], Any, Any]:
    """(architectures, hidden size, layer count or None) from a model's config.json."""
    cfg = idx.config or {}
    return (
        tuple(cfg.get("architectures") or []),
        cfg.get("hidden_size"),
        cfg.get("num_hidden_layers") if layers else None,
    )


def _check_architectures(
    models: "OrderedDict[str, ModelIndex]", recipe: Recipe, allow_crimes: bool, layers: bool = True
) -> None:
    archs = {ref: _architecture(idx, layers) for ref, idx in models.items()}
    distinct = {k for k in archs.values() if k != ((), None, None)}
    if len(distinct) > 1 and not allow_crimes:
        desc = "; ".join(f"{r}: {k[0][0] if k[0] else '?'} hidden {k[1]} layers {k[2]}" for r, k in archs.items())
        raise MergeError(
            f"{recipe.at()}: the models have different architectures ({desc}); pass --allow-crimes to merge them anyway"
        )


@dataclass(frozen=True)
class SliceSource:
    """One model's layers [start, end) in an output slice. `position`: its place among the slice's sources (or in
    `models:`), which keys the random streams of its tensors."""

    model: str
    start: int
    end: int
    position: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def tensor(self, out_name: str, k: Optional[int]) -> str:
        """This source's name for output tensor `out_name`: of the slice's layer k (None: a non-layer tensor)."""
        return out_name if k is None else rename_layer(out_name, self.start + k)


@dataclass(frozen=True)
class Group:
    """One output slice: its sources, the base among them, the other sources (the inputs), and where its layers
    land in the output. A `models:` recipe is one group per layer stack, spanning all of its layers."""

    index: Optional[int]  # slice index, None for `models:`
    sources: List[SliceSource]
    base: Optional[SliceSource]
    inputs: List[SliceSource]
    out_start: int  # its first layer's place in its stack of the output
    resolver: ParameterResolver
    stack: Optional[str] = None  # the prefix of the layer stack it fills (stacks.Stack.prefix)
    module: Optional[str] = None  # its `modules:` entry

    @property
    def length(self) -> int:
        return self.sources[0].length

    @property
    def template(self) -> SliceSource:
        """The source whose tensors (names, shapes, dtypes) the output takes."""
        return self.base or self.sources[0]


def model_layers(idx: ModelIndex, where: str = "") -> int:
    """The layer count of a model with one layer stack (a decoder-only language model), as stack_layers checks it;
    0 without layers."""
    an = anatomy(idx.tensors)
    return stack_layers(idx, an, an.stacks[0].prefix, where) if an.stacks else 0


def stack_layers(idx: ModelIndex, an: Anatomy, prefix: Optional[str], where: str = "") -> int:
    """A model's layer count in one stack, from its tensors: every loop over layers is then bounded by what the
    files hold. A config.json that claims more layers than the tensors hold, or layers with no tensors, is refused:
    the weights are incomplete or the config is wrong (a config may count fewer, as for a multi-token-prediction
    layer)."""
    stack = an.stack(prefix)
    if stack is None:
        return 0
    n = stack.count
    at = f"{where}: " if where else ""
    of = f" of {stack.module}" if an.multi else ""
    if len(stack.held) != n:
        gap = min(set(range(n)) - set(stack.held))
        raise MergeError(
            f"{at}model {idx.ref}: its tensors hold layers{of} up to {n - 1} but nothing of layer {gap}; "
            "the weights are incomplete"
        )
    claimed = claimed_layers(stack, idx.config, an.multi)
    if n and claimed and claimed[1] > n:
        raise MergeError(
            f"{at}model {idx.ref}: its config.json says {claimed[0]} {claimed[1]} but its tensors "
            f"hold {n} layers{of}; the weights are incomplete or the config is wrong"
        )
    return n


def load_model(ref: str, where: str, recipe_dir: Optional[Path], found_at: Optional[str] = None) -> ModelIndex:
    """Resolve and index one recipe model; `model+adapter` attaches a LoRA adapter applied while reading.
    `found_at`: where an earlier merge found a relative path (Recipe.found_at), tried when the path itself misses."""
    from mergesmith.lora import check_targets, load_adapter, split_lora_ref

    lora = split_lora_ref(ref)
    try:
        if lora is None:
            try:
                return index_model(ref, resolve_model(ref, where, recipe_dir))
            except MergeError:
                if not found_at or not Path(found_at).is_dir():
                    raise
                return index_model(ref, Path(found_at))
        idx = index_model(ref, resolve_model(lora[0], where, recipe_dir))
        idx.lora = load_adapter(resolve_model(lora[1], where, recipe_dir), lora[1])
        check_targets(idx.lora, lora[1], {n: t.shape for n, t in idx.tensors.items()})
        return idx
    except MergeError as e:
        msg = str(e)
        raise MergeError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def embedding_rows(idx: ModelIndex) -> int:
    """Rows of a model's input embedding (its usable vocabulary), else its config's vocab_size."""
    for name, t in idx.tensors.items():
        if "embed_tokens" in name or (is_embedding(name) and "lm_head" not in name and t.shape):
            return t.shape[0]
    v = (idx.config or {}).get("vocab_size")
    return v if isinstance(v, int) else 0


def rename_layer(name: str, new: int) -> str:
    """`model.layers.7.mlp...` -> `model.layers.{new}.mlp...`"""
    m = _LAYER_RE.search(name)
    return name if m is None else name[: m.start(1)] + str(new) + name[m.end(1) :]


# -- step 1: the models ----------------------------------------------------------------------------------------------
def _resolvers(recipe: Recipe, method: Method) -> List[ParameterResolver]:
    """A parameter resolver per output slice (or `models:` list) the recipe writes, module by module."""
    c = recipe.config
    if c.modules:
        return [
            ParameterResolver(recipe, method, si, name)
            for name, m in c.modules.items()
            for si in (range(len(m.slices)) if m.slices else [None])
        ]
    return [ParameterResolver(recipe, method, si) for si in (range(len(c.slices)) if c.slices else [None])]


def _check_method_use(recipe: Recipe, method: Method) -> None:
    """What can be told before touching disk: parameter names the method does not know (typos like `densty`) and
    a missing or ignored base_model."""
    for resolver in _resolvers(recipe, method):
        resolver.warn_unknown()
    _check_base_named(recipe, method)


def _check_base_named(recipe: Recipe, method: Method) -> None:
    """A base_model where the method needs one; a warning where it ignores one."""
    c = recipe.config
    slice_bases = [s.base_model for _, slices in recipe.slice_lists() for s in slices if s.base_model]
    if method.base_policy == "required" and not c.base_model and not slice_bases:
        raise MergeError(f"{recipe.at('merge_method')}: {method.name} needs a 'base_model:'")
    if c.base_model and method.base_policy == "ignored" and recipe.model_lists():
        warn(f"{recipe.at('base_model')}: {method.name} does not use a base model; base_model is ignored")


def resolve_models(recipe: Recipe, recipe_dir: Optional[Path], allow_crimes: bool) -> "OrderedDict[str, ModelIndex]":
    """Resolve and index every model, in recipe order: the first problem is the one reported."""
    models: "OrderedDict[str, ModelIndex]" = OrderedDict()
    found = recipe.found_at()
    for ref, path in recipe.model_refs():
        if ref not in models:
            models[ref] = load_model(ref, recipe.at(*path), recipe_dir, found.get(ref))
    _check_architectures(models, recipe, allow_crimes, layers=not recipe.slice_lists())
    return models


def _vocabulary(recipe: Recipe, models: "OrderedDict[str, ModelIndex]") -> Any:
    """The output vocabulary when the recipe builds an output tokenizer, else None."""
    c = recipe.config
    if not (c.tokenizer_source or c.tokenizer is not None):
        return None
    from mergesmith.io.index import model_folder
    from mergesmith.vocab import build_vocabulary

    return build_vocabulary(
        recipe,
        {r: model_folder(m) for r, m in models.items()},
        {r: embedding_rows(m) for r, m in models.items()},
        c.base_model,
    )


# -- step 2: the output slices ---------------------------------------------------------------------------------------
Anatomies = Dict[str, Anatomy]


@dataclass(frozen=True)
class _Spec:
    """What the recipe says of one output group, before its base is picked."""

    index: Optional[int]  # slice index, None for a `models:` list
    sources: List[SliceSource]
    base_ref: Optional[str]  # the base model named
    path: tuple  # its place in the recipe
    stack: Optional[str]  # the layer stack it fills
    module: Optional[str] = None  # its `modules:` entry


def _models_sources(
    recipe: Recipe,
    method: Method,
    models: "OrderedDict[str, ModelIndex]",
    anats: Anatomies,
    entries: List[InputModelDefinition],
    stack: Optional[str],
) -> List[SliceSource]:
    """A `models:` list: every layer of the stack in each model (and in a base that is not listed)."""
    c = recipe.config
    listed = [m.model for m in entries]
    refs = list(dict.fromkeys(listed))
    if c.base_model and c.base_model not in refs and method.base_policy != "ignored":
        refs.append(c.base_model)
    paths = dict(recipe.model_refs())
    return [
        SliceSource(
            r,
            0,
            stack_layers(models[r], anats[r], stack, recipe.at(*paths.get(r, ()))),
            listed.index(r) if r in listed else len(listed),
        )
        for r in refs
    ]


def _slice_sources(
    recipe: Recipe,
    path: tuple,
    sl: OutputSliceDefinition,
    models: "OrderedDict[str, ModelIndex]",
    anats: Anatomies,
    stack: Optional[str],
    module: Optional[str] = None,
) -> List[SliceSource]:
    """The sources of the slice at `path`, each layer_range within what its model holds in the stack."""
    sources = []
    for j, src in enumerate(sl.sources):
        a, b = src.layer_range
        have = stack_layers(models[src.model], anats[src.model], stack, recipe.at(*path, "sources", j, "model"))
        if b > have:
            raise MergeError(
                f"{recipe.at(*path, 'sources', j, 'layer_range')}: layer_range [{a}, {b}] but "
                f"{src.model} has {have} layers{f' in {module}' if module else ''} (0 to {have - 1}); "
                "the end is exclusive"
            )
        sources.append(SliceSource(src.model, a, b, j))
    return sources


def _refuse_many_stacks(recipe: Recipe, anats: Anatomies) -> None:
    """`slices:` on a model with two layer stacks (T5, Whisper, CLIP, a VLM): a layer_range cannot say which one it
    means (mergekit refuses them too)."""
    for ref, an in anats.items():
        if an.multi:
            mods = ", ".join(f"{s.module} ({s.prefix}N)" for s in an.stacks)
            raise MergeError(
                f"{recipe.at('slices')}: model {ref} has {len(an.stacks)} layer stacks ({mods}), and a "
                f"layer_range cannot say which one it means; use 'modules:' with an entry per stack "
                f"to slice (like '{an.stacks[0].module}: {{slices: [...]}}'), as in mergekit"
            )


def _group_specs(
    recipe: Recipe, method: Method, models: "OrderedDict[str, ModelIndex]", anats: Anatomies
) -> List[_Spec]:
    """Each output group; every layer range is checked before any group's base."""
    c = recipe.config
    if c.modules:
        return _module_specs(recipe, method, models, anats)
    if c.models:
        lead = anats[c.models[0].model]
        return [
            _Spec(None, _models_sources(recipe, method, models, anats, c.models, s), c.base_model, ("models",), s)
            for s in [s.prefix for s in lead.stacks] or [None]
        ]
    _refuse_many_stacks(recipe, anats)
    lead = anats[c.slices[0].sources[0].model]
    stack = lead.stacks[0].prefix if lead.stacks else None
    return [
        _Spec(
            si,
            _slice_sources(recipe, ("slices", si), sl, models, anats, stack),
            sl.base_model or c.base_model,
            ("slices", si),
            stack,
        )
        for si, sl in enumerate(c.slices)
    ]


def _module_stack(
    recipe: Recipe, name: str, mod: OutputModuleDefinition, an: Anatomy, ref: str, seen: Dict[Optional[str], str]
) -> Optional[str]:
    """The stack a `modules:` entry names in its first model (None: the tensors outside every stack)."""
    stack = an.find(name)
    if stack is None and name not in an.outside:
        names = [n for s in an.stacks for n in s.names] + list(an.outside)
        raise MergeError(
            f"{recipe.at('modules', name)}: model {ref} has no module {name!r}; its modules are "
            f"{', '.join(an.module_names()) or 'none (it has no layers)'}{did_you_mean(name, names)}"
        )
    if stack is None and mod.slices:
        raise MergeError(
            f"{recipe.at('modules', name, 'slices')}: module {name!r} holds no layers (the tensors "
            "outside every layer stack); give it 'models:'"
        )
    prefix = stack.prefix if stack else None
    if prefix in seen:
        raise MergeError(
            f"{recipe.at('modules', name)}: {name!r} and {seen[prefix]!r} name the same module of {ref}; list it once"
        )
    seen[prefix] = name
    return prefix


def _module_specs(
    recipe: Recipe, method: Method, models: "OrderedDict[str, ModelIndex]", anats: Anatomies
) -> List[_Spec]:
    """A `modules:` recipe: each entry's slices (or models) on its own stack, then each stack it does not list,
    whole, by the first entry's rule (as the tensors outside every stack)."""
    c = recipe.config
    specs: List[_Spec] = []
    seen: Dict[Optional[str], str] = {}
    for name, mod in c.modules.items():
        ref = mod.models[0].model if mod.models else mod.slices[0].sources[0].model
        stack = _module_stack(recipe, name, mod, anats[ref], ref, seen)
        at = ("modules", name)
        if mod.models:
            sources = _models_sources(recipe, method, models, anats, mod.models, stack)
            specs.append(_Spec(None, sources, c.base_model, at + ("models",), stack, name))
            continue
        specs += [
            _Spec(
                si,
                _slice_sources(recipe, at + ("slices", si), sl, models, anats, stack, name),
                sl.base_model or c.base_model,
                at + ("slices", si),
                stack,
                name,
            )
            for si, sl in enumerate(mod.slices)
        ]
    rule = specs[0]
    for stack in anats[rule.sources[0].model].stacks:
        if stack.prefix not in seen:
            sources = [
                SliceSource(s.model, 0, stack_layers(models[s.model], anats[s.model], stack.prefix), s.position)
                for s in rule.sources
            ]
            specs.append(_Spec(rule.index, sources, rule.base_ref, rule.path, stack.prefix, rule.module))
    return specs


def _pick_base(
    recipe: Recipe, method: Method, sources: List[SliceSource], base_ref: Optional[str], path: tuple
) -> Optional[SliceSource]:
    """The slice's source that is its base, when the method uses one."""
    base = None
    if method.uses_base and base_ref:
        base = next((s for s in sources if s.model == base_ref), None)
        if base is None:
            raise MergeError(
                f"{recipe.at(*path)}: the base model {base_ref} is not among this slice's sources; "
                f"{method.name} needs it as one of them (with its layer_range)"
            )
    if method.base_policy == "required" and base is None:
        raise MergeError(f"{recipe.at('merge_method')}: {method.name} needs a 'base_model:'")
    return base


def _check_arity(recipe: Recipe, method: Method, inputs: List[SliceSource], path: tuple) -> None:
    """As many inputs as the method takes."""
    n = len(inputs)
    if method.min_inputs <= n and (method.max_inputs is None or n <= method.max_inputs):
        return
    want = (
        f"exactly {method.min_inputs}"
        if method.max_inputs == method.min_inputs
        else f"at least {method.min_inputs}"
        if method.max_inputs is None
        else f"{method.min_inputs} to {method.max_inputs}"
    )
    what = "models besides the base" if method.uses_base else "models"
    raise MergeError(
        f"{recipe.at(*path)}: {method.name} takes {want} {what}, got {n}"
        + (f" ({', '.join(s.model for s in inputs)})" if inputs else "")
    )


def output_groups(
    recipe: Recipe, method: Method, models: "OrderedDict[str, ModelIndex]", anats: Optional[Anatomies] = None
) -> List[Group]:
    """The output groups in order, each placed after the layers of the ones before it in its stack."""
    anats = anats or anatomies(models)
    groups: List[Group] = []
    out: Counter = Counter()
    for spec in _group_specs(recipe, method, models, anats):
        base = _pick_base(recipe, method, spec.sources, spec.base_ref, spec.path)
        inputs = [s for s in spec.sources if s is not base]
        _check_arity(recipe, method, inputs, spec.path)
        g = Group(
            spec.index,
            spec.sources,
            base,
            inputs,
            out[spec.stack],
            ParameterResolver(recipe, method, spec.index, spec.module),
            spec.stack,
            spec.module,
        )
        groups.append(g)
        out[spec.stack] += g.length
    return groups


def anatomies(models: "OrderedDict[str, ModelIndex]") -> Anatomies:
    """Each model's layer stacks."""
    return {ref: anatomy(idx.tensors) for ref, idx in models.items()}


# -- steps 3 and 4: each output tensor's inputs and parameters -------------------------------------------------------
def _check_values(
    method: Method,
    resolver: ParameterResolver,
    tensor: str,
    shared: Dict[str, Any],
    refs: List[str],
    per_input: List[Dict[str, Any]],
    allow_extrapolation: bool,
) -> None:
    """Every resolved parameter value of one output tensor within its method's ranges (methods.check_params)."""
    problem = check_params(method, shared, per_input, allow_extrapolation)
    if problem is None:
        return
    bad, msg, i = problem
    shared_param = getattr(method.param(bad), "scope", None) == "shared"
    who = f"model {refs[i]}, " if i is not None else ""
    raise MergeError(f"{resolver.where(None if shared_param else refs[i or 0], bad)}: {who}tensor {tensor}: {msg}")


@dataclass(frozen=True)
class _Target:
    """One output tensor and what it takes from its group's template source."""

    name: str  # in the output
    k: Optional[int]  # the slice's layer, None for a non-layer tensor
    model: str  # the template model
    tensor: str  # the tensor's name there
    info: TensorInfo
    vocab: bool  # rows are token ids of the output vocabulary
    out_dtype: torch.dtype

    @property
    def is_float(self) -> bool:
        return self.info.dtype.is_floating_point


@dataclass
class _TensorPlanner:
    """Plans the output tensors one by one, counting what the notes report."""

    models: "OrderedDict[str, ModelIndex]"
    anats: Anatomies
    method: Method
    vocabulary: Any
    final_dtype: Optional[str]
    totals: Dict[Optional[str], int]  # the output's layer count per stack
    seed: int
    allow_crimes: bool
    allow_extrapolation: bool
    gradient_span: str
    unsafe_truncate_embeddings: bool = False
    tasks: List[TensorTask] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def walk(self, groups: List[Group]) -> Dict[Optional[str], List[Tuple[str, int]]]:
        """Every output tensor in output order: per stack, its first group's embeddings, each group's layers, its
        last group's head and norms; the tensors outside every stack (a projector) before and after them, by the
        first module's rule (or the `modules:` entry naming them). Returns (model, its layer) per output layer of
        each stack."""
        sections: Dict[Optional[str], List[Group]] = {}
        for g in groups:
            sections.setdefault(g.stack, []).append(g)
        stacked = [(s, gs) for s, gs in sections.items() if s is not None]
        rule = sections.get(None) or stacked[0][1]
        self._outer(rule[0], None, front=True)
        layer_sources: Dict[Optional[str], List[Tuple[str, int]]] = {}
        for stack, gs in stacked:
            self._outer(gs[0], stack, front=True)
            layer_sources[stack] = [src for g in gs for src in self._layers(g)]
            self._outer(gs[-1], stack, front=False)
        self._outer(rule[-1], None, front=False)
        return layer_sources

    def _outer(self, g: Group, stack: Optional[str], front: bool) -> None:
        """The non-layer tensors of group g's template that precede (or follow) the layers of `stack`."""
        an = self.anats[g.template.model]
        names = [
            n
            for n in self.models[g.template.model].tensors
            if layer_index(n) is None and is_front(n) == front and an.owner(n) == stack
        ]
        for name in sorted(names, key=_natural_key):
            self.add(g, name, None)

    def _layers(self, g: Group) -> List[Tuple[str, int]]:
        """The output layers of group g: every tensor of its template's layers, renamed to the output's."""
        tsrc = g.template
        stack = self.anats[tsrc.model].stack(g.stack)
        for k in range(g.length):
            for name in sorted(stack.held.get(tsrc.start + k, ()), key=_natural_key):
                self.add(g, rename_layer(name, g.out_start + k), k)
        return [(tsrc.model, tsrc.start + k) for k in range(g.length)]

    def add(self, g: Group, out_name: str, k: Optional[int]) -> None:
        """One output tensor of group g: of the slice's layer k (None for a non-layer tensor)."""
        tgt = self._target(g, out_name, k)
        base = InputRef(g.base.model, g.base.tensor(out_name, k)) if g.base is not None else None
        used: List[Tuple[SliceSource, InputRef]] = []
        for src in g.inputs:
            ref = self._input(tgt, src)
            if ref is not None:
                used.append((src, ref))
        self.tasks.append(self._task(g, tgt, base, used))

    def _target(self, g: Group, out_name: str, k: Optional[int]) -> _Target:
        """The output tensor as its group's template model holds it, in the output dtype."""
        tsrc = g.template
        name = tsrc.tensor(out_name, k)
        info = self.models[tsrc.model].tensors[name]
        is_float = info.dtype.is_floating_point
        vocab = self.vocabulary is not None and is_float and is_embedding(out_name) and len(info.shape) >= 1
        out_dtype = TORCH_DTYPES[self.final_dtype] if (self.final_dtype and is_float) else info.dtype
        return _Target(out_name, k, tsrc.model, name, info, vocab, out_dtype)

    # -- step 3: the inputs ----------------------------------------------------------------------------------
    def _input(self, tgt: _Target, src: SliceSource) -> Optional[InputRef]:
        """Source src's tensor for the output tensor; None when it is left out; refused when it cannot merge."""
        ref = src.model
        name, ti = self._lookup(ref, src.tensor(tgt.name, tgt.k), tgt.name)
        if ti is None:
            if not self.allow_crimes:
                raise MergeError(
                    f"model {ref} lacks tensor {name}, which {tgt.model} has (the output takes "
                    f"{tgt.model}'s tensors); pass --allow-crimes to merge such tensors without it"
                )
            self.counts[f"{ref} lacks some tensors of {tgt.model}; those merge without it"] += 1
            return None
        take = None
        if tgt.vocab:
            if tuple(ti.shape[1:]) != tuple(tgt.info.shape[1:]):
                raise MergeError(
                    f"model {ref}: tensor {name} has shape {list(ti.shape)} but {tgt.model}'s is "
                    f"{list(tgt.info.shape)}; only the vocabulary dimension may differ"
                )
        elif ti.shape != tgt.info.shape:
            if not self._leading_block(ref, name, ti, tgt):
                return None
            take = tgt.info.shape
        if not ti.dtype.is_floating_point and tgt.is_float:
            raise MergeError(f"model {ref}: tensor {name} is {ti.dtype}, not a float")
        return InputRef(ref, name, take)

    def _lookup(self, ref: str, name: str, out_name: str) -> Tuple[str, Optional[TensorInfo]]:
        """Model ref's tensor `name`; a tied model's output embedding is its input embedding."""
        idx = self.models[ref]
        ti = idx.tensors.get(name)
        if ti is None and "lm_head" in name and (idx.config or {}).get("tie_word_embeddings"):
            tied = next((n for n in idx.tensors if "embed_tokens" in n), None)
            if tied is not None:
                self.counts[f"{ref} ties its embeddings: its {tied} stands in for {out_name}"] += 1
                return tied, idx.tensors[tied]
        return name, ti

    def _leading_block(self, ref: str, name: str, ti: TensorInfo, tgt: _Target) -> bool:
        """A tensor shaped unlike the template's: an embedding with more rows gives its leading block (True);
        another embedding, or under --allow-crimes any tensor, is left out (False); anything else is refused."""
        shape = tgt.info.shape
        if (
            not self.unsafe_truncate_embeddings
            and is_embedding(name)
            and len(ti.shape) == len(shape)
            and ti.shape[1:] == shape[1:]
        ):
            raise MergeError(
                f"model {ref}: {name} has {ti.shape[0]} vocabulary rows but {tgt.model}'s has "
                f"{shape[0]}; the vocabularies differ: set tokenizer_source: union (or base, or a "
                "model) in the recipe to map every model's tokens, or pass --unsafe-truncate-embeddings "
                f"to merge row for row in {shape[0]} rows (only right when the token ids agree)"
            )
        if len(ti.shape) == len(shape) and is_embedding(name) and all(a >= b for a, b in zip(ti.shape, shape)):
            self.counts[f"{ref}: {name} is {list(ti.shape)}, using its leading {list(shape)} block"] += 1
            return True
        if is_embedding(name) or self.allow_crimes:
            self.counts[
                f"{ref}: {name} is {list(ti.shape)} but {tgt.model}'s is {list(shape)}; skipped for that tensor"
            ] += 1
            return False
        raise MergeError(
            f"model {ref}: tensor {name} has shape {list(ti.shape)} but {tgt.model}'s "
            f"is {list(shape)}; the models are not the same architecture "
            "(--allow-crimes skips such tensors)"
        )

    # -- step 4: copy or merge, and the parameters -----------------------------------------------------------
    def _task(
        self, g: Group, tgt: _Target, base: Optional[InputRef], used: List[Tuple[SliceSource, InputRef]]
    ) -> TensorTask:
        if not tgt.is_float or (not used and base is None):
            if not tgt.is_float:
                self.counts[f"non-float tensors copied from {tgt.model}"] += 1
            return _copy_task(tgt, InputRef(tgt.model, tgt.tensor))
        if not used and not tgt.vocab:
            return _copy_task(tgt, base)  # only the base has it: what every method returns without inputs
        return self._merge_task(g, tgt, base, used)

    def _merge_task(
        self, g: Group, tgt: _Target, base: Optional[InputRef], used: List[Tuple[SliceSource, InputRef]]
    ) -> TensorTask:
        ins = [ref for _, ref in used]
        refs = [src.model for src, _ in used]
        shared, per_input = g.resolver.resolve(
            tgt.name,
            self._position(g, tgt.k),
            refs,
            g.base.model if g.base else None,
            input_names=[r.name for r in ins],
        )
        _check_values(self.method, g.resolver, tgt.name, shared, refs, per_input, self.allow_extrapolation)
        if self.method.copies(shared, per_input) and not tgt.vocab:
            return _copy_task(tgt, ins[0])
        keys = (
            [stream_key(self.seed, f"model{src.position}", tgt.name) for src, _ in used]
            if self.method.randomized
            else [0] * len(used)
        )
        shape = (self.vocabulary.size, *tgt.info.shape[1:]) if tgt.vocab else tgt.info.shape
        return TensorTask(tgt.name, shape, tgt.out_dtype, "merge", base, ins, shared, per_input, keys, vocab=tgt.vocab)

    def _position(self, g: Group, k: Optional[int]) -> float:
        """The gradient position t of the slice's layer k (non-layer tensors: 0)."""
        if k is None:
            return 0.0
        if self.gradient_span == "output":  # over the stack's output layers (one `models:` slice: the same thing)
            n = self.totals[g.stack]
            return (g.out_start + k) / (n - 1) if n > 1 else 1.0
        return k / (g.length - 1) if g.length > 1 else 1.0  # mergekit: over the slice's own layers


def _copy_task(tgt: _Target, source: InputRef) -> TensorTask:
    return TensorTask(tgt.name, tgt.info.shape, tgt.out_dtype, "copy", None, [source])


# -- step 5: the whole output (checks, notes, layout), and make_plan -------------------------------------------------
def _check_unique(recipe: Recipe, tasks: Sequence[TensorTask]) -> None:
    """No output tensor name planned twice."""
    seen = Counter(t.name for t in tasks)
    dup = [n for n, k in seen.items() if k > 1]
    if dup:
        raise MergeError(f"{recipe.at()}: the output would hold tensor {dup[0]} twice; check the slices")


def _notes(recipe: Recipe, models: "OrderedDict[str, ModelIndex]", first: Group, counts: Counter) -> List[str]:
    """What the user should know about tensors left out, stood in for or copied, each with its count."""
    notes = [f"{msg} ({n} tensor{'s' if n != 1 else ''})" for msg, n in counts.items()]
    if recipe.config.models:
        tref = first.template.model
        for src in first.inputs:
            missing = sum(1 for n in models[src.model].tensors if n not in models[tref].tensors)
            if missing:
                notes.append(f"{src.model} has {missing} tensor(s) that {tref} lacks; they are not in the output")
    return notes


def _check_countable(
    recipe: Recipe, template: ModelIndex, anats: Anatomies, stacks: Dict[Optional[str], List[Tuple[str, int]]]
) -> None:
    """Each layer stack that the output changes has a config.json key to count it."""
    stack = uncountable(anats[template.ref], template.config, template.ref, stacks)
    if stack is not None:
        raise MergeError(
            f"{recipe.at()}: the output changes the layers of {stack.module} ({stack.prefix}N), but "
            f"mergesmith cannot tell which key of {template.ref}'s config.json counts them; "
            "merge that stack whole"
        )


def _check_inputs(recipe: Recipe, groups: List[Group]) -> None:
    """Something to merge or copy in some slice."""
    if not groups or not any(g.inputs or g.base for g in groups):
        raise MergeError(f"{recipe.at('models')}: no models to merge")


def _out_dtype(recipe: Recipe, dtype: Optional[str], out_dtype: Optional[str]) -> Optional[str]:
    """The output's float dtype: out_dtype, else the working dtype, else (None) each tensor's own."""
    work_dtype = normalize_dtype(dtype or recipe.config.dtype)
    return normalize_dtype(out_dtype or recipe.config.out_dtype) or work_dtype


def _seed(seed: Optional[int]) -> Tuple[int, bool]:
    """(the seed, whether it was given): one is drawn now when none was."""
    return (secrets.randbits(31), False) if seed is None else (seed, True)


def _layer_totals(groups: List[Group]) -> Counter:
    """The output's layer count per stack."""
    totals: Counter = Counter()
    for g in groups:
        totals[g.stack] += g.length
    return totals


def make_plan(
    recipe: Recipe,
    seed: Optional[int] = None,
    dtype: Optional[str] = None,
    out_dtype: Optional[str] = None,
    shard_size: int = 5 * 10**9,
    allow_crimes: bool = False,
    recipe_dir: Optional[Path] = None,
    gradient_span: str = "slice",
    allow_extrapolation: bool = False,
    strict: bool = False,
    unsafe_truncate_embeddings: bool = False,
) -> Plan:
    """Check the recipe against its models and plan every output tensor; `strict`: NaN/Inf in an input is an
    error when merging; `unsafe_truncate_embeddings`: vocabularies of different sizes without a tokenizer setting
    merge row for row (else refused). The first problem found is the one raised."""
    c = recipe.config
    method = get_method(c.merge_method)
    _check_method_use(recipe, method)
    models = resolve_models(recipe, recipe_dir, allow_crimes)
    anats = anatomies(models)
    groups = output_groups(recipe, method, models, anats)
    vocabulary = _vocabulary(recipe, models)
    _check_inputs(recipe, groups)
    totals = _layer_totals(groups)
    seed, seed_given = _seed(seed)
    planner = _TensorPlanner(
        models,
        anats,
        method,
        vocabulary,
        _out_dtype(recipe, dtype, out_dtype),
        totals,
        seed,
        allow_crimes,
        allow_extrapolation,
        gradient_span,
        unsafe_truncate_embeddings,
    )
    stacks = planner.walk(groups)
    _check_unique(recipe, planner.tasks)
    _check_countable(recipe, models[groups[0].template.model], anats, stacks)
    notes = _notes(recipe, models, groups[0], planner.counts)
    for n in notes:
        warn(n)
    layout = plan_layout([(t.name, t.out_dtype, t.shape) for t in planner.tasks], shard_size)
    return Plan(
        recipe=recipe,
        method=method,
        models=models,
        base_model=c.base_model,
        seed=seed,
        seed_given=seed_given,
        tasks=tuple(planner.tasks),
        layout=layout,
        notes=tuple(notes),
        template=groups[0].template.model,
        stacks=tuple((k, tuple(v)) for k, v in stacks.items()),
        sliced=bool(c.slices or c.modules),
        vocabulary=vocabulary,
        strict=strict,
    )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"


def describe(plan: Plan) -> str:
    """Human-readable summary: models, methods, parameters per tensor group, bytes, expected peak memory."""
    lines = _describe_header(plan) + _describe_layers(plan) + _describe_tensors(plan)
    lines += [
        f"read:   {_fmt_bytes(plan.bytes_read)}",
        f"write:  {_fmt_bytes(plan.bytes_written)}",
        f"peak memory (expected, tensor work): {_fmt_bytes(plan.peak_bytes_estimate)}",
    ]
    return "\n".join(lines + [f"note:   {n}" for n in plan.notes])


def _describe_header(plan: Plan) -> List[str]:
    """Recipe, method, seed, and each model with its size and folder."""
    m = plan.method
    lines = [
        f"recipe: {plan.recipe.source}",
        f"method: {m.name} ({m.pretty}, {m.url})",
        f"seed:   {plan.seed}{'' if plan.seed_given else ' (chosen now; pass --seed to fix it)'}"
        if m.randomized
        else "seed:   not used (the method draws nothing at random)",
        "models:",
    ]
    for ref, idx in plan.models.items():
        role = " (base)" if ref == plan.base_model else ""
        size = sum(t.nbytes for t in idx.tensors.values())
        lines.append(f"  {ref}{role}: {len(idx.tensors)} tensors, {_fmt_bytes(size)} at {idx.path}")
    return lines


def _layer_runs(layer_sources: Sequence[Tuple[str, int]]) -> List[List[Any]]:
    """Consecutive output layers taken from consecutive layers of one model, as
    [first out layer, last out layer, model, first source layer]."""
    runs: List[List[Any]] = []
    for o, (ref, i) in enumerate(layer_sources):
        if runs and runs[-1][2] == ref and runs[-1][3] + (o - runs[-1][0]) == i:
            runs[-1][1] = o
        else:
            runs.append([o, o, ref, i])
    return runs


def _describe_layers(plan: Plan) -> List[str]:
    """Where a sliced output's layers come from, stack by stack; nothing for a `models:` recipe."""
    if not plan.sliced:
        return []
    merged = plan.method.uses_base or plan.method.max_inputs != 1
    lines = [f"layers: {plan.num_layers} in the output"]
    pad = "    " if len(plan.stacks) > 1 else "  "
    for stack, layers in plan.stacks:
        if len(plan.stacks) > 1:
            lines.append(f"  {stack}N: {len(layers)} layers")
        for a, b, ref, i in _layer_runs(layers):
            lines.append(
                f"{pad}{a}-{b} <- {ref} layers {i}-{i + b - a}"
                + (" (template; merged with the slice's sources)" if merged else "")
            )
    return lines


def _task_summary(plan: Plan, t: TensorTask) -> str:
    """What is done to a tensor: copied from a model, or merged with these parameters."""
    if t.kind == "copy":
        return f"copy from {t.inputs[0].model}"
    shared = ", ".join(f"{k}={v}" for k, v in t.shared.items())
    per = "; ".join(
        f"{r.model.split('/')[-1].split(chr(92))[-1]}: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
        for r, p in zip(t.inputs, t.per_input)
    )
    return f"{plan.method.name}[{shared}] {per}"


def _describe_tensors(plan: Plan) -> List[str]:
    """The tensors grouped by what is done to them, a few names of each group shown."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for t in plan.tasks:
        groups.setdefault(_task_summary(plan, t), []).append(t.name)
    lines = [
        f"tensors: {len(plan.tasks)} in {len(plan.layout.files)} file(s), out dtype "
        f"{', '.join(sorted({str(t.out_dtype).replace('torch.', '') for t in plan.tasks}))}"
    ]
    for key, names in groups.items():
        shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
        lines.append(f"  {len(names):5d} x {key}")
        lines.append(f"          {shown}")
    return lines
