"""The merge-method registry: properties every registered method must have, the decorator's reading of a kernel's
signature, range checks, and methods from installed plugins (entry points)."""

import importlib.metadata
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import through_executor
from mergesmith.demo import tiny_dir
from mergesmith.errors import MergeError
from mergesmith.methods import METHODS, PerModel, Range, Streaming, check_params, registry, row_block_methods
from mergesmith.methods.registry import make_method
from mergesmith.methods.rng import stream_key
from mergesmith.plan import make_plan
from mergesmith.recipe import parse_recipe

FIXTURE = Path(__file__).parent / "plugin_fixture"
ALL = sorted(METHODS)


def sample(m, n, seed=0):
    """Shared and per-input values for method m and n inputs: defaults, mid-range values for bounded per-model
    parameters (density, gamma) so that they bite, and plain numbers for required ones."""
    g = np.random.default_rng(seed)
    shared = {p.name: (0.4 if p.kind is float else 1) if p.required else p.default for p in m.shared_params}
    per = []
    for _ in range(n):
        d = {}
        for p in m.input_params:
            if p.range is not None and p.range.low is not None and p.range.high is not None:
                d[p.name] = float(p.range.low + (p.range.high - p.range.low) * g.uniform(0.35, 0.65))
            else:
                d[p.name] = float(g.uniform(0.2, 1.0)) if p.required else p.default
        per.append(d)
    return shared, per


def n_inputs(m):
    return m.min_inputs if m.max_inputs == m.min_inputs else max(m.min_inputs, 2)


def variants(m):
    """Every combination of the method's bool and choice parameters (the ones streaming may depend on)."""
    flags = [p for p in m.shared_params if p.kind is bool or p.choices]
    for values in itertools.product(*[(False, True) if p.kind is bool else p.choices for p in flags]):
        yield dict(zip((p.name for p in flags), values))


def run(m, base, xs, shared, per, keys, block_elements, monkeypatch):
    """One tensor through the executor, in row blocks of about `block_elements`: (output, row blocks)."""
    out, blocks, _ = through_executor(m, base, xs, block_elements, monkeypatch, shared, per, keys)
    return out, blocks


# ---------------------------------------------------------------------------------------------------------------
# every registered method


@pytest.mark.parametrize("name", ALL)
def test_every_method_is_described_typed_and_documented(name):
    m = METHODS[name]
    assert m.name == name and m.pretty and m.url.startswith("https://")
    assert m.description and m.description == m.description.strip() and m.kernel.__doc__
    assert m.base_policy in ("required", "optional", "input", "ignored")
    assert m.min_inputs >= 1 and (m.max_inputs is None or m.max_inputs >= m.min_inputs)
    assert len({p.name for p in m.params}) == len(m.params)
    for p in m.params:
        assert p.kind in (bool, int, float, str) and len(p.doc) > 5, p
        assert p.scope in ("shared", "input", "non_base")
        assert not p.choices or (p.kind is str and (p.required or p.default in p.choices))
        if not p.required and p.default is not None:
            assert isinstance(p.default, p.kind) or (p.kind is float and type(p.default) is int), p
        if p.range is not None and not p.required:
            assert p.range.problem(p.name, p.default) is None, p  # defaults lie within their ranges
        # per-model parameters are not read for a base passed as `base`
        assert p.scope != "non_base" or m.uses_base


# Karcher iterates in float32 on a whole tensor and on float64 coefficients in blocks (tests/test_streaming_stock.py
# checks the blocked result against a float64 reference): the two agree to float32 rounding, not bit for bit.
FLOAT64_WHEN_BLOCKED = {"karcher"}


@pytest.mark.parametrize("name", ALL)
def test_row_block_methods_give_the_whole_tensors_bytes(name, monkeypatch):
    """For every combination of its switches under which a method takes row blocks (two-pass ones included), a
    tensor merged in blocks equals the tensor merged whole, byte for byte (Karcher: to float32 rounding)."""
    m = METHODS[name]
    g = torch.Generator().manual_seed(len(name))
    n = n_inputs(m)
    keys = [stream_key(7, f"model{i}", "t") for i in range(n)]
    shared0, per = sample(m, n)
    blocked = 0
    for few_values in (False, True):  # few distinct values: magnitude ties across blocks

        def draw(scale):
            if few_values:
                return torch.randint(-4, 5, (37, 23), generator=g).float() * scale
            return torch.randn(37, 23, generator=g) * scale

        base = draw(0.25) if m.uses_base else None
        xs = [(base if base is not None else 0) + draw(0.125) for _ in range(n)]
        for flags in variants(m):
            shared = {**shared0, **flags}
            if check_params(m, shared, per) is not None or not m.in_row_blocks(shared):
                continue
            whole, one = run(m, base, xs, shared, per, keys, 1 << 22, monkeypatch)
            parts, blocks = run(m, base, xs, shared, per, keys, 100, monkeypatch)
            assert len(one) == 1 and len(blocks) == 10
            if name in FLOAT64_WHEN_BLOCKED:
                assert torch.allclose(whole, parts, rtol=1e-6, atol=1e-6), (name, flags, few_values)
            else:
                assert torch.equal(whole, parts), (name, flags, few_values)
            blocked += 1
    assert blocked > 0 or name not in row_block_methods()


