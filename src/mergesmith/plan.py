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
from mergesmith.methods import Method, get_method
from mergesmith.methods.rng import stream_key
from mergesmith.params import ParameterResolver, is_embedding, layer_index, layer_t
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
        sorting and masks, and the output; plus 1 bit per element and model of saved masks for two-pass tensors."""
        per = []
        for t in self.tasks:
            n_in = len(t.inputs) + (1 if t.base else 0)
            blocks = row_blocks(self, t)
            elems = max(b - a for a, b in blocks) * (t.numel // max(1, t.shape[0] if t.shape else 1))
            per.append(elems * (4 * (2 * n_in + 6)) + (t.numel * n_in // 8 if len(blocks) > 1 else 0))
        per.sort(reverse=True)
        return sum(per[:2])


# Tensors above this many elements are merged in blocks of rows when the method allows it. A constant: the
# blocking (and so every rounding) depends only on the tensor's shape, never on the machine.
BLOCK_ELEMENTS = 1 << 24


def row_blocks(plan: "Plan", task: TensorTask) -> List[Tuple[int, int]]:
    """[(first_row, end_row)] for a task: one block unless it is large and its method is row-wise."""
    rows = task.shape[0] if task.shape else 1
    if (task.kind != "merge" or len(task.shape) < 2 or task.numel <= BLOCK_ELEMENTS
            or not plan.method.row_wise(task.shared)):
        return [(0, rows)]
    per = max(1, BLOCK_ELEMENTS // (task.numel // rows))
    return [(a, min(rows, a + per)) for a in range(0, rows, per)]


def _natural_key(name: str):
    i = layer_index(name)
    pre = 0 if (i is None and is_embedding(name) and "lm_head" not in name) else (1 if i is not None else 2)
    return (pre, i if i is not None else 0, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def _check_architectures(models: "OrderedDict[str, ModelIndex]", recipe: Recipe, allow_crimes: bool) -> None:
    archs = {}
    for ref, idx in models.items():
        cfg = idx.config or {}
        key = (tuple(cfg.get("architectures") or []), cfg.get("hidden_size"), cfg.get("num_hidden_layers"))
        archs[ref] = key
    distinct = {k for k in archs.values() if k != ((), None, None)}
    if len(distinct) > 1 and not allow_crimes:
        desc = "; ".join(f"{r}: {k[0][0] if k[0] else '?'} hidden {k[1]} layers {k[2]}" for r, k in archs.items())
        raise MergeError(f"{recipe.at()}: the models have different architectures ({desc}); "
                         "pass --allow-crimes to merge them anyway")


def make_plan(recipe: Recipe, seed: Optional[int] = None, dtype: Optional[str] = None,
              out_dtype: Optional[str] = None, shard_size: int = 5 * 10**9, allow_crimes: bool = False,
              recipe_dir: Optional[Path] = None) -> Plan:
    c = recipe.config
    method = get_method(c.merge_method)
    if c.slices:
        raise MergeError(f"{recipe.at('slices')}: 'slices:' parses, but layer slicing is not supported yet; "
                         "use 'models:'")
    # Parameter names the method does not know (typos like `densty`): warn early, before touching disk.
    resolver = ParameterResolver(recipe, method)
    resolver.warn_unknown()

    if method.needs_base and not c.base_model:
        raise MergeError(f"{recipe.at('merge_method')}: {method.name} needs a 'base_model:'")

    # Resolve and index every model, in recipe order: the first problem is the one reported.
    models: "OrderedDict[str, ModelIndex]" = OrderedDict()
    for ref, path in recipe.model_refs():
        local = resolve_model(ref, recipe.at(*path), recipe_dir)
        try:
            models[ref] = index_model(ref, local)
        except MergeError as e:
            raise MergeError(f"{recipe.at(*path)}: {e}") from None
    _check_architectures(models, recipe, allow_crimes)

    base_ref = c.base_model
    listed = [m.model for m in c.models]
    inputs_refs = [m for m in dict.fromkeys(listed) if not (method.needs_base and m == base_ref)]
    if not inputs_refs and not method.needs_base:
        raise MergeError(f"{recipe.at('models')}: no models to merge")
    template_ref = base_ref or listed[0]
    template = models[template_ref]

    num_layers = max((layer_index(n) for n in template.tensors if layer_index(n) is not None), default=-1) + 1
    if template.config and isinstance(template.config.get("num_hidden_layers"), int):
        num_layers = max(num_layers, template.config["num_hidden_layers"])

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
    for name in sorted(template.tensors, key=_natural_key):
        info = template.tensors[name]
        is_float = info.dtype.is_floating_point
        odt = TORCH_DTYPES[final_dtype] if (final_dtype and is_float) else info.dtype
        base = InputRef(base_ref, name) if method.needs_base else None
        ins: List[InputRef] = []
        used: List[str] = []
        for ref in inputs_refs:
            ti = models[ref].tensors.get(name)
            if ti is None:
                counts[f"{ref} lacks some tensors of {template_ref}; those merge without it"] += 1
                continue
            take = None
            if ti.shape != info.shape:
                same_rank = len(ti.shape) == len(info.shape)
                if same_rank and is_embedding(name) and all(a >= b for a, b in zip(ti.shape, info.shape)):
                    take = info.shape
                    counts[f"{ref}: {name} is {list(ti.shape)}, using its leading {list(info.shape)} block"] += 1
                elif is_embedding(name) or allow_crimes:
                    counts[f"{ref}: {name} is {list(ti.shape)} but {template_ref}'s is {list(info.shape)}; "
                           "skipped for that tensor"] += 1
                    continue
                else:
                    raise MergeError(f"model {ref}: tensor {name} has shape {list(ti.shape)} but {template_ref}'s "
                                     f"is {list(info.shape)}; the models are not the same architecture "
                                     "(--allow-crimes skips such tensors)")
            if not ti.dtype.is_floating_point and is_float:
                raise MergeError(f"model {ref}: tensor {name} is {ti.dtype}, not a float")
            ins.append(InputRef(ref, name, take))
            used.append(ref)
        if not is_float or not ins:
            if not is_float:
                counts["non-float tensors copied from " + template_ref] += 1
            tasks.append(TensorTask(name, info.shape, odt, "copy", None, [InputRef(template_ref, name)]))
            continue
        t = layer_t(name, num_layers)
        shared, per_input = resolver.resolve(name, t, used, base_ref)
        for ref, p in zip(used, per_input):
            problem = method.check(shared, p) if method.check else None
            if problem:
                bad, msg = problem
                raise MergeError(f"{resolver.where(ref, bad)}: model {ref}, tensor {name}: {msg}")
        if method.name == "linear" and shared["normalize"] and abs(sum(p["weight"] for p in per_input)) < 1e-12:
            raise MergeError(f"{resolver.where(used[0], 'weight')}: tensor {name}: the weights sum to 0, "
                             "so normalize cannot divide by them; set normalize: false or change the weights")
        keys = [stream_key(seed, f"model{listed.index(ref)}", name) for ref in used] if method.randomized else \
            [0] * len(used)
        tasks.append(TensorTask(name, info.shape, odt, "merge", base, ins, shared, per_input, keys))
    for msg, n in counts.items():
        notes.append(f"{msg} ({n} tensor{'s' if n != 1 else ''})")
    extra = Counter()
    for ref in inputs_refs:
        missing = [n for n in models[ref].tensors if n not in template.tensors]
        if missing:
            extra[ref] = len(missing)
    for ref, n in extra.items():
        notes.append(f"{ref} has {n} tensor(s) that {template_ref} lacks; they are not in the output")
    for n in notes:
        warn(n)
    layout = plan_layout([(t.name, t.out_dtype, t.shape) for t in tasks], shard_size)
    return Plan(recipe=recipe, method=method, models=models, base_model=base_ref, seed=seed, seed_given=seed_given,
                tasks=tasks, layout=layout, notes=notes)


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
             f"seed:   {plan.seed}{'' if plan.seed_given else ' (chosen now; pass --seed to fix it)'}",
             "models:"]
    for ref, idx in plan.models.items():
        role = " (base)" if ref == plan.base_model else ""
        size = sum(t.nbytes for t in idx.tensors.values())
        lines.append(f"  {ref}{role}: {len(idx.tensors)} tensors, {_fmt_bytes(size)} at {idx.path}")
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
