"""The genome: a vector of numbers <-> a merge recipe (mergekit-evolve's layout and recipes).

The vector is a flattened array of shape (layer groups, models, parameter sets, searched parameters), C order:
- layer groups: `layer_granularity` layers each (0: one group for the whole model);
- parameter sets: one per `filters` entry (tensor-name substrings, like `self_attn` or `mlp`) and one for the rest;
- searched parameters: `weight`, then `density` for methods that sparsify (as mergekit-evolve: linear and
  task_arithmetic search weights only; ties, dare_*, della*, breadcrumbs* search weights and densities).

A vector becomes a recipe as mergekit-evolve writes it: `slices:` with one slice per layer group (or, with `smooth`,
`models:` with per-layer gradients), absolute weights unless `allow_negative_weights`, densities folded into [0, 1],
`normalize` as configured (default: on for linear, ties and dare_ties). Such a recipe runs with `mergesmith run`
and mergekit-yaml as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

# mergekit-evolve normalizes these by default; every other method keeps its own default (off)
NORMALIZED_BY_DEFAULT = ("ties", "dare_ties", "linear")
DELLA_MARGIN = 1e-6


def searched_params(method_name: str) -> List[str]:
    """The per-model parameters a genome searches for a method: weight, and density where the method has one;
    empty when the method has no per-model weight (not searchable)."""
    from mergesmith.methods import get_method

    per_model = {p.name for p in get_method(method_name).params if p.scope != "shared"}
    return [p for p in ("weight", "density") if p in per_model] if "weight" in per_model else []


@dataclass(frozen=True)
class Genome:
    """What a vector means. `models` and `base_model` are the references written into recipes (absolute paths for
    local folders); `parameters` are fixed global method parameters (e.g. epsilon, lambda)."""

    models: Sequence[str]
    merge_method: str
    num_layers: int
    base_model: Optional[str] = None
    tokenizer_source: Optional[str] = None
    layer_granularity: int = 0
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    filters: Sequence[str] = ()
    smooth: bool = False
    parameters: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "bfloat16"
    method_shared: Sequence[str] = ()  # the method's global parameter names (normalize/int8_mask only if known)
    epsilon: Optional[float] = None  # della's: densities below 1 stay within [epsilon, 1 - epsilon]

    @property
    def params(self) -> List[str]:
        return searched_params(self.merge_method)

    @property
    def groups(self) -> int:
        return self.num_layers // self.layer_granularity if self.layer_granularity > 0 else 1

    @property
    def shape(self) -> tuple:
        return (self.groups, len(self.models), len(self.filters) + 1, len(self.params))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def initial(self) -> np.ndarray:
        """mergekit-evolve's start: every weight 1/n, every density 1."""
        x = np.zeros(self.shape)
        x[..., 0] = 1.0 / len(self.models)
        x[..., 1:] = 1.0
        return x.reshape(-1)

    def values(self, x: Sequence[float]) -> Dict[str, np.ndarray]:
        """{parameter: array (groups, models, sets)} as the recipe gets them."""
        g = np.asarray(x, dtype=float).reshape(self.shape)
        out = {}
        for i, p in enumerate(self.params):
            v = g[..., i]
            if p == "density":
                v = np.clip(np.abs(v), 0.0, 1.0)
                if self.epsilon is not None and self.epsilon < 0.5:
                    # della keeps each element with probability density +- epsilon, which must stay in (0, 1)
                    lo, hi = self.epsilon + DELLA_MARGIN, 1 - self.epsilon - DELLA_MARGIN
                    v = np.where(v >= 1.0, 1.0, np.clip(v, lo, hi))
            elif not self.allow_negative_weights:
                v = np.abs(v)
            out[p] = v
        return out

    def _param(self, values: Dict[str, np.ndarray], at) -> Dict[str, Any]:
        """One model's parameters at index `at` (group or slice(None) for gradients): a value, or one
        {filter, value} per parameter set when there are filters."""
        out: Dict[str, Any] = {}
        for p, v in values.items():
            sets = [_plain(v[at + (s,)]) for s in range(len(self.filters) + 1)]
            out[p] = (
                [{"filter": f, "value": val} for f, val in zip(list(self.filters) + [None], sets)]
                if self.filters
                else sets[0]
            )
        return out

    def recipe(self, x: Sequence[float]) -> Dict[str, Any]:
        """The recipe (a dict in mergekit's schema) of vector x."""
        values = self.values(x)
        body: Dict[str, Any] = {"merge_method": self.merge_method}
        if self.smooth:
            body["models"] = self._smooth_models(values)
        else:
            body["slices"] = self._slices(values)
        params = dict(self.parameters)
        normalize = self.normalize if self.normalize is not None else self.merge_method in NORMALIZED_BY_DEFAULT
        if "normalize" in self.method_shared:
            params.setdefault("normalize", normalize)
        if "int8_mask" in self.method_shared:
            params.setdefault("int8_mask", True)
        if params:
            body["parameters"] = params
        body["dtype"] = self.dtype
        if self.base_model:
            body["base_model"] = self.base_model
        if self.tokenizer_source:
            body["tokenizer_source"] = self.tokenizer_source
        return body

    def _slices(self, values: Dict[str, np.ndarray]) -> List[Dict[str, Any]]:
        step = self.layer_granularity if self.layer_granularity > 0 else self.num_layers
        slices = []
        for gi in range(self.groups):
            span = [gi * step, (gi + 1) * step]
            sources = [
                {"model": m, "layer_range": list(span), "parameters": self._param(values, (gi, mi))}
                for mi, m in enumerate(self.models)
            ]
            if self.base_model and self.base_model not in self.models:
                sources.append({"model": self.base_model, "layer_range": list(span)})
            slices.append({"sources": sources})
        return slices

    def _smooth_models(self, values: Dict[str, np.ndarray]) -> List[Dict[str, Any]]:
        """Per-layer-group values as gradients over the whole model (interpolated between groups)."""
        models = []
        for mi, m in enumerate(self.models):
            params = self._param({p: np.moveaxis(v, 0, -1) for p, v in values.items()}, (mi,))
            models.append({"model": m, "layer_range": [0, self.num_layers], "parameters": params})
        if self.base_model and self.base_model not in self.models:
            models.append({"model": self.base_model})
        return models


def _plain(v: Any) -> Any:
    """A float, or a list of floats for a gradient (a one-group gradient is a plain value, as mergekit writes)."""
    a = np.asarray(v, dtype=float)
    if a.ndim == 0:
        return float(a)
    return float(a[0]) if a.size == 1 else [float(e) for e in a]
