"""ram and ramplus_tl against float64 references written here, hand-checked values, row blocks and recipes."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import run_recipe, through_executor
from mergesmith.demo import tiny_dir
from mergesmith.errors import MergeError
from mergesmith.methods import METHODS


def merge(name, base, xs, **shared):
    m = METHODS[name]
    return m.merge(base, xs, {**m.defaults(), **shared}, [{}] * len(xs))


# ---------------------------------------------------------------- references (float64, numpy, written here)


def counted(base, xs, eps):
    b = base.double().numpy()
    ds = [x.double().numpy() - b for x in xs]
    keep = [np.abs(d) > eps for d in ds]
    return b, ds, keep, sum(k.astype(np.int64) for k in keep)


def ref_ram(base, xs, eps=1e-5):
    b, ds, keep, c = counted(base, xs, eps)
    total = sum(np.where(k, d, 0.0) for d, k in zip(ds, keep))
    return b + total / np.maximum(c, 1)


def ref_ramplus(base, xs, r=0.1, alpha=0.2, eps=1e-5):
    b, ds, keep, c = counted(base, xs, eps)
    lams = []
    for k in keep:
        shared, unique = int((k & (c > 1)).sum()), int((k & (c == 1)).sum())
        rho = 0.0 if shared == 0 else shared / max(unique, eps) if max(unique, eps) > 0 else float("inf")
        lams.append(1 + r * min(max(rho, 0.0), alpha))
    total = sum(np.where(k, d, 0.0) for d, k in zip(ds, keep))
    boosted = sum(lam * np.where(k, d, 0.0) for lam, d, k in zip(lams, ds, keep))
    return b + np.where(c == 1, boosted, total / np.maximum(c, 1)), lams


def sparse_family(shape=(37, 23), n=3, seed=0, keep=(0.5, 0.3, 0.2)):
    """A base and n models that each change a random part of it (exact zeros elsewhere), plus tiny changes at
    the epsilon scale."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    xs = []
    for i in range(n):
        d = torch.randn(*shape, generator=g) * 0.1
        d = torch.where(torch.rand(*shape, generator=g) < keep[i % len(keep)], d, torch.zeros(()))
        d += torch.where(torch.rand(*shape, generator=g) < 0.05, torch.full((), 3e-6), torch.zeros(()))
        xs.append(base + d)
    return base, xs


# ---------------------------------------------------------------- hand-checked values


def test_ram_takes_lone_deltas_whole_and_averages_shared_ones():
    base = torch.zeros(5)
    x1 = torch.tensor([1.0, 2.0, 0.0, -4.0, 1e-6])
    x2 = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0])
    # element 0: both changed it (mean 2); 1: x1 alone (2); 2: nobody; 3: x1 alone (-4); 4: below epsilon
    assert merge("ram", base, [x1, x2]).tolist() == [2.0, 2.0, 0.0, -4.0, 0.0]
    assert merge("ram", base, [x1, x2], epsilon=2.5).tolist() == [3.0, 0.0, 0.0, -4.0, 0.0]


def test_ramplus_boosts_each_models_lone_deltas_by_its_overlap():
    base = torch.zeros(6)
    x1 = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 0.0])  # shares element 0 with x2; alone at 1 and 2
    x2 = torch.tensor([3.0, 0.0, 0.0, 8.0, 0.0, 0.0])  # shares element 0; alone at 3
    # x1: rho = 1/2; x2: rho = 1/1 = 1. With alpha 10, r 0.5: boosts 1.25 and 1.5
    out = merge("ramplus_tl", base, [x1, x2], r=0.5, alpha=10.0)
    assert out.tolist() == [2.0, 2.5, 5.0, 12.0, 0.0, 0.0]
    # default r 0.1, alpha 0.2: both rhos clamp to 0.2, boost 1.02
    out = merge("ramplus_tl", base, [x1, x2]).double()
    assert torch.allclose(out, torch.tensor([2.0, 2.04, 4.08, 8.16, 0, 0], dtype=torch.float64), rtol=1e-7)


def test_ramplus_model_with_no_lone_delta_divides_by_epsilon_and_one_that_changed_nothing_is_ignored():
    base = torch.zeros(4)
    x1 = torch.tensor([1.0, 0.0, 5.0, 0.0])  # shares element 0, alone at 2
    x2 = torch.tensor([3.0, 0.0, 0.0, 0.0])  # no lone delta: rho = 1 / epsilon, clamped to alpha
    x3 = torch.zeros(4)  # changed nothing: rho 0 (mergekit: 0/0, and the whole tensor NaN)
    out = merge("ramplus_tl", base, [x1, x2, x3], r=1.0, alpha=0.5, epsilon=0.0)
    assert out.tolist() == [2.0, 0.0, 5.0 * (1 + min(1 / 1, 0.5)), 0.0]


