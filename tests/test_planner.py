"""The planner's shape: small functions, named slice sources, and a Plan that a run leaves as it was."""

from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path

import pytest

import mergesmith
from mergesmith.demo import recipe_path, tiny_dir
from mergesmith.execute import execute
from mergesmith.methods import get_method
from mergesmith.plan import SliceSource, make_plan, output_groups, resolve_models
from mergesmith.recipe import parse_recipe

SRC = Path(mergesmith.__file__).parent
MAX_LINES = 60

# Modules held to the length rule; each joins the list once its long functions are split.
CHECKED = ["plan.py"]


def long_functions(path: Path):
    """(name, first line, length) of each function in a file longer than MAX_LINES: from its `def` line to its last
    line, its docstring not counted. Nested functions count within their parent and on their own."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        n = node.end_lineno - node.lineno + 1
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            n -= first.end_lineno - first.lineno + 1
        if n > MAX_LINES:
            out.append((node.name, node.lineno, n))
    return out


def test_the_length_rule_counts_from_def_to_end_without_the_docstring(tmp_path):
    def body(indent: str, n: int) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    doc = '    """A docstring\n    of three\n    lines."""\n'
    f = tmp_path / "m.py"
    f.write_text(
        f"def fits():\n{doc}{body('    ', 59)}\n\n"  # lines 1-63: 60 without the docstring
        f"def over():\n{doc}{body('    ', 60)}\n\n"  # lines 66-129: 61
        f"class C:\n    def method(self):\n{body('        ', 61)}"
    )  # lines 133-194: 62
    assert long_functions(f) == [("over", 66, 61), ("method", 133, 62)]


@pytest.mark.parametrize("module", CHECKED)
def test_no_function_is_longer_than_60_lines(module):
    assert long_functions(SRC / module) == []


def _tiny(name: str) -> str:
    return str(tiny_dir() / name)


def _stellar(method: str = "della_linear") -> str:
    return (
        recipe_path()
        .read_text(encoding="utf-8")
        .replace("tiny/", f"{tiny_dir()}/")
        .replace("merge_method: della_linear", f"merge_method: {method}")
    )


TWO_SLICES = f"""merge_method: linear
slices:
  - sources:
      - model: {_tiny("addition")}
        layer_range: [0, 3]
      - model: {_tiny("sort")}
        layer_range: [1, 4]
  - sources:
      - model: {_tiny("reverse")}
        layer_range: [2, 4]
      - model: {_tiny("base")}
        layer_range: [0, 2]
parameters:
  weight: 0.5
"""


def test_a_two_slice_recipe_has_named_sources_in_its_groups():
    recipe = parse_recipe(TWO_SLICES, "r.yml")
    method = get_method("linear")
    groups = output_groups(recipe, method, resolve_models(recipe, None, allow_crimes=False))
    first, second = groups
    assert first.sources == [SliceSource(_tiny("addition"), 0, 3, 0), SliceSource(_tiny("sort"), 1, 4, 1)]
    assert [(s.model, s.start, s.end, s.length) for s in second.sources] == [
        (_tiny("reverse"), 2, 4, 2),
        (_tiny("base"), 0, 2, 2),
    ]
    assert (first.out_start, second.out_start) == (0, 3)  # the second slice's layers follow the first's 3
    assert first.base is None and first.inputs == first.sources and first.template.model == _tiny("addition")
    # output layer 4 is the second slice's layer 1: layer 3 of reverse, layer 1 of base
    out = "model.layers.4.mlp.down_proj.weight"
    assert [s.tensor(out, 1) for s in second.sources] == [
        "model.layers.3.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert second.sources[0].tensor("model.norm.weight", None) == "model.norm.weight"
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.sources[0].start = 1


def _state(plan):
    """Every field of a plan, deep-copied into values that compare with ==."""
    voc = plan.vocabulary
    state = {
        f.name: copy.deepcopy(getattr(plan, f.name))
        for f in dataclasses.fields(plan)
        if f.name not in ("recipe", "method", "models", "vocabulary")
    }
    state["recipe"] = (
        plan.recipe.source,
        plan.recipe.text,
        plan.recipe.config.model_dump(mode="json"),
        dict(plan.recipe.lines),
        list(plan.recipe.warnings),
    )
    state["method"] = plan.method
    state["models"] = [
        (ref, idx.path, dict(idx.tensors), copy.deepcopy(idx.config), idx.lora) for ref, idx in plan.models.items()
    ]
    state["vocabulary"] = (
        None
        if voc is None
        else (
            dict(voc.vocab),
            voc.size,
            {m: p.tobytes() for m, p in voc.perms.items()},
            copy.deepcopy(voc.originals),
            dict(voc.overrides),
            voc.base,
            voc.tokenizer,
        )
    )
    return state


@pytest.mark.parametrize(
    "text", [_stellar() + "tokenizer_source: union\n", TWO_SLICES], ids=["della_linear-union-vocabulary", "two-slices"]
)
def test_a_run_leaves_the_plan_as_it_was(tmp_path, text):
    plan = make_plan(parse_recipe(text, str(tmp_path / "r.yml")), seed=3, strict=True)
    before = _state(plan)
    assert sorted(before) == sorted(f.name for f in dataclasses.fields(plan))
    (tmp_path / "out").mkdir()
    assert execute(plan, tmp_path / "out", progress=False) == 0
    assert (tmp_path / "out" / "model.safetensors").stat().st_size == plan.layout.sizes[0]
    assert _state(plan) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.strict = False


def test_strict_is_given_to_make_plan():
    text = _stellar("linear").replace(f"base_model: {_tiny('base')}\n", "")
    assert make_plan(parse_recipe(text, "r.yml"), seed=1, strict=True).strict
    assert not make_plan(parse_recipe(text, "r.yml"), seed=1).strict