def test_row_block_methods_are_derived_from_the_declared_streaming():
    assert set(row_block_methods()) == {
        "linear",
        "task_arithmetic",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "nearswap",
        "passthrough",
        "ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "ram",
        "ramplus_tl",
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "model_stock",
        "sce",
        "arcee_fusion",
    }
    for name in ALL:
        m = METHODS[name]
        assert (name in row_block_methods()) == (m.streaming_for(m.defaults()) is not Streaming.WHOLE)


@pytest.mark.parametrize("name", [n for n in ALL if METHODS[n].randomized])
def test_randomized_methods_follow_their_keys(name):
    m = METHODS[name]
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 16, generator=g)
    xs = [base + torch.randn(16, 16, generator=g) for _ in range(2)]
    shared, per = sample(m, 2)
    k1 = [stream_key(1, f"model{i}", "t") for i in range(2)]
    k2 = [stream_key(2, f"model{i}", "t") for i in range(2)]
    a = m.merge(base, xs, shared, per, k1)
    assert torch.equal(a, m.merge(base, xs, shared, per, k1))
    assert not torch.equal(a, m.merge(base, xs, shared, per, k2))


@pytest.mark.parametrize("name", [n for n in ALL if not METHODS[n].randomized])
def test_methods_that_draw_nothing_ignore_keys(name):
    m = METHODS[name]
    g = torch.Generator().manual_seed(4)
    n = n_inputs(m)
    base = torch.randn(8, 8, generator=g)
    xs = [base + torch.randn(8, 8, generator=g) for _ in range(n)]
    shared, per = sample(m, n)
    b = base if m.uses_base else None
    assert torch.equal(m.merge(b, xs, shared, per, [1] * n), m.merge(b, xs, shared, per, [2] * n))


def recipe_for(m, n, tmp_path):
    """A recipe merging n of the bundled tiny experts with method m (with the base when m takes one)."""
    experts = ["addition", "reverse", "sort", "addition"][:n]
    shared, per = sample(m, max(n, 1))
    lines = [f"merge_method: {m.name}", "models:"]
    for e, values in zip(experts, per):
        given = {k: v for k, v in values.items() if m.param(k).required}
        lines += [f"  - model: {tiny_dir() / e}"] + (
            ["    parameters:"] + [f"      {k}: {v}" for k, v in given.items()] if given else []
        )
    if m.uses_base:
        lines.append(f"base_model: {tiny_dir() / 'base'}")
    required = {p.name: shared[p.name] for p in m.shared_params if p.required}
    lines += ["parameters:"] + [f"  {k}: {v}" for k, v in required.items()] if required else []
    return parse_recipe("\n".join(lines) + "\n", str(tmp_path / "r.yml"))


@pytest.mark.parametrize("name", ALL)
def test_the_planner_holds_each_method_to_its_number_of_inputs(name, tmp_path):
    m = METHODS[name]
    assert make_plan(recipe_for(m, m.min_inputs, tmp_path), seed=1).tasks
    counts = [m.min_inputs - 1] if m.min_inputs > 1 else []
    counts += [m.max_inputs + 1] if m.max_inputs is not None and m.max_inputs < 3 else []
    for n in counts:
        with pytest.raises(MergeError, match=f"{name} takes .* got {n}"):
            make_plan(recipe_for(m, n, tmp_path), seed=1)


# ---------------------------------------------------------------------------------------------------------------
# the decorator and the range checks


def _kernel(
    base,
    inputs,
    *,
    weight: PerModel[float],
    t: float = 0.5,
    mode: Literal["a", "b"] = "a",
    scale: PerModel[Optional[float]] = None,
    lambda_: float = 1.0,
    steps: int = 3,
):
    """A kernel for the tests.

    More words.

    Args:
        weight: the weight,
            over two lines
        t: where
        mode: how
        scale: by what
        lambda: how much
        steps: how often
    """
    return base


