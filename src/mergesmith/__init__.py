"""mergesmith: merge language-model weights from mergekit-style YAML recipes.

The Python API (mergesmith.api) loads on first use, so `import mergesmith` stays light:

    import mergesmith

    result = mergesmith.merge("recipe.yml", "out/merged", mergesmith.MergeOptions(seed=1))
"""

from mergesmith.errors import MergeError
from mergesmith.version import __version__

_API = (
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
)

__all__ = ["MergeError", "__version__", *_API]


def __getattr__(name: str):
    """The API's names, imported on first use (PEP 562)."""
    if name in _API:
        from mergesmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'mergesmith' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
