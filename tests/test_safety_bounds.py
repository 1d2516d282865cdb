"""Bounded work on tiny hostile inputs, and loud (never silent) wrong output: recipes that would make the parser, the
planner or a merge blow up, hang or quietly write a broken model get one line and exit 2 instead."""

import json
import logging
import shutil
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import read_folder, run_recipe
from mergesmith.cli import main
from mergesmith.errors import MergeError
from mergesmith.io.writer import parse_size
from mergesmith.plan import make_plan
from mergesmith.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def one_line_error(capsys, *args) -> str:
    """Run the CLI, expect exit 2 and exactly one `error:` line; return it."""
    capsys.readouterr()
    assert cli(*args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def refused(text: str, match: str, **kw):
    with pytest.raises(MergeError, match=match) as e:
        make_plan(parse_recipe(text, "r.yml"), seed=1, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def variant(src: Path, dst: Path, edit=None, config=None) -> Path:
    """A copy of model folder `src` with its tensors (float32 copies) and config.json edited."""
    shutil.copytree(src, dst)
    sd = read_folder(dst)
    for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.index.json")):
        f.unlink()
    if edit:
        edit(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def linear(*models, weights=None, extra=""):
    weights = weights or [1] * len(models)
    body = "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in zip(models, weights))
    return f"merge_method: linear\nmodels:\n{body}{extra}"


# ---------------------------------------------------------------------------------------------------------------
# The YAML parser: size, nesting, aliases


def test_alias_bomb_is_refused_in_bounded_memory(tmp_path):
    """Nine levels of nine aliases (~600 bytes) would expand to 9^10 values: refused after a bounded count, in a
    process that may not use more than 1 GB."""
    rows = ["merge_method: linear", "a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefghi", "bcdefghij"):
        rows.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yml"
    bomb.write_text("\n".join(rows) + "\n")
    assert bomb.stat().st_size < 700
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from mergesmith.errors import MergeError\nfrom mergesmith.recipe import load_recipe\n"
        "try:\n    load_recipe(sys.argv[1])\nexcept MergeError as e:\n    print(e)\n"
    )
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-500:]
    assert res.stdout.strip().startswith("bomb.yml:") and "more than 100000 values" in res.stdout
    assert time.monotonic() - t0 < 60


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, capsys):
    for depth in (500, 20000):
        p = tmp_path / f"deep{depth}.yml"
        p.write_text("merge_method: linear\nmodels: " + "[" * depth + "]" * depth + "\n")
        err = one_line_error(capsys, "plan", p)
        assert f"deep{depth}.yml:2: YAML nested more than 64 levels deep" in err


def test_oversized_recipe_is_refused(tmp_path, capsys, fam):
    p = tmp_path / "big.yml"
    p.write_text(linear(fam[1], fam[2]) + ("# padding\n" * 120_000))  # a valid recipe, 1.2 MB
    assert "is at most 1048576" in one_line_error(capsys, "plan", p)
    with pytest.raises(MergeError, match="is at most"):
        parse_recipe(p.read_text(), "big.yml")


def test_wrong_type_of_merge_method_is_one_line_from_the_command(tmp_path):
    """`python -m mergesmith run` looks at merge_method before anything else (allocator settings): a list there
    must not crash it."""
    p = tmp_path / "r.yml"
    p.write_text("merge_method: [linear]\nmodels:\n  - model: a\n")
    res = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(p), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: r.yml:1: 'merge_method' has a wrong value ['linear']: Input should be a valid string"
    ]


@pytest.mark.parametrize(
    "value, match",
    [
        (
            '"/models/a\\nerror: all good"',
            r"r.yml:3: the model reference '/models/a\\nerror: all good' holds a control",
        ),
        ('"/models/a\\0b"', r"r.yml:3: the value '/models/a\\x00b' holds a control"),
        ('"/models/a\\ud800"', r"r.yml:3: the value '/models/a\\ud800' holds a control or unpaired surrogate"),
        ("''", "r.yml:3: an empty model reference"),
    ],
)
def test_model_names_with_control_characters_are_refused(value, match):
    with pytest.raises(MergeError, match=match) as e:
        parse_recipe(f"merge_method: linear\nmodels:\n  - model: {value}\n", "r.yml")
    assert "\n" not in str(e.value)


def test_huge_numbers_in_yaml_are_refused_with_their_line():
    digits = "9" * 5000  # beyond Python's int-from-string limit
    with pytest.raises(MergeError, match="r.yml:4: bad YAML value"):
        parse_recipe(f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {digits}}}\n", "r.yml")


def test_long_values_are_cut_in_messages():
    name = "x" * 5000
    with pytest.raises(MergeError) as e:
        make_plan(parse_recipe(f"merge_method: {name}\nmodels:\n  - model: a\n", "r.yml"))
    assert len(str(e.value)) < 400 and "xxx..." in str(e.value)
    with pytest.raises(MergeError) as e:
        parse_recipe(f"merge_method: linear\ndtype: {name}\nmodels:\n  - model: a\n", "r.yml")
    assert len(str(e.value)) < 400


