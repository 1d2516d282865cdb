"""The Plan: a pure function of (Recipe, model indexes, options) -> every output tensor with its inputs, resolved
parameters, dtype and place in the output shards. Every validation error surfaces here, before a tensor is read.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergesmith.errors import MergeError, warn
from mergesmith.io.index import ModelIndex, index_model
from mergesmith.io.resolve import resolve_model
from mergesmith.io.writer import Layout, plan_layout
from mergesmith.methods import Method, check_params, get_method
from mergesmith.methods.rng import stream_key
from mergesmith.params import _LAYER_RE, ParameterResolver, is_embedding, layer_index
from mergesmith.recipe import Recipe, normalize_dtype

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class InputRef:
    model: str  # recipe reference
    name: str  # tensor name in that model
    take: Optional[Tuple[int, ...]] = None  # read only this leading sub-block (embedding rows beyond the base's)


@dataclass
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


@dataclass
class Plan:
    recipe: Recipe
    method: Method
    models: "OrderedDict[str, ModelIndex]"
    base_model: Optional[str]
    seed: int
    seed_given: bool
    tasks: List[TensorTask]
    layout: Layout
    notes: List[str] = field(default_factory=list)
    template: Optional[str] = None  # the model whose config.json the output takes
    num_layers: int = 0  # the output's layer count
    layer_sources: List[Tuple[str, int]] = field(default_factory=list)  # (model, its layer) per output layer
    sliced: bool = False
    vocabulary: Any = None  # mergesmith.vocab.Vocabulary when the recipe builds an output tokenizer
    strict: bool = False  # NaN/Inf in inputs: an error instead of a warning

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
        """Two tensors (or row blocks) in flight, each with its float32 working set: the inputs, their deltas,
        sorting and masks, and the output; of the two-pass tensors in row blocks (1 bit per element and model of
        saved masks), at most one at a time (execute.keeps_state)."""
        two_pass_sizes, others = [0], [0]
        for t in self.tasks:
            n_in = len(t.inputs) + (1 if t.base else 0)
            blocks = row_blocks(self, t)
            elems = max(b - a for a, b in blocks) * (t.numel // max(1, t.shape[0] if t.shape else 1))
            two_pass = len(blocks) > 1 and self.method.keeps_state(t.shared)
            work = elems * (4 * (2 * n_in + 6))
            if two_pass:  # two blocks at a time, and the saved masks
                two_pass_sizes.append(2 * work + t.numel * n_in // 8)
            else:
                others.append(work)
        others.sort(reverse=True)
        return max(max(two_pass_sizes) + others[0], sum(others[:2]))


# Tensors above this many elements are merged in blocks of rows when the method allows it. A constant: the
# blocking (and so every rounding) depends only on the tensor's shape, never on the machine.
BLOCK_ELEMENTS = 1 << 22


def row_blocks(plan: "Plan", task: TensorTask) -> List[Tuple[int, int]]:
    """[(first_row, end_row)] for a task: one block unless it is large and its method is row-wise."""
    rows = task.shape[0] if task.shape else 1
    if (task.kind != "merge" or task.vocab or len(task.shape) < 2 or task.numel <= BLOCK_ELEMENTS
            or not plan.method.in_row_blocks(task.shared)):
        return [(0, rows)]
    per = max(1, BLOCK_ELEMENTS // (task.numel // rows))
    return [(a, min(rows, a + per)) for a in range(0, rows, per)]


def _natural_key(name: str):
    i = layer_index(name)
    pre = 0 if (i is None and is_embedding(name) and "lm_head" not in name) else (1 if i is not None else 2)
    return (pre, i if i is not None else 0, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def _check_architectures(models: "OrderedDict[str, ModelIndex]", recipe: Recipe, allow_crimes: bool,
                         layers: bool = True) -> None:
    archs = {}
    for ref, idx in models.items():
        cfg = idx.config or {}
        key = (tuple(cfg.get("architectures") or []), cfg.get("hidden_size"),
               cfg.get("num_hidden_layers") if layers else None)
        archs[ref] = key
    distinct = {k for k in archs.values() if k != ((), None, None)}
    if len(distinct) > 1 and not allow_crimes:
        desc = "; ".join(f"{r}: {k[0][0] if k[0] else '?'} hidden {k[1]} layers {k[2]}" for r, k in archs.items())
        raise MergeError(f"{recipe.at()}: the models have different architectures ({desc}); "
                         "pass --allow-crimes to merge them anyway")


@dataclass
class Group:
    """One output slice: sources (model, first layer, end layer, position), the base among them, and where its
    layers land in the output. A `models:` recipe is one group spanning every layer."""
    index: Optional[int]  # slice index, None for `models:`
    sources: List[Tuple[str, int, int, int]]
    base: Optional[Tuple[str, int, int, int]]
    inputs: List[Tuple[str, int, int, int]]
    out_start: int
    resolver: ParameterResolver

    @property
    def length(self) -> int:
        s = self.sources[0]
        return s[2] - s[1]

    @property
    def template(self) -> Tuple[str, int, int, int]:
        return self.base or self.sources[0]


def layer_names(idx: ModelIndex) -> Dict[int, List[str]]:
    """{layer: its tensor names} of a model."""
    out: Dict[int, List[str]] = {}
    for name in idx.tensors:
        i = layer_index(name)
        if i is not None:
            out.setdefault(i, []).append(name)
    return out


def model_layers(idx: ModelIndex, where: str = "") -> int:
    """A model's layer count, from its tensors: every loop over layers is then bounded by what the files hold. A
    config.json that claims more layers than the tensors hold, or layers with no tensors, is refused: the weights
    are incomplete or the config is wrong (a config may count fewer, as for a multi-token-prediction layer)."""
    held = layer_names(idx)
    n = max(held, default=-1) + 1
    at = f"{where}: " if where else ""
    if len(held) != n:
        gap = min(set(range(n)) - set(held))
        raise MergeError(f"{at}model {idx.ref}: its tensors hold layers up to {n - 1} but nothing of layer {gap}; "
                         "the weights are incomplete")
    claimed = (idx.config or {}).get("num_hidden_layers")
    if n and isinstance(claimed, int) and not isinstance(claimed, bool) and claimed > n:
        raise MergeError(f"{at}model {idx.ref}: its config.json says num_hidden_layers {claimed} but its tensors "
                         f"hold {n} layers; the weights are incomplete or the config is wrong")
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
    return name if m is None else name[:m.start(1)] + str(new) + name[m.end(1):]


def _groups(recipe: Recipe, method: Method, models: "OrderedDict[str, ModelIndex]") -> List[Group]:
    c = recipe.config
    groups: List[Group] = []
    if c.models:
        listed = [m.model for m in c.models]
        refs = list(dict.fromkeys(listed))
        if c.base_model and c.base_model not in refs and method.base_policy != "ignored":
            refs.append(c.base_model)
        paths = dict(recipe.model_refs())
        sources = [(r, 0, model_layers(models[r], recipe.at(*paths.get(r, ()))),
                    listed.index(r) if r in listed else len(listed)) for r in refs]
        specs = [(None, sources, c.base_model, ("models",))]
    else:
        specs = []
        for si, sl in enumerate(c.slices):
            srcs = []
            for j, src in enumerate(sl.sources):
                a, b = src.layer_range
                have = model_layers(models[src.model], recipe.at('slices', si, 'sources', j, 'model'))
                if b > have:
                    raise MergeError(f"{recipe.at('slices', si, 'sources', j, 'layer_range')}: layer_range [{a}, {b}] "
                                     f"but {src.model} has {have} layers (0 to {have - 1}); the end is exclusive")
                srcs.append((src.model, a, b, j))
            specs.append((si, srcs, sl.base_model or c.base_model, ("slices", si)))
    out = 0
    for si, sources, base_ref, path in specs:
        base = None
        if method.uses_base and base_ref:
            base = next((s for s in sources if s[0] == base_ref), None)
            if base is None:
                raise MergeError(f"{recipe.at(*path)}: the base model {base_ref} is not among this slice's sources; "
                                 f"{method.name} needs it as one of them (with its layer_range)")
        if method.base_policy == "required" and base is None:
            raise MergeError(f"{recipe.at('merge_method')}: {method.name} needs a 'base_model:'")
        inputs = [s for s in sources if s is not base]
        n = len(inputs)
        what = "models besides the base" if method.uses_base else "models"
        if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
            want = (f"exactly {method.min_inputs}" if method.max_inputs == method.min_inputs else
                    f"at least {method.min_inputs}" if method.max_inputs is None else
                    f"{method.min_inputs} to {method.max_inputs}")
            raise MergeError(f"{recipe.at(*path)}: {method.name} takes {want} {what}, got {n}"
                             + (f" ({', '.join(s[0] for s in inputs)})" if inputs else ""))
        g = Group(si, sources, base, inputs, out, ParameterResolver(recipe, method, si))
        groups.append(g)
        out += g.length
    return groups


def _check_values(method: Method, resolver: ParameterResolver, tensor: str, shared: Dict[str, Any],
                  refs: List[str], per_input: List[Dict[str, Any]], allow_extrapolation: bool) -> None:
    """Every resolved parameter value of one output tensor within its method's ranges (methods.check_params)."""
    problem = check_params(method, shared, per_input, allow_extrapolation)
    if problem is None:
        return
    bad, msg, i = problem
    shared_param = getattr(method.param(bad), "scope", None) == "shared"
    who = f"model {refs[i]}, " if i is not None else ""
    raise MergeError(f"{resolver.where(None if shared_param else refs[i or 0], bad)}: {who}tensor {tensor}: {msg}")


