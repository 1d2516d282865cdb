"""The project's metadata is in pyproject.toml; this adds the one C extension: DARE/DELLA keep masks, loaded with
ctypes (mergesmith/methods/compiled.py). It is optional: without a C compiler the numpy path runs instead."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mergesmith._kernels",
            ["src/mergesmith/_kernels.c"],
            extra_compile_args=["-O3", "-ffp-contract=off"],
            libraries=["m"],
            optional=True,
        )
    ]
)