def test_parameters_come_from_the_signature_and_the_docstring():
    m = make_method(_kernel, "k", pretty="K", url="https://example.org", ranges={"t": Range(0, 1)})
    assert m.description == "A kernel for the tests."
    got = {p.name: (p.kind, p.scope, p.default, p.choices, p.doc, p.arg) for p in m.params}
    assert got == {
        "weight": (float, "non_base", registry.REQUIRED, (), "the weight, over two lines", "weight"),
        "t": (float, "shared", 0.5, (), "where", "t"),
        "mode": (str, "shared", "a", ("a", "b"), "how", "mode"),
        "scale": (float, "non_base", None, (), "by what", "scale"),
        "lambda": (float, "shared", 1.0, (), "how much", "lambda_"),
        "steps": (int, "shared", 3, (), "how often", "steps"),
    }
    assert [p.name for p in m.params] == ["weight", "t", "mode", "scale", "lambda", "steps"]


def test_a_kernel_without_base_reads_per_model_parameters_for_every_model():
    def k(inputs, *, weight: PerModel[float]):
        """K.

        Args:
            weight: w
        """

    assert make_method(k, "k", pretty="K", url="u", base="ignored").param("weight").scope == "input"


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(base="sometimes"), "base must be one of"),
        (dict(base="ignored"), "takes `base` exactly when"),
        (dict(randomized=True), "takes `keys` exactly when"),
        (dict(ranges={"tt": (0, 1)}), "ranges for unknown parameters"),
        (dict(docs={"t": ""}, kernel="undocumented"), "needs a description"),
        (dict(kernel="untyped"), "needs a type annotation"),
        (dict(kernel="dict"), "is not one of bool"),
    ],
)
def test_a_kernel_that_does_not_declare_itself_is_refused(bad, message):
    def undocumented(base, inputs, *, t: float):
        """K."""

    def untyped(base, inputs, *, t):
        """K.

        Args:
            t: t
        """

    def dict_param(base, inputs, *, t: dict):
        """K.

        Args:
            t: t
        """

    kernel = {"undocumented": undocumented, "untyped": untyped, "dict": dict_param}.get(bad.pop("kernel", ""), _kernel)
    with pytest.raises(TypeError, match=message):
        make_method(kernel, "k", pretty="K", url="u", **bad)


def test_ranges_are_checked_per_value_and_extrapolable_ones_can_be_lifted():
    def cross(weight, t):
        return ("weight", "weights too far apart") if max(weight) - min(weight) > 5 else None

    m = make_method(
        _kernel,
        "k",
        pretty="K",
        url="u",
        check=cross,
        ranges={"t": Range(0, 1, extrapolate=True), "steps": (1, None), "scale": (None, 2)},
    )
    ok = {"t": 0.5, "mode": "a", "lambda": 1.0, "steps": 3}
    per = [{"weight": 1.0, "scale": None}, {"weight": 2.0, "scale": 1.5}]
    assert check_params(m, ok, per) is None
    assert check_params(m, {**ok, "t": 1.25}, per) == (
        "t",
        "t 1.25 lies outside [0, 1], so the merge would extrapolate; pass --allow-extrapolation if that is meant",
        None,
    )
    assert check_params(m, {**ok, "t": 1.25}, per, allow_extrapolation=True) is None
    assert check_params(m, {**ok, "steps": 0}, per, allow_extrapolation=True) == ("steps", "steps 0 must be >= 1", None)
    bad_scale = [per[0], {**per[1], "scale": 2.5}]
    assert check_params(m, ok, bad_scale) == ("scale", "scale 2.5 must be <= 2", 1)
    assert check_params(m, ok, [per[0], {**per[1], "weight": 9.0}]) == ("weight", "weights too far apart", None)


def test_builtin_range_errors_name_the_recipe_line_and_model(tmp_path):
    text = (
        f"merge_method: breadcrumbs\nbase_model: {tiny_dir() / 'base'}\nmodels:\n"
        f"  - model: {tiny_dir() / 'addition'}\n    parameters:\n      weight: 1\n"
        f"  - model: {tiny_dir() / 'sort'}\n    parameters:\n      weight: 1\n      gamma: 1.5\n"
    )
    with pytest.raises(MergeError, match=r"r.yml:10: model .*sort, tensor .*: gamma 1.5 must lie in \[0, 1\]"):
        make_plan(parse_recipe(text, str(tmp_path / "r.yml")), seed=1)
    text = (
        f"merge_method: sce\nbase_model: {tiny_dir() / 'base'}\nmodels:\n  - model: {tiny_dir() / 'sort'}\n"
        "parameters:\n  select_topk: -0.5\n"
    )
    with pytest.raises(MergeError, match=r"r.yml:6: tensor .*: select_topk -0.5 must lie in \[0, 1\]"):
        make_plan(parse_recipe(text, str(tmp_path / "r.yml")), seed=1)