def make_plan(recipe: Recipe, seed: Optional[int] = None, dtype: Optional[str] = None,
              out_dtype: Optional[str] = None, shard_size: int = 5 * 10**9, allow_crimes: bool = False,
              recipe_dir: Optional[Path] = None, gradient_span: str = "slice",
              allow_extrapolation: bool = False, strict: bool = False) -> Plan:
    c = recipe.config
    method = get_method(c.merge_method)
    # Parameter names the method does not know (typos like `densty`): warn early, before touching disk.
    for si in (range(len(c.slices)) if c.slices else [None]):
        ParameterResolver(recipe, method, si).warn_unknown()
    if method.base_policy == "required" and not c.base_model and not any(s.base_model for s in c.slices or []):
        raise MergeError(f"{recipe.at('merge_method')}: {method.name} needs a 'base_model:'")
    if c.base_model and method.base_policy == "ignored" and c.models:
        warn(f"{recipe.at('base_model')}: {method.name} does not use a base model; base_model is ignored")

    # Resolve and index every model, in recipe order: the first problem is the one reported.
    models: "OrderedDict[str, ModelIndex]" = OrderedDict()
    found = recipe.found_at()
    for ref, path in recipe.model_refs():
        if ref in models:
            continue
        models[ref] = load_model(ref, recipe.at(*path), recipe_dir, found.get(ref))
    _check_architectures(models, recipe, allow_crimes, layers=not c.slices)

    groups = _groups(recipe, method, models)
    vocabulary = None
    if c.tokenizer_source or c.tokenizer is not None:
        from mergesmith.io.index import model_folder
        from mergesmith.vocab import build_vocabulary

        vocabulary = build_vocabulary(recipe, {r: model_folder(m) for r, m in models.items()},
                                      {r: embedding_rows(m) for r, m in models.items()}, c.base_model)
    if not groups or not any(g.inputs or g.base for g in groups):
        raise MergeError(f"{recipe.at('models')}: no models to merge")
    num_layers = sum(g.length for g in groups)

    if seed is None:
        seed_given = False
        seed = secrets.randbits(31)
    else:
        seed_given = True

    work_dtype = normalize_dtype(dtype or c.dtype)
    final_dtype = normalize_dtype(out_dtype or c.out_dtype) or work_dtype

    notes: List[str] = []
    counts: Counter = Counter()
    tasks: List[TensorTask] = []

    def add(g: Group, out_name: str, k: Optional[int]) -> None:
        """One output tensor of group g: layer k of the slice (None for a non-layer tensor)."""
        def in_name(src) -> str:
            return out_name if k is None else rename_layer(out_name, src[1] + k)
        tref = g.template
        tname = in_name(tref)
        info = models[tref[0]].tensors[tname]
        is_float = info.dtype.is_floating_point
        vocab = vocabulary is not None and is_float and is_embedding(out_name) and len(info.shape) >= 1
        shape = (vocabulary.size, *info.shape[1:]) if vocab else info.shape
        odt = TORCH_DTYPES[final_dtype] if (final_dtype and is_float) else info.dtype
        base = InputRef(g.base[0], in_name(g.base)) if g.base is not None else None
        ins: List[InputRef] = []
        used = []
        for src in g.inputs:
            ref, name = src[0], in_name(src)
            ti = models[ref].tensors.get(name)
            if ti is None and "lm_head" in name and (models[ref].config or {}).get("tie_word_embeddings"):
                tied = next((n for n in models[ref].tensors if "embed_tokens" in n), None)
                if tied is not None:  # a tied model's output embedding is its input embedding
                    name, ti = tied, models[ref].tensors[tied]
                    counts[f"{ref} ties its embeddings: its {tied} stands in for {out_name}"] += 1
            if ti is None:
                if not allow_crimes:
                    raise MergeError(f"model {ref} lacks tensor {name}, which {tref[0]} has (the output takes "
                                     f"{tref[0]}'s tensors); pass --allow-crimes to merge such tensors without it")
                counts[f"{ref} lacks some tensors of {tref[0]}; those merge without it"] += 1
                continue
            take = None
            if vocab and tuple(ti.shape[1:]) != tuple(info.shape[1:]):
                raise MergeError(f"model {ref}: tensor {name} has shape {list(ti.shape)} but {tref[0]}'s is "
                                 f"{list(info.shape)}; only the vocabulary dimension may differ")
            if vocab:
                pass
            elif ti.shape != info.shape:
                same_rank = len(ti.shape) == len(info.shape)
                if same_rank and is_embedding(name) and all(a >= b for a, b in zip(ti.shape, info.shape)):
                    take = info.shape
                    counts[f"{ref}: {name} is {list(ti.shape)}, using its leading {list(info.shape)} block"] += 1
                elif is_embedding(name) or allow_crimes:
                    counts[f"{ref}: {name} is {list(ti.shape)} but {tref[0]}'s is {list(info.shape)}; "
                           "skipped for that tensor"] += 1
                    continue
                else:
                    raise MergeError(f"model {ref}: tensor {name} has shape {list(ti.shape)} but {tref[0]}'s "
                                     f"is {list(info.shape)}; the models are not the same architecture "
                                     "(--allow-crimes skips such tensors)")
            if not ti.dtype.is_floating_point and is_float:
                raise MergeError(f"model {ref}: tensor {name} is {ti.dtype}, not a float")
            ins.append(InputRef(ref, name, take))
            used.append(src)
        copy_from = InputRef(tref[0], tname)
        if not is_float or (not ins and base is None):
            if not is_float:
                counts[f"non-float tensors copied from {tref[0]}"] += 1
            tasks.append(TensorTask(out_name, info.shape, odt, "copy", None, [copy_from]))
            return
        if not ins and not vocab:
            # only the base has it: the base's own value (what every method returns without inputs)
            tasks.append(TensorTask(out_name, info.shape, odt, "copy", None, [base]))
            return
        if k is None:
            t = 0.0
        elif gradient_span == "output":  # over the output's layers (one `models:` slice: the same thing)
            t = (g.out_start + k) / (num_layers - 1) if num_layers > 1 else 1.0
        else:  # mergekit: over the slice's own layers
            t = k / (g.length - 1) if g.length > 1 else 1.0
        refs = [u[0] for u in used]
        shared, per_input = g.resolver.resolve(out_name, t, refs, g.base[0] if g.base else None,
                                               input_names=[r.name for r in ins])
        _check_values(method, g.resolver, out_name, shared, refs, per_input, allow_extrapolation)
        if method.copies(shared, per_input) and not vocab:
            tasks.append(TensorTask(out_name, info.shape, odt, "copy", None, [ins[0]]))
            return
        keys = [stream_key(seed, f"model{u[3]}", out_name) for u in used] if method.randomized else [0] * len(used)
        tasks.append(TensorTask(out_name, shape, odt, "merge", base, ins, shared, per_input, keys, vocab=vocab))

    first, last = groups[0], groups[-1]
    pre = [n for n in models[first.template[0]].tensors if layer_index(n) is None and _natural_key(n)[0] == 0]
    post = [n for n in models[last.template[0]].tensors if layer_index(n) is None and _natural_key(n)[0] != 0]
    for name in sorted(pre, key=_natural_key):
        add(first, name, None)
    layer_sources: List[Tuple[str, int]] = []
    held = {ref: layer_names(idx) for ref, idx in models.items()}
    for g in groups:
        tref = g.template
        for k in range(g.length):
            src_layer = tref[1] + k
            for name in sorted(held[tref[0]].get(src_layer, []), key=_natural_key):
                add(g, rename_layer(name, g.out_start + k), k)
            layer_sources.append((tref[0], src_layer))
    for name in sorted(post, key=_natural_key):
        add(last, name, None)
    seen = Counter(t.name for t in tasks)
    dup = [n for n, k in seen.items() if k > 1]
    if dup:
        raise MergeError(f"{recipe.at()}: the output would hold tensor {dup[0]} twice; check the slices")
    for msg, n in counts.items():
        notes.append(f"{msg} ({n} tensor{'s' if n != 1 else ''})")
    extra = Counter()
    if c.models:
        tref = first.template[0]
        for src in first.inputs:
            missing = [n for n in models[src[0]].tensors if n not in models[tref].tensors]
            if missing:
                extra[src[0]] = len(missing)
        for ref, n in extra.items():
            notes.append(f"{ref} has {n} tensor(s) that {tref} lacks; they are not in the output")
    for n in notes:
        warn(n)
    layout = plan_layout([(t.name, t.out_dtype, t.shape) for t in tasks], shard_size)
    return Plan(recipe=recipe, method=method, models=models, base_model=c.base_model, seed=seed,
                seed_given=seed_given, tasks=tasks, layout=layout, notes=notes, template=first.template[0],
                num_layers=num_layers, layer_sources=layer_sources, sliced=bool(c.slices), vocabulary=vocabulary,
                strict=strict)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"


