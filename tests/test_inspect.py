"""`mergesmith inspect`: what a merge did, checked against merges whose answer is known and float64 numpy."""

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.cli import main


def cli(*args, capsys=None):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def merge(tmp_path, fam, body: str, name: str):
    b, f1, f2, f3 = fam
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(body.format(base=b, ft1=f1, ft2=f2, ft3=f3))
    out = tmp_path / name
    assert cli("run", recipe, out, "--quiet", "--seed", 3) == 0
    return out


def inspect_json(capsys, *args):
    capsys.readouterr()
    assert cli("inspect", *args, "--json") == 0
    return json.loads(capsys.readouterr().out)


TASK_ARITHMETIC = """models:
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: -0.2}}
  - model: {ft3}
    parameters: {{weight: 0.5}}
merge_method: task_arithmetic
base_model: {base}
dtype: float32
"""


def test_task_arithmetic_weights_come_back(tmp_path, fam, capsys):
    """A float32 task-arithmetic merge is exactly base + sum w_i D_i: every layer's fit gives the recipe's
    weights back and explains all of the change."""
    out = merge(tmp_path, fam, TASK_ARITHMETIC, "ta")
    rep = inspect_json(capsys, out)
    rows = rep["groups"] + [rep["total"]]
    assert [r["group"] for r in rep["groups"]] == ["embeddings", "layer 0", "layer 1", "head & norm"]
    for r in rows:
        assert r["weights"] == pytest.approx([0.3, -0.2, 0.5], abs=1e-5), r["group"]
        assert r["fit"] == pytest.approx(1.0, abs=1e-6)
        assert 0 < r["change"] < 1
    assert rep["skipped"] == []
    assert list(rep["inputs"]) == ["ft1", "ft2", "ft3"]


def test_linear_without_base_fits_the_models_themselves(tmp_path, fam, capsys):
    """No base: the inputs are the regressors, and a normalized linear merge gives w_i / sum(w)."""
    out = merge(
        tmp_path,
        fam,
        """models:
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.1}}
  - model: {ft3}
    parameters: {{weight: 0.4}}
merge_method: linear
dtype: float32
""",
        "lin",
    )
    rep = inspect_json(capsys, out)
    assert rep["base"] is None
    assert rep["total"]["weights"] == pytest.approx([0.375, 0.125, 0.5], abs=1e-4)
    assert rep["total"]["change"] is None and rep["total"]["untouched"] is None


def test_ties_leaves_at_least_the_untrimmed_share_untouched(tmp_path, fam, capsys):
    """TIES changes an element only where some model kept it: at least 1 - sum(density) of each tensor is
    untouched; the sparsified merge is not a weighted sum of the full task vectors (fit < 1)."""
    out = merge(
        tmp_path,
        fam,
        """models:
  - model: {ft1}
    parameters: {{weight: 0.3, density: 0.1}}
  - model: {ft2}
    parameters: {{weight: 0.1, density: 0.2}}
  - model: {ft3}
    parameters: {{weight: 0.4, density: 0.3}}
merge_method: ties
base_model: {base}
dtype: bfloat16
""",
        "ties",
    )
    rep = inspect_json(capsys, out, "--by", "tensor")
    assert len(rep["groups"]) > 10
    for r in rep["groups"]:
        assert r["untouched"] >= 1 - 0.6 - 1e-9, r["group"]
    assert rep["total"]["fit"] < 0.9


def test_table_plot_and_mergekit_config(tmp_path, fam, capsys):
    """The table names the inputs, --plot writes an SVG with one line per input plus the change, and a folder with
    mergekit's config file name (mergekit_config.yml) is read the same way."""
    out = merge(tmp_path, fam, TASK_ARITHMETIC, "ta2")
    mk = tmp_path / "mk"
    shutil.copytree(out, mk)
    (mk / "mergesmith_config.yml").rename(mk / "mergekit_config.yml")
    svg = tmp_path / "chart.svg"
    capsys.readouterr()
    assert cli("inspect", mk, "--plot", svg, "--by", "module") == 0
    text = capsys.readouterr().out
    assert "w:ft1" in text and "whole model" in text and "mlp.down_proj.weight" in text
    root = ET.parse(svg).getroot()
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 4