def test_a_model_listed_twice_is_refused(fam):
    refused(
        linear(fam[1], fam[1], weights=[1, 2]),
        r"r.yml:5: model .*ft1 is listed twice \(entries 1 and 2 of 'models:', lines 3 and 5\)",
    )
    twice = (
        f"merge_method: linear\nslices:\n  - sources:\n      - model: {fam[1]}\n        layer_range: [0, 1]\n"
        f"      - model: {fam[1]}\n        layer_range: [0, 1]\n"
    )
    refused(twice, "r.yml:6: model .*ft1 is listed twice")


def test_pad_to_multiple_of_is_bounded(fam):
    text = linear(fam[1], fam[2], extra="tokenizer:\n  source: union\n  pad_to_multiple_of: 100000000000000\n")
    refused(text, r"r.yml:9: pad_to_multiple_of 100000000000000 must lie in \[1, 65536\]")


def test_gradient_and_condition_lists_are_bounded(fam):
    grad = "[" + ", ".join(["0.5"] * 2000) + "]"
    refused(
        linear(fam[1], fam[2], weights=[grad, 1]), "r.yml:4: 'weight' lists 2000 values or conditions; at most 1024"
    )


# ---------------------------------------------------------------------------------------------------------------
# Layer counts come from the tensors


def test_config_claiming_a_billion_layers_is_refused_at_once(tmp_path, fam):
    big = variant(fam[1], tmp_path / "big", config=lambda c: c.update(num_hidden_layers=1_000_000_000))
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear(big))  # one model: no other config to disagree with
    res = subprocess.run(
        [sys.executable, "-m", "mergesmith", "plan", str(recipe)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "1000000000 layers" in err[0]


def test_config_claiming_one_layer_more_is_refused(tmp_path, fam):
    more = variant(fam[1], tmp_path / "more", config=lambda c: c.update(num_hidden_layers=3))
    refused(linear(more), r"r.yml:3: model .*more: its config.json says num_hidden_layers 3 but its tensors hold 2")


def test_layers_missing_between_others_are_refused(tmp_path, fam):
    def far_layer(sd):
        sd["model.layers.5.input_layernorm.weight"] = torch.ones(64)

    gap = variant(fam[1], tmp_path / "gap", far_layer)
    refused(linear(fam[2], gap), r"r.yml:5: model .*gap: its tensors hold layers up to 5 but nothing of layer 2")


# ---------------------------------------------------------------------------------------------------------------
# Silent wrong output becomes loud


def test_nan_in_a_copied_tensor_warns_and_is_refused_under_strict(tmp_path, fam, caplog):
    def poison(sd):
        sd["model.layers.0.input_layernorm.weight"][3] = float("nan")

    bad = variant(fam[1], tmp_path / "bad", poison)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {bad}\n        layer_range: [0, 2]\n"
    )
    with pytest.raises(
        MergeError,
        match=r"tensor model.layers.0.input_layernorm.weight holds NaN or Inf values "
        r"\(refused under --strict\)",
    ):
        run_recipe(str(recipe), str(tmp_path / "strict"), strict=True)
    assert not (tmp_path / "strict").exists()
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        run_recipe(str(recipe), str(tmp_path / "out"))
    assert any("model.layers.0.input_layernorm.weight holds NaN or Inf" in m for m in caplog.messages)


def test_a_tensor_missing_from_an_input_is_an_error(tmp_path, fam):
    lacking = variant(fam[2], tmp_path / "lacking", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    refused(
        linear(fam[1], lacking),
        r"model .*lacking lacks tensor model.layers.1.mlp.up_proj.weight, which .*ft1 "
        r"has .*--allow-crimes",
    )
    plan = make_plan(parse_recipe(linear(fam[1], lacking), "r.yml"), seed=1, allow_crimes=True)
    task = next(t for t in plan.tasks if t.name == "model.layers.1.mlp.up_proj.weight")
    assert [r.model for r in task.inputs] == [str(fam[1])]


def test_float16_overflow_is_refused_not_written_as_inf(tmp_path, fam):
    def big(sd):
        for k in sd:
            sd[k] = sd[k].float()
        sd["model.norm.weight"][0] = 1e5  # fine in float32 and bfloat16, beyond float16's 65504

    wide = variant(fam[1], tmp_path / "wide", big)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: passthrough\nout_dtype: float16\nslices:\n  - sources:\n      - model: {wide}\n"
        "        layer_range: [0, 2]\n"
    )
    with pytest.raises(MergeError, match="model.norm.weight holds values beyond float16's range"):
        run_recipe(str(recipe), str(tmp_path / "o1"))
    recipe.write_text(linear(wide, fam[2], extra="out_dtype: float16\nparameters: {normalize: false}\n"))
    with pytest.raises(MergeError, match="tensor model.norm.weight: the merge holds values beyond float16's range"):
        run_recipe(str(recipe), str(tmp_path / "o2"))


# ---------------------------------------------------------------------------------------------------------------
# Parameter ranges


def slerp(fam, t):
    return (
        f"merge_method: slerp\nbase_model: {fam[0]}\nmodels:\n  - model: {fam[0]}\n  - model: {fam[1]}\n"
        f"parameters:\n  t: {t}\n"
    )


def test_extrapolation_needs_its_flag(tmp_path, fam, capsys):
    refused(
        slerp(fam, 1.5),
        r"r.yml:7: tensor model.embed_tokens.weight: t 1.5 lies outside \[0, 1\], so the merge "
        r"would extrapolate; pass --allow-extrapolation",
    )
    refused(slerp(fam, "[0, -0.5]"), "r.yml:7: tensor model.layers.1.*: t -0.5 lies outside")
    plan = make_plan(parse_recipe(slerp(fam, 1.5), "r.yml"), seed=1, allow_extrapolation=True)
    assert {t.shared["t"] for t in plan.tasks if t.kind == "merge"} == {1.5}
    nu = (
        f"merge_method: nuslerp\nmodels:\n  - model: {fam[1]}\n    parameters: {{weight: -1}}\n"
        f"  - model: {fam[2]}\n    parameters: {{weight: 2}}\n"
    )
    refused(nu, "r.yml:4: model .*ft1, tensor .*: weight -1 lies outside")
    recipe = tmp_path / "r.yml"
    recipe.write_text(slerp(fam, 1.5))
    assert "--allow-extrapolation" in one_line_error(capsys, "plan", recipe)
    assert cli("plan", recipe, "--allow-extrapolation") == 0
    # negative task-arithmetic weights are ordinary (subtracting a task vector), not extrapolation
    ta = (
        f"merge_method: task_arithmetic\nbase_model: {fam[0]}\nmodels:\n  - model: {fam[1]}\n"
        f"    parameters: {{weight: -0.5}}\n"
    )
    make_plan(parse_recipe(ta, "r.yml"), seed=1)


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("linear", "{weight: 1e300}", r"model .*ft1, tensor .*: weight 1e\+300 must lie in \[-1e\+06, 1e\+06\]"),
        ("ties", "{weight: 1, density: 0.5, lambda: 1e9}", r"tensor .*: lambda 1e\+09 must lie in"),
        ("karcher", "{max_iter: 1000000000000}", r"tensor .*: max_iter 1e\+12 must lie in \[1, 100000\]"),
        ("karcher", "{tol: -1}", r"tol -1 must lie in \[0, 1\]"),
        ("karcher", "{max_iter: .inf}", r"'max_iter' must be a whole number, got inf"),
        ("nearswap", "{t: -0.1}", r"t -0.1 must lie in \[0, 1e\+06\]"),
        ("multislerp", "{weight: 1, eps: 0.5}", r"eps 0.5 must lie in \[0, 0.01\]"),
        ("passthrough", "{scale: -1e9}", r"scale -1e\+09 must lie in"),
    ],
)
def test_parameter_values_out_of_range_are_refused(fam, method, params, match):
    """Refused in the plan, naming the line of the value (the last line here)."""
    base = f"base_model: {fam[0]}\n" if method in ("ties", "nearswap") else ""
    models = [fam[1]] if method in ("nearswap", "passthrough") else [fam[1], fam[2]]
    body = "".join(f"  - model: {m}\n" for m in models)
    text = f"merge_method: {method}\n{base}models:\n{body}parameters: {params}\n"
    if method == "passthrough":
        text = (
            f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {fam[1]}\n"
            f"        layer_range: [0, 2]\nparameters: {params}\n"
        )
    refused(text, f"r.yml:{len(text.splitlines())}: .*" + match)


