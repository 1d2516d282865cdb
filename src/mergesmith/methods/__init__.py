"""Merge methods: each module of this package registers its methods with `registry.merge_method` (one decorated
kernel per method; see registry.py), and installed packages add theirs through the `mergesmith.methods` entry
points. Importing the package imports every module in it, then the plugins.

Parameters are scoped as in mergekit: shared ones (normalize, lambda, ...) are read from the global and slice
`parameters:` only; per-model ones (weight, density, epsilon, gamma) per model, the model's own `parameters:`
first, and for methods that take a base not for the base model.
"""

from __future__ import annotations

import importlib
import pkgutil

from mergesmith.methods.registry import (
    METHODS,
    REQUIRED,
    Method,
    Param,
    PerModel,
    Problem,
    Range,
    Round,
    Streaming,
    TwoPass,
    check_params,
    get_method,
    load_plugins,
    merge_method,
    row_block_methods,
)

__all__ = [
    "METHODS",
    "REQUIRED",
    "Method",
    "Param",
    "PerModel",
    "Problem",
    "Range",
    "Round",
    "Streaming",
    "TwoPass",
    "check_params",
    "get_method",
    "merge_method",
    "row_block_methods",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
load_plugins()