def test_copy_when_turns_a_merge_into_a_copy(tmp_path):
    text = f"merge_method: passthrough\nmodels:\n  - model: {tiny_dir() / 'sort'}\n"
    plan = make_plan(parse_recipe(text, str(tmp_path / "r.yml")), seed=1)
    assert {t.kind for t in plan.tasks} == {"copy"}
    plan = make_plan(parse_recipe(text + "    parameters:\n      scale: 0.5\n", str(tmp_path / "r.yml")), seed=1)
    assert {t.kind for t in plan.tasks if t.out_dtype.is_floating_point} == {"merge"}


# ---------------------------------------------------------------------------------------------------------------
# plugins


def entry_points_of(*eps):
    return lambda group=None, **kw: [e for e in eps if group in (None, e.group)]


@pytest.fixture
def caplog(caplog, monkeypatch):
    """The CLI's logging setup (from other tests) stops mergesmith's records at its own handler."""
    import logging

    monkeypatch.setattr(logging.getLogger("mergesmith"), "propagate", True)
    return caplog


def test_a_broken_plugin_is_skipped_with_a_warning(monkeypatch, caplog):
    ep = importlib.metadata.EntryPoint("broken", "mergesmith_no_such_plugin_module", registry.PLUGIN_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points_of(ep))
    before = dict(METHODS)
    registry.load_plugins()
    assert "merge-method plugin 'broken' (mergesmith_no_such_plugin_module) not loaded" in caplog.text
    assert METHODS == before


def test_a_plugin_cannot_replace_a_builtin_method(monkeypatch, caplog, tmp_path):
    (tmp_path / "mergesmith_fake_linear.py").write_text(
        textwrap.dedent('''
        from mergesmith.methods import PerModel, merge_method

        @merge_method("linear", pretty="Fake", url="https://example.org", base="ignored")
        def linear(inputs, *, weight: PerModel[float]):
            """Not the real linear.

            Args:
                weight: w
            """
            return inputs[0] * 0
    ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("fake", "mergesmith_fake_linear", registry.PLUGIN_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points_of(ep))
    registry.load_plugins()
    assert "merge-method plugin 'fake' (mergesmith_fake_linear) not loaded" in caplog.text
    assert "'linear' is already defined by mergesmith.methods.linear" in caplog.text
    assert METHODS["linear"].kernel.__module__ == "mergesmith.methods.linear"


def test_a_plugin_function_registers_its_methods(monkeypatch, tmp_path):
    (tmp_path / "mergesmith_hook_plugin.py").write_text(
        textwrap.dedent('''
        from mergesmith.methods import merge_method

        def register():
            @merge_method("hooked", pretty="Hooked", url="https://example.org", base="ignored")
            def hooked(inputs):
                """The first model."""
                return inputs[0]
    ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    ep = importlib.metadata.EntryPoint("hook", "mergesmith_hook_plugin:register", registry.PLUGIN_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points_of(ep))
    registry.load_plugins()
    assert registry.get_method("hooked").description == "The first model." and "hooked" not in METHODS


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """The fixture package installed (with its entry point) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(FIXTURE, src)  # the build writes next to the sources: not into the repository
    target = tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    return target


def test_a_plugin_method_merges_like_a_builtin(plugin_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(plugin_path)}
    listing = subprocess.run(
        [sys.executable, "-m", "mergesmith", "methods"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "scaled_mean" in listing and "; plugin" in listing and "multiply the mean by this" in listing
    a, b = tiny_dir() / "addition", tiny_dir() / "sort"
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: scaled_mean\nmodels:\n  - model: {a}\n    parameters:\n      weight: 1\n"
        f"  - model: {b}\n    parameters:\n      weight: 3\nparameters:\n  factor: 0.5\n"
        "dtype: float32\n"
    )
    p = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(recipe), str(tmp_path / "out"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    xa, xb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(out) == set(xa)
    for name, t in out.items():
        want = 0.5 * (1 * xa[name].double().numpy() + 3 * xb[name].double().numpy()) / 4
        assert t.dtype == torch.float32
        np.testing.assert_allclose(t.double().numpy(), want, rtol=1e-6, atol=1e-7)
    # its range is checked like a built-in's, before any work
    recipe.write_text(recipe.read_text().replace("factor: 0.5", "factor: -1"))
    p = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(recipe), str(tmp_path / "o2"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "factor -1 must be >= 0" in p.stderr and not (tmp_path / "o2").exists()


def test_the_documented_example_is_the_fixtures():
    doc = (Path(__file__).parents[1] / "docs" / "methods.md").read_text(encoding="utf-8")
    for name in ("mergesmith_scaled_mean.py", "pyproject.toml"):
        assert (FIXTURE / name).read_text(encoding="utf-8") in doc, name