def describe(plan: Plan) -> str:
    """Human-readable summary: models, methods, parameters per tensor group, bytes, expected peak memory."""
    lines = [f"recipe: {plan.recipe.source}",
             f"method: {plan.method.name} ({plan.method.pretty}, {plan.method.url})",
             f"seed:   {plan.seed}{'' if plan.seed_given else ' (chosen now; pass --seed to fix it)'}"
             if plan.method.randomized else "seed:   not used (the method draws nothing at random)",
             "models:"]
    for ref, idx in plan.models.items():
        role = " (base)" if ref == plan.base_model else ""
        size = sum(t.nbytes for t in idx.tensors.values())
        lines.append(f"  {ref}{role}: {len(idx.tensors)} tensors, {_fmt_bytes(size)} at {idx.path}")
    if plan.sliced:
        lines.append(f"layers: {plan.num_layers} in the output")
        runs: List[List[Any]] = []  # [first out layer, last out layer, model, first source layer]
        for o, (ref, i) in enumerate(plan.layer_sources):
            if runs and runs[-1][2] == ref and runs[-1][3] + (o - runs[-1][0]) == i:
                runs[-1][1] = o
            else:
                runs.append([o, o, ref, i])
        for a, b, ref, i in runs:
            lines.append(f"  {a}-{b} <- {ref} layers {i}-{i + b - a} (template; merged with the slice's sources)"
                         if plan.method.uses_base or plan.method.max_inputs != 1
                         else f"  {a}-{b} <- {ref} layers {i}-{i + b - a}")
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for t in plan.tasks:
        if t.kind == "copy":
            key = f"copy from {t.inputs[0].model}"
        else:
            shared = ", ".join(f"{k}={v}" for k, v in t.shared.items())
            per = "; ".join(f"{r.model.split('/')[-1].split(chr(92))[-1]}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
                for r, p in zip(t.inputs, t.per_input))
            key = f"{plan.method.name}[{shared}] {per}"
        groups.setdefault(key, []).append(t.name)
    lines.append(f"tensors: {len(plan.tasks)} in {len(plan.layout.files)} file(s), out dtype "
                 f"{', '.join(sorted({str(t.out_dtype).replace('torch.', '') for t in plan.tasks}))}")
    for key, names in groups.items():
        shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
        lines.append(f"  {len(names):5d} x {key}")
        lines.append(f"          {shown}")
    lines.append(f"read:   {_fmt_bytes(plan.bytes_read)}")
    lines.append(f"write:  {_fmt_bytes(plan.bytes_written)}")
    lines.append(f"peak memory (expected, tensor work): {_fmt_bytes(plan.peak_bytes_estimate)}")
    for n in plan.notes:
        lines.append(f"note:   {n}")
    return "\n".join(lines)
