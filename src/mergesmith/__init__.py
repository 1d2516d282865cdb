"""mergesmith: merge language-model weights from mergekit-style YAML recipes."""

__version__ = "0.1.0"

from mergesmith.errors import MergeError  # noqa: E402

__all__ = ["MergeError", "__version__"]
