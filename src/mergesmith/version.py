"""mergesmith's version, in a module of its own: every module can name it without importing the package's
`__init__` (whose lazy API imports would otherwise close an import cycle)."""

__version__ = "0.1.0"