def test_weights_summing_to_zero_are_refused_for_multislerp(fam):
    text = (
        f"merge_method: multislerp\nmodels:\n  - model: {fam[1]}\n    parameters: {{weight: 1}}\n"
        f"  - model: {fam[2]}\n    parameters: {{weight: -1}}\n"
    )
    refused(text, "the weights sum to 0, so normalize_weights cannot divide by them", allow_extrapolation=True)


@pytest.mark.parametrize("text", ["nan", "inf", "1e400GB", "0.1"])
def test_shard_sizes_that_are_no_size_are_refused(text, capsys, tmp_path):
    with pytest.raises(MergeError, match="bad size"):
        parse_size(text)
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n")
    assert "bad size" in one_line_error(capsys, "plan", recipe, "--out-shard-size", text)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5KB") == 1500


@pytest.mark.parametrize("value", ["{a: 1}", "[[1]]", "null"])
def test_a_parameter_of_the_wrong_shape_says_what_fits(value):
    with pytest.raises(
        MergeError,
        match=r"r.yml:5: parameter 'weight' has a wrong value .*: give a number, "
        r"true/false, a list of numbers \(a gradient\) or a list of \{filter",
    ):
        parse_recipe(f"merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {value}\n", "r.yml")


def test_a_recipe_that_is_a_pipe_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "r.yml"
    os.mkfifo(fifo)
    res = subprocess.run(
        [sys.executable, "-m", "mergesmith", "plan", str(fifo)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: recipe {fifo} is not a regular file; save the recipe to a file"
    ]
