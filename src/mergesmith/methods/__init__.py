"""Merge methods: a registry of names, parameter specs and pure kernels.

Parameters are scoped as in mergekit: `shared` ones (normalize, lambda, ...) are read from the global and slice
`parameters:` only; `input` ones (weight, density, epsilon, gamma) are read per model, the model's own
`parameters:` first. `non_base` input parameters are not resolved for the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mergesmith.methods.arcee_fusion import arcee_fusion
from mergesmith.methods.linear import linear
from mergesmith.methods.model_stock import model_stock
from mergesmith.methods.nearswap import nearswap
from mergesmith.methods.sce import sce
from mergesmith.methods.spherical import karcher, multislerp, nuslerp, slerp
from mergesmith.methods.task_arithmetic import generalized_task_arithmetic, magnitude_cuts, task_vector_l1_sums

REQUIRED = object()
# No weight, scale or lambda is meant beyond this: 1e300 only overflows the merge into Inf.
ABSURD = 1e6


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # bool, int, float or str
    scope: str  # "shared", "input" or "non_base"
    default: Any = REQUIRED
    choices: Tuple[str, ...] = ()
    doc: str = ""
    # numbers: always within [lo, hi]; within `usual` too unless --allow-extrapolation (mergekit extrapolates there)
    lo: float = -ABSURD
    hi: float = ABSURD
    usual: Optional[Tuple[float, float]] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def out_of_range(self, v: Any, allow_extrapolation: bool) -> Optional[str]:
        """Why the resolved value v is refused, or None."""
        if self.kind not in (int, float) or not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        if not self.lo <= v <= self.hi:
            return f"{self.name} {v:g} must lie in [{self.lo:g}, {self.hi:g}]"
        if self.usual and not allow_extrapolation and not self.usual[0] <= v <= self.usual[1]:
            lo, hi = self.usual
            return (f"{self.name} {v:g} lies outside [{lo:g}, {hi:g}], so the merge would extrapolate; "
                    "pass --allow-extrapolation if that is meant")
        return None


@dataclass(frozen=True)
class Method:
    name: str
    pretty: str
    url: str
    description: str
    params: Tuple[Param, ...]
    needs_base: bool
    randomized: bool
    merge: Callable[..., torch.Tensor] = field(repr=False)
    # "required": the base is its own argument; "optional": used as the base when the recipe names one;
    # "input": the base model is one more input (karcher); "ignored": base_model plays no part (linear)
    base_policy: str = ""
    # how many inputs besides the base (all inputs for "input"/"ignored" policies) the method takes
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    # can a block of rows be merged on its own? (given the shared parameters)
    row_wise: Callable[[Dict[str, Any]], bool] = field(default=lambda shared: False, repr=False)
    # whole-tensor statistics a row block needs: (base, inputs, shared, per_input, keys, row_offset) ->
    # ({"l1": per-model (sum |delta|, sum |kept|)}, per-model masks of this block to reuse) or None
    block_stats: Optional[Callable[..., Any]] = field(default=None, repr=False)
    # whole-tensor statistics gathered model by model before a row-block merge (TIES trims):
    # (load(a, b, i) -> (base rows, input i rows), blocks, n, shared, per_input) -> stats, or None
    tensor_stats: Optional[Callable[..., Any]] = field(default=None, repr=False)
    # extra range checks: (shared, per_input) -> (offending parameter, message) or None
    check: Optional[Callable[[Dict[str, Any], Dict[str, Any]], Optional[Tuple[str, str]]]] = field(
        default=None, repr=False)

    def __post_init__(self):
        if not self.base_policy:
            object.__setattr__(self, "base_policy", "required" if self.needs_base else "ignored")

    @property
    def uses_base(self) -> bool:
        """The base model, when the recipe names one, is passed as the kernel's `base` argument."""
        return self.base_policy in ("required", "optional")

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)

    @property
    def shared_params(self) -> List[Param]:
        return [p for p in self.params if p.scope == "shared"]

    @property
    def input_params(self) -> List[Param]:
        return [p for p in self.params if p.scope != "shared"]


METHODS: Dict[str, Method] = {}


def register(m: Method) -> Method:
    METHODS[m.name] = m
    return m