def test_a_merge_without_other_models_is_the_base():
    base = torch.randn(3, 4)
    for name in ("ram", "ramplus_tl"):
        assert torch.equal(merge(name, base, []), base)


# ---------------------------------------------------------------- float64 references


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.05])
def test_ram_matches_the_float64_reference(seed, eps):
    base, xs = sparse_family(seed=seed, n=2 + seed % 3)
    out = merge("ram", base, xs, epsilon=eps)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), ref_ram(base, xs, eps), rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("r,alpha,eps", [(0.1, 0.2, 1e-5), (0.7, 5.0, 1e-5), (2.0, 0.05, 0.05), (0.3, 1.0, 0.0)])
def test_ramplus_matches_the_float64_reference(seed, r, alpha, eps):
    base, xs = sparse_family(seed=seed, n=2 + seed % 3)
    out = merge("ramplus_tl", base, xs, r=r, alpha=alpha, epsilon=eps)
    ref, lams = ref_ramplus(base, xs, r, alpha, eps)
    assert all(lam > 1 for lam in lams)  # every model's lone deltas are boosted: the test can see the boosts
    assert alpha < 5 or len(set(lams)) == len(lams)  # and, unclamped, differ between models
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=3e-7, atol=1e-7)


def blocks_of(name, base, xs, block_elements, monkeypatch, **shared):
    """One tensor through the executor: (output, row blocks)."""
    out, blocks, _ = through_executor(name, base, xs, block_elements, monkeypatch, shared)
    return out, blocks


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_row_blocks_give_the_whole_tensors_bytes(name, monkeypatch):
    """ramplus_tl's boosts count over the whole tensor (pass 1 adds the blocks' counts): blocks whose own counts
    differ a lot still give the whole tensor's bytes."""
    base, xs = sparse_family(shape=(60, 17), keep=(0.9, 0.1, 0.5))
    xs[1][:30] = base[:30]  # model 1 changes only the lower half: its lone deltas all lie in later blocks
    whole, one = blocks_of(name, base, xs, 1 << 22, monkeypatch, r=0.5, alpha=3.0)
    parts, blocks = blocks_of(name, base, xs, 100, monkeypatch, r=0.5, alpha=3.0)
    assert len(one) == 1 and len(blocks) > 5
    assert torch.equal(whole, parts)
    ref = ref_ram(base, xs) if name == "ram" else ref_ramplus(base, xs, 0.5, 3.0)[0]
    np.testing.assert_allclose(parts.double().numpy(), ref, rtol=3e-7, atol=1e-7)


# ---------------------------------------------------------------- recipes

RECIPE = """merge_method: {method}
base_model: {tiny}/base
models:
  - model: {tiny}/addition
  - model: {tiny}/reverse
  - model: {tiny}/sort
parameters:
{params}
dtype: float32
"""


@pytest.mark.parametrize(
    "method,params,ref",
    [
        ("ram", {"epsilon": 0.002}, lambda b, xs: ref_ram(b, xs, 0.002)),
        (
            "ramplus_tl",
            {"epsilon": 0.002, "r": 0.5, "alpha": 2.0},
            lambda b, xs: ref_ramplus(b, xs, 0.5, 2.0, 0.002)[0],
        ),
    ],
)
def test_a_recipe_merges_the_tiny_family_like_the_reference(method, params, ref, tmp_path):
    text = RECIPE.format(method=method, tiny=tiny_dir(), params="\n".join(f"  {k}: {v}" for k, v in params.items()))
    (tmp_path / "r.yml").write_text(text)
    run_recipe(str(tmp_path / "r.yml"), str(tmp_path / "out"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    models = [load_file(str(tiny_dir() / n / "model.safetensors")) for n in ("base", "addition", "reverse", "sort")]
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        b, *xs = (m[name] for m in models)
        np.testing.assert_allclose(out[name].double().numpy(), ref(b, xs), rtol=3e-7, atol=1e-8, err_msg=name)


@pytest.mark.parametrize(
    "method,param,value", [("ram", "epsilon", -0.1), ("ramplus_tl", "r", -1), ("ramplus_tl", "alpha", -0.5)]
)
def test_negative_parameters_are_refused_before_any_work(method, param, value, tmp_path):
    text = RECIPE.format(method=method, tiny=tiny_dir(), params=f"  {param}: {value}")
    (tmp_path / "r.yml").write_text(text)
    with pytest.raises(MergeError, match=rf"r\.yml:\d+: .*{param} -?[\d.]+ must be >= 0"):
        run_recipe(str(tmp_path / "r.yml"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
