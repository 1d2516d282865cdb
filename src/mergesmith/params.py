"""Resolving a recipe's parameter values for one tensor, as mergekit does.

A value is a scalar, a gradient (a list interpolated over the layer position t in [0, 1]), or a list of
`{filter, value}` conditions (the first whose filter is a substring of the tensor name, or `*`, or absent, wins;
no match falls through to the next source). Sources, highest precedence first: the model's own `parameters:`,
the slice's, the recipe's global `parameters:`. Shared parameters (normalize, lambda, ...) never read a model's own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mergesmith.errors import MergeError, did_you_mean, warn
from mergesmith.methods import Method, Param
from mergesmith.methods.registry import ABSURD
from mergesmith.recipe import ConditionalParameter, Recipe, short

MAX_LIST = 1024  # values in a gradient, or conditions in a list: mergekit recipes use a handful

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers|encoder_layers)\.(\d+)(?:\.|$)")
_EMBED_RE = re.compile(r"(embed_tokens|embed_in|embed_out|wte|word_embeddings|lm_head|tok_embeddings|output\.weight$)")


def layer_index(name: str) -> Optional[int]:
    """The layer number in a tensor name (`model.layers.12.mlp...` -> 12), or None for non-layer tensors."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
    """Token-embedding-like tensors (vocabulary on dim 0): embed_tokens, lm_head, wte, ..."""
    return bool(_EMBED_RE.search(name))


def layer_t(name: str, num_layers: int) -> float:
    """mergekit's gradient position: layer i of L -> i/(L-1) (1 when L == 1); non-layer tensors -> 0."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


class _Invalid(Exception):
    pass


def _validate(p: Param, value: Any) -> Any:
    if p.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise _Invalid(f"'{p.name}' must be true or false, got {short(value)}")
    if p.kind is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise _Invalid(f"'{p.name}' must be a whole number, got {short(value)}")
        return int(value)
    if p.kind is float:
        if isinstance(value, bool):
            raise _Invalid(f"'{p.name}' must be a number, got {short(value)}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise _Invalid(f"'{p.name}' must be a number, got {short(value)}") from None
        except OverflowError:  # an integer beyond any float
            raise _Invalid(f"'{p.name}' must be a number of at most {ABSURD.high:g}, got {short(value)}") from None
        if not math.isfinite(v):
            raise _Invalid(f"'{p.name}' must be finite, got {short(value)}")
        return v
    if p.kind is str:
        v = str(value)
        if p.choices and v not in p.choices:
            raise _Invalid(
                f"'{p.name}' must be one of {', '.join(p.choices)}, got {short(value)}{did_you_mean(v, p.choices)}"
            )
        return v
    return value


def evaluate_setting(tensor_name: str, setting: Any, t: float, p: Param) -> Any:
    """One source's value for `tensor_name` at layer position t, or None when its conditions do not match."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validate(p, setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if len(setting) > MAX_LIST:  # each tensor walks the list: keep that bounded
            raise _Invalid(f"'{p.name}' lists {len(setting)} values or conditions; at most {MAX_LIST}")
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [_validate(p, e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return _validate(p, (1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if not isinstance(cond, ConditionalParameter):
                raise _Invalid(f"'{p.name}': a list mixes plain values and filter conditions")
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, p)
        return None
    raise _Invalid(f"'{p.name}' has an unexpected value {short(setting)}")


@dataclass(frozen=True)
class Source:
    """One `parameters:` mapping of the recipe and where it is."""

    values: Dict[str, Any]
    path: Tuple[Any, ...]


class ParameterResolver:
    """Resolves a method's parameters for each tensor of one output slice."""

    def __init__(self, recipe: Recipe, method: Method, slice_index: Optional[int] = None, module: Optional[str] = None):
        """For output slice `slice_index` (None: the `models:` list) of the recipe, or of its `modules:` entry
        `module`, whose `parameters:` rank between the slice's and the recipe's (mergekit's order)."""
        self.recipe, self.method = recipe, method
        c = recipe.config
        self.global_src = Source(c.parameters or {}, ("parameters",))
        at: Tuple[Any, ...] = () if module is None else ("modules", module)
        spec = c if module is None else c.modules[module]
        self.module_src = None if module is None else Source(spec.parameters or {}, at + ("parameters",))
        self.slice_src: Optional[Source] = None
        self.model_src: Dict[str, Source] = {}
        if slice_index is None:
            for i, m in enumerate(spec.models or []):
                if m.parameters is not None and m.model not in self.model_src:
                    self.model_src[m.model] = Source(m.parameters, at + ("models", i, "parameters"))
        else:
            s = spec.slices[slice_index]
            self.slice_src = Source(s.parameters or {}, at + ("slices", slice_index, "parameters"))
            for j, src in enumerate(s.sources):
                if src.parameters is not None and src.model not in self.model_src:
                    self.model_src[src.model] = Source(
                        src.parameters, at + ("slices", slice_index, "sources", j, "parameters")
                    )

    def _chain(self, model: Optional[str] = None) -> List[Source]:
        """The parameter sources for a model (None: shared parameters), highest precedence first."""
        own = self.model_src.get(model) if model is not None else None
        return [s for s in (own, self.slice_src, self.module_src, self.global_src) if s is not None]

    def warn_unknown(self) -> None:
        """Warn once about parameter names the method does not use (mergekit ignores them silently)."""
        names = [p.name for p in self.method.params]
        for src in [self.global_src, self.module_src, self.slice_src, *self.model_src.values()]:
            if src is None:
                continue
            for k in src.values:
                if self.method.param(k) is None:
                    warn(
                        f"{self.recipe.at(*src.path, k)}: parameter {short(k)} is not used by {self.method.name}"
                        f"{did_you_mean(k, names)}; ignored"
                    )

    def _resolve(self, p: Param, sources: Sequence[Source], tensor_name: str, t: float, who: str) -> Any:
        for src in sources:
            if p.name in src.values:
                try:
                    v = evaluate_setting(tensor_name, src.values[p.name], t, p)
                except _Invalid as e:
                    raise MergeError(f"{self.recipe.at(*src.path, p.name)}: {e}") from None
                if v is not None:
                    return v
        if p.required:
            raise MergeError(
                f"{self.recipe.at(*(sources[0].path if sources else ()))}: missing required parameter "
                f"'{p.name}' for {who} (tensor {tensor_name}); add '{p.name}:' under its parameters"
            )
        return p.default

    def resolve(
        self,
        tensor_name: str,
        t: float,
        models: Sequence[str],
        base_model: Optional[str],
        input_names: Optional[Sequence[str]] = None,
    ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """Shared values for output tensor `tensor_name`; per-model values with filters matched against each
        model's own tensor name (`input_names`, which differ from the output's in sliced merges), as mergekit."""
        input_names = input_names or [tensor_name] * len(models)
        shared = {
            p.name: self._resolve(p, self._chain(), tensor_name, t, "the merge") for p in self.method.shared_params
        }
        per_input = []
        for m, in_name in zip(models, input_names):
            sources = self._chain(m)
            vals = {}
            for p in self.method.input_params:
                if p.scope == "non_base" and m == base_model:
                    continue
                vals[p.name] = self._resolve(p, sources, in_name, t, f"model {m}")
            per_input.append(vals)
        return shared, per_input

    def where(self, model: Optional[str], name: str) -> str:
        """Recipe location of the setting that gives `name` for `model` (for range errors)."""
        for src in self._chain(model or None):
            if name in src.values:
                return self.recipe.at(*src.path, name)
        return self.recipe.at()