# ---------------------------------------------------------------------------------------------------------------
# linear

def _linear_merge(base: Optional[torch.Tensor], inputs: Sequence[torch.Tensor], shared: Dict[str, Any],
                  per_input: Sequence[Dict[str, Any]], keys: Sequence[int], row_offset: int = 0,
                  stats: Any = None) -> torch.Tensor:
    return linear(inputs, [p["weight"] for p in per_input], normalize=shared["normalize"])


register(Method(
    name="linear", pretty="Linear", url="https://arxiv.org/abs/2203.05482",
    description="Weighted average of the models (model soups).",
    params=(
        Param("weight", float, "input", doc="this model's weight"),
        Param("normalize", bool, "shared", True, doc="divide by the sum of weights"),
    ),
    needs_base=False, randomized=False, merge=_linear_merge, row_wise=lambda shared: True,
))

# ---------------------------------------------------------------------------------------------------------------
# the task-arithmetic family


def _gta(sparsification: Optional[str], consensus: Optional[str]):
    def merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
        return generalized_task_arithmetic(
            base, inputs,
            weights=[p["weight"] for p in per_input],
            densities=[p["density"] for p in per_input],
            keys=keys, sparsification=sparsification, consensus=consensus,
            normalize=shared["normalize"], rescale=shared["rescale"], lambda_=shared["lambda"],
            epsilons=[p.get("epsilon", 0.15) for p in per_input],
            gammas=[p.get("gamma", 0.01) for p in per_input],
            rescale_mode=shared.get("rescale_mode", "l1"), rank_scope=shared.get("rank_scope", "row"),
            row_offset=row_offset, l1=stats.get("l1") if stats else None,
            masks=stats.get("masks") if stats else None, cuts=stats.get("cuts") if stats else None,
            offsets=stats.get("offsets") if stats else None,
        )
    return merge


def _gta_row_wise(sparsification: Optional[str]):
    def row_wise(shared):
        if sparsification is None or sparsification == "random":
            return True
        if sparsification == "della_magprune":
            return shared.get("rank_scope", "row") == "row"
        # magnitude trims are over the whole tensor: blocks get its cut from `tensor_stats` (no L1 rescale there)
        return not shared["rescale"]
    return row_wise


def _gta_stats(sparsification: Optional[str]):
    """Whole-tensor L1 sums are needed when a random sparsifier rescales by L1 norm."""
    if sparsification not in ("random", "della_magprune"):
        return None

    def stats(base, inputs, shared, per_input, keys, row_offset=0):
        if not shared["rescale"] or shared.get("rescale_mode", "l1") != "l1":
            return None
        return task_vector_l1_sums(base, inputs, [p["density"] for p in per_input], keys, sparsification,
                                   [p.get("epsilon", 0.15) for p in per_input], shared.get("rank_scope", "row"),
                                   row_offset)
    return stats


def _gta_tensor_stats(sparsification: Optional[str]):
    if sparsification not in ("magnitude", "magnitude_outliers"):
        return None

    def stats(load, blocks, n, shared, per_input):
        return magnitude_cuts(load, blocks, n, sparsification, [p["density"] for p in per_input],
                              [p.get("gamma", 0.01) for p in per_input])
    return stats