def test_inputs_found_from_another_directory(tmp_path, fam, capsys, monkeypatch):
    """Relative model paths in the recipe: the recipe copy records where they were found, so inspecting (and
    re-running the copy) works from any working directory."""
    b, f1, f2, f3 = fam
    work = b.parent
    recipe = work / "rel.yml"
    recipe.write_text(TASK_ARITHMETIC.format(base="base", ft1="ft1", ft2="ft2", ft3="ft3"))
    out = tmp_path / "rel"
    assert cli("run", recipe, out, "--quiet") == 0
    assert f"#   ft1 -> {f1.resolve()}" in (out / "mergesmith_config.yml").read_text()
    monkeypatch.chdir(tmp_path)
    rep = inspect_json(capsys, out)
    assert rep["total"]["weights"] == pytest.approx([0.3, -0.2, 0.5], abs=1e-5)
    again = tmp_path / "again"
    assert cli("run", out / "mergesmith_config.yml", again, "--quiet") == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_user_errors_are_one_line(tmp_path, fam, capsys):
    assert cli("inspect", tmp_path / "nowhere") == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "bare"
    shutil.copytree(fam[1], empty)
    assert cli("inspect", empty) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--base and --model" in err
    assert cli("inspect", empty, "--base", fam[0], "--model", tmp_path / "missing") == 2
    assert "missing" in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 4),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    split=st.integers(1, 8),
    with_base=st.booleans(),
)
def test_sums_fit_equals_numpy_least_squares(k, rows, cols, seed, split, with_base):
    """Row blocks added together give numpy's float64 answers for the whole tensor: lstsq on the design matrix
    (not the normal equations), norms, cosines, untouched count."""
    from mergesmith.inspection import Sums, tensor_sums

    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, cols)).astype(np.float32)
    xs = [base + rng.standard_normal((rows, cols)).astype(np.float32) * 0.1 for _ in range(k)]
    merged = base + sum(rng.uniform(-1, 1) * (x - base) for x in xs).astype(np.float32)
    merged[0, 0] = base[0, 0]  # one element untouched for sure
    merged = merged + (rng.standard_normal((rows, cols)) * 0.01).astype(np.float32) * (rng.random((rows, cols)) < 0.5)
    total = Sums(k)
    cut = min(rows, split)
    for a, b in ((0, cut), (cut, rows)):
        if a < b:
            t = lambda arr: torch.from_numpy(np.ascontiguousarray(arr[a:b]))  # noqa: E731
            total.add(tensor_sums(t(merged), t(base) if with_base else None, [t(x) for x in xs]))
    got = total.summary()
    b64 = base.astype(np.float64) if with_base else 0.0
    m = (merged.astype(np.float64) - b64).reshape(-1)
    d = np.stack([(x.astype(np.float64) - b64).reshape(-1) for x in xs], axis=1)
    if np.linalg.matrix_rank(d) == k and m @ m > 0:
        want = np.linalg.lstsq(d, m, rcond=None)[0]
        assert got["weights"] == pytest.approx(want, rel=1e-6, abs=1e-8)
        resid = m - d @ want
        assert got["fit"] == pytest.approx(min(1.0, 1 - resid @ resid / (m @ m)), abs=1e-8)
        cos = d.T @ m / (np.linalg.norm(d, axis=0) * np.linalg.norm(m))
        assert got["cosine"] == pytest.approx(cos, rel=1e-9, abs=1e-12)
    if with_base:
        assert got["change"] == pytest.approx(np.linalg.norm(m) / np.linalg.norm(base.astype(np.float64)))
        assert got["untouched"] == pytest.approx(np.count_nonzero(merged == base) / merged.size)
    assert got["elements"] == rows * cols