def _check_della(shared: Dict[str, Any], per_input: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    d, e = per_input["density"], per_input["epsilon"]
    if d < 1 and d > 0 and (d - e <= 0 or d + e >= 1):
        return "density", (f"density {d:g} with epsilon {e:g} gives keep probabilities from {d - e:g} to "
                           f"{d + e:g}; density - epsilon and density + epsilon must both lie in (0, 1)")
    return None


def _register_gta(name, pretty, url, description, sparsification, consensus, normalize, rescale):
    params = [
        Param("weight", float, "non_base", doc="this model's weight"),
        Param("density", float, "non_base", 1.0, doc="fraction of the delta to keep", lo=0, hi=1),
        Param("int8_mask", bool, "shared", False, doc="accepted for compatibility (masks are booleans here)"),
        Param("normalize", bool, "shared", normalize, doc="divide by the sum of contributing weights"),
        Param("rescale", bool, "shared", rescale, doc="rescale kept deltas after sparsification"),
        Param("lambda", float, "shared", 1.0, doc="scale of the merged delta"),
    ]
    if sparsification == "magnitude_outliers":
        params.append(Param("gamma", float, "non_base", 0.01, doc="fraction of largest-magnitude outliers to drop",
                            lo=0, hi=1))
    if sparsification == "della_magprune":
        params.append(Param("epsilon", float, "non_base", 0.15,
                            doc="half-width of the keep-probability range around density", lo=0, hi=1))
        params.append(Param("rank_scope", str, "shared", "row", ("row", "tensor"),
                            doc="rank magnitudes per row (mergekit) or over the whole tensor (paper)"))
    if sparsification in ("della_magprune", "random"):
        params.append(Param("rescale_mode", str, "shared", "l1", ("l1", "inverse_prob"),
                            doc="l1: match the delta's L1 norm (mergekit); inverse_prob: divide by keep probability"))

    register(Method(
        name=name, pretty=pretty, url=url, description=description, params=tuple(params), needs_base=True,
        randomized=sparsification in ("random", "della_magprune"), merge=_gta(sparsification, consensus),
        check=_check_della if sparsification == "della_magprune" else None, row_wise=_gta_row_wise(sparsification),
        block_stats=_gta_stats(sparsification),
        tensor_stats=_gta_tensor_stats(sparsification),
    ))


_register_gta("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
              "base + lambda * sum of weighted task vectors.", None, None, False, False)
_register_gta("ties", "TIES", "https://arxiv.org/abs/2306.01708",
              "Trim task vectors by magnitude, elect signs, merge the agreeing parts.", "magnitude", "sum", True, False)
_register_gta("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099",
              "Random drop-and-rescale of task vectors, then TIES sign consensus.", "random", "sum", False, True)
_register_gta("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099",
              "Random drop-and-rescale of task vectors, then a weighted sum.", "random", None, False, True)
_register_gta("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
              "Drop the largest outliers and the smallest deltas, then a weighted sum.",
              "magnitude_outliers", None, False, False)
_register_gta("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
              "Breadcrumbs sparsification with TIES sign consensus.", "magnitude_outliers", "sum", False, False)
_register_gta("della", "DELLA", "https://arxiv.org/abs/2406.11617",
              "Magnitude-ranked random pruning (MagPrune), rescale, TIES sign consensus.",
              "della_magprune", "sum", True, True)
_register_gta("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617",
              "Magnitude-ranked random pruning (MagPrune), rescale, weighted sum.", "della_magprune", None, False, True)


# ---------------------------------------------------------------------------------------------------------------
# spherical interpolation and friends

def _slerp_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    return slerp(shared["t"], base, inputs[0])


def _nuslerp_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    w0, w1 = per_input[0]["weight"], per_input[1]["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise, flatten = shared["nuslerp_row_wise"], shared["nuslerp_flatten"]
    if base is None:
        return nuslerp(t, inputs[0], inputs[1], row_wise=row_wise, flatten=flatten)
    b = base.float()
    return b + nuslerp(t, inputs[0].float() - b, inputs[1].float() - b, row_wise=row_wise, flatten=flatten)


def _multislerp_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    return multislerp(inputs, [p["weight"] for p in per_input], base=base,
                      normalize_weights=shared["normalize_weights"], eps=shared["eps"])


def _karcher_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    return karcher(inputs, None, max_iter=shared["max_iter"], tol=shared["tol"])


register(Method(
    name="slerp", pretty="SLERP", url="https://en.wikipedia.org/wiki/Slerp",
    description="Spherical interpolation between the base and one other model by t.",
    params=(Param("t", float, "shared", doc="position from the base (0) to the other model (1)", usual=(0, 1)),),
    needs_base=True, randomized=False, merge=_slerp_merge, min_inputs=1, max_inputs=1,
))
register(Method(
    name="nuslerp", pretty="NuSLERP", url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    description="Slerp of two models (or of their task vectors when a base is given) by relative weight.",
    params=(
        Param("weight", float, "non_base", doc="this model's relative weight (t = w2 / (w1 + w2))",
              usual=(0, ABSURD)),
        Param("nuslerp_flatten", bool, "shared", True, doc="slerp whole tensors (false: row vectors)"),
        Param("nuslerp_row_wise", bool, "shared", False, doc="when not flattened, slerp columns instead of rows"),
    ),
    needs_base=False, base_policy="optional", randomized=False, merge=_nuslerp_merge, min_inputs=2, max_inputs=2,
))
register(Method(
    name="multislerp", pretty="Multi-SLERP", url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    description="Barycentric interpolation of any number of models on the hypersphere (optionally around a base).",
    params=(
        Param("weight", float, "non_base", doc="this model's weight", usual=(0, ABSURD)),
        Param("normalize_weights", bool, "shared", True, doc="divide the weights by their sum"),
        Param("eps", float, "shared", 1e-8, doc="numerical floor for norms", lo=0, hi=1e-2),
    ),
    needs_base=False, base_policy="optional", randomized=False, merge=_multislerp_merge, min_inputs=1,
))
register(Method(
    name="karcher", pretty="Karcher Mean", url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    description="Riemannian (Karcher) mean of the models' directions, scaled by their mean norm.",
    params=(
        Param("max_iter", int, "shared", 10, doc="most fixed-point iterations", lo=1, hi=1000),
        Param("tol", float, "shared", 1e-5, doc="stop when the tangent norm is below this", lo=0, hi=1),
    ),
    needs_base=False, base_policy="input", randomized=False, merge=_karcher_merge, min_inputs=1,
))


def _model_stock_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    return model_stock(base, inputs, filter_wise=shared["filter_wise"])


register(Method(
    name="model_stock", pretty="Model Stock", url="https://arxiv.org/abs/2403.19522",
    description="Interpolate from the base toward the fine-tunes' average by the angle between their deltas.",
    params=(Param("filter_wise", bool, "shared", False, doc="one ratio per row instead of per tensor"),),
    needs_base=True, randomized=False, merge=_model_stock_merge, min_inputs=2,
))


def _sce_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    return sce(base, inputs, select_topk=shared["select_topk"])


register(Method(
    name="sce", pretty="SCE", url="https://arxiv.org/abs/2408.07990",
    description="Select high-variance elements, weight task vectors by energy, erase sign conflicts.",
    params=(
        Param("select_topk", float, "shared", 1.0, doc="fraction of elements kept by variance across models",
              lo=0, hi=1),
        Param("int8_mask", bool, "shared", False, doc="accepted for compatibility (masks are booleans here)"),
    ),
    needs_base=True, randomized=False, merge=_sce_merge, min_inputs=1,
))


def _nearswap_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    return nearswap(base, inputs[0], shared["t"])


register(Method(
    name="nearswap", pretty="NearSwap", url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    description="Take the other model's value where it lies within t of the base's, move by t elsewhere.",
    params=(Param("t", float, "shared", doc="similarity threshold", lo=0),),
    needs_base=True, randomized=False, merge=_nearswap_merge, row_wise=lambda shared: True,
    min_inputs=1, max_inputs=1,
))


def _fusion_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    return arcee_fusion(base, inputs[0])


register(Method(
    name="arcee_fusion", pretty="Arcee Fusion", url="https://arcee.ai",
    description="Keep the base except where the other model's change is important (|delta| x KL above a "
                "quartile threshold).",
    params=(), needs_base=True, randomized=False, merge=_fusion_merge, min_inputs=1, max_inputs=1,
))


def _passthrough_merge(base, inputs, shared, per_input, keys, row_offset=0, stats=None):
    scale = per_input[0].get("scale")
    x = inputs[0].float()
    return x.clone() if scale is None else x * scale


register(Method(
    name="passthrough", pretty="Passthrough", url="https://github.com/arcee-ai/mergekit",
    description="Copy one model's tensors unchanged (optionally scaled): layer stacking with slices.",
    params=(Param("scale", float, "input", None, doc="multiply the tensor by this (default: copy it)"),),
    needs_base=False, randomized=False, merge=_passthrough_merge, row_wise=lambda shared: True,
    min_inputs=1, max_inputs=1,
))


def get_method(name: str) -> Method:
    from mergesmith.errors import MergeError, did_you_mean

    if name not in METHODS:
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise MergeError(f"unknown merge_method {shown}{did_you_mean(name, METHODS)}; "
                         f"known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
