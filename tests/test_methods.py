"""slerp, nuslerp, multislerp, karcher, model_stock, sce, nearswap, arcee_fusion, passthrough: each against a
float64 numpy reference written here from the method's formula, plus properties over random inputs."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.test_kernels import merge
from helpers import ref_multislerp

G = torch.Generator().manual_seed(7)


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def np64(x):
    return x.double().numpy()


def close(got, want, tol=2e-6):
    """float32 result vs float64 reference: relative to the reference's scale."""
    got = got.double().numpy()
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= tol * scale, np.abs(got - want).max()


# ---------------------------------------------------------------------------- references


def ref_slerp(t, a, b, thr=0.9995, eps=1e-8):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    d = float(np.clip(np.sum((a / na) * (b / nb)), -1, 1))
    if abs(d) > thr:
        return (1 - t) * a + t * b
    th = math.acos(d)
    return math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b


def sphere_mean(xs):
    """Karcher mean by Riemannian gradient descent run to convergence (not mergekit's loop), times the mean norm."""
    norms = [np.linalg.norm(x) for x in xs]
    us = [x / n for x, n in zip(xs, norms)]
    m = sum(us)
    m /= np.linalg.norm(m)
    for _ in range(500):
        g = np.zeros_like(m)
        for u in us:
            c = np.clip(np.sum(m * u), -1, 1)
            th = math.acos(c)
            if th > 1e-12:
                g += (u - c * m) * th / math.sin(th) / len(us)
        gn = np.linalg.norm(g)
        if gn < 1e-13:
            break
        m = math.cos(gn) * m + math.sin(gn) * g / gn
        m /= np.linalg.norm(m)
    return m * np.mean(norms)


def ref_model_stock(w0, ws, filter_wise=False):
    shape = w0.shape
    if not filter_wise:
        w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            cos.append(
                np.sum(offs[i] * offs[j], -1)
                / np.maximum(np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1), 1e-6)
            )
    c = np.clip(np.mean(cos, axis=0), -1, 1)[:, None]
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def ref_sce(base, xs, topk):
    ds = np.stack([x - base for x in xs])
    if topk < 1:
        var = ds.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.argsort(-var.ravel(), kind="stable")[:k]
        mask = np.zeros(var.size)
        mask[keep] = 1
        ds = ds * mask.reshape(var.shape)
    e = (ds**2).reshape(len(xs), -1).mean(1)
    w = e / e.sum()
    sign = np.where(ds.sum(0) >= 0, 1, -1)
    agree = np.sign(ds) == sign
    ew = w.reshape((-1,) + (1,) * base.ndim) * agree
    return base + (ds * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def ref_nearswap(a, b, t):
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    return w * b + (1 - w) * a


def ref_fusion(a, b):
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    imp = np.abs(b - a) * np.sum(p * np.log(p / q), -1, keepdims=True)
    s = np.sort(imp.ravel())
    q1, med, q3 = (s[int(f * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    return a + (b - a) * (imp >= med + 1.5 * (q3 - q1)), imp, med + 1.5 * (q3 - q1)


# ---------------------------------------------------------------------------- unit tests vs references


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_reference(t):
    a, b = rnd(32, 16), rnd(32, 16)
    close(merge("slerp", a, [b], [{}], t=t), ref_slerp(t, np64(a), np64(b)))


def test_slerp_nearly_collinear_is_lerp():
    a = rnd(64)
    b = a * 2 + rnd(64, scale=1e-4)
    got = merge("slerp", a, [b], [{}], t=0.3)
    close(got, 0.7 * np64(a) + 0.3 * np64(b))


def test_nuslerp_flattened_equals_slerp_and_rows_are_separate():
    a, b = rnd(8, 32), rnd(8, 32)
    close(merge("nuslerp", None, [a, b], [{"weight": 3.0}, {"weight": 1.0}]), ref_slerp(0.25, np64(a), np64(b)))
    rows = merge("nuslerp", None, [a, b], [{"weight": 3.0}, {"weight": 1.0}], nuslerp_flatten=False)
    close(rows, np.stack([ref_slerp(0.25, np64(a[i]), np64(b[i]), thr=2) for i in range(8)]))
    cols = merge(
        "nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": 1.0}], nuslerp_flatten=False, nuslerp_row_wise=True
    )
    close(cols, np.stack([ref_slerp(0.5, np64(a[:, j]), np64(b[:, j]), thr=2) for j in range(32)], axis=1))


def test_nuslerp_with_base_slerps_task_vectors():
    base, a, b = rnd(16, 16), rnd(16, 16), rnd(16, 16)
    got = merge("nuslerp", base, [a, b], [{"weight": 1.0}, {"weight": 1.0}])
    close(got, np64(base) + ref_slerp(0.5, np64(a) - np64(base), np64(b) - np64(base)))


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_reference(with_base):
    xs = [rnd(24, 8) for _ in range(3)]
    base = rnd(24, 8) if with_base else None
    got = merge("multislerp", base, xs, [{"weight": w} for w in (0.5, 0.3, 0.2)])
    close(got, ref_multislerp([np64(x) for x in xs], [0.5, 0.3, 0.2], np64(base) if with_base else None))


def test_karcher_matches_converged_mean():
    xs = [rnd(40) for _ in range(4)]
    got = merge("karcher", None, xs, [{}] * 4, max_iter=200, tol=1e-9)
    close(got, sphere_mean([np64(x) for x in xs]), tol=1e-5)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(filter_wise):
    base = rnd(12, 20)
    ws = [base + rnd(12, 20, scale=0.1) + 0.05 for _ in range(3)]
    got = merge("model_stock", base, ws, [{}] * 3, filter_wise=filter_wise)
    close(got, ref_model_stock(np64(base), [np64(w) for w in ws], filter_wise))


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_matches_reference(topk):
    base = rnd(16, 16)
    xs = [base + rnd(16, 16, scale=s) for s in (0.1, 0.2, 0.05)]
    close(merge("sce", base, xs, [{}] * 3, select_topk=topk), ref_sce(np64(base), [np64(x) for x in xs], topk))


def test_nearswap_matches_reference():
    a = rnd(64, 8)
    b = a + rnd(64, 8, scale=0.01)
    close(merge("nearswap", a, [b], [{}], t=0.005), ref_nearswap(np64(a), np64(b), 0.005))


def test_arcee_fusion_matches_reference():
    a = rnd(32, 64)
    b = a + rnd(32, 64, scale=0.01) + rnd(32, 64, scale=0.2) * (torch.rand(32, 64, generator=G) < 0.1)
    want, imp, thr = ref_fusion(np64(a), np64(b))
    assert 0 < (imp >= thr).mean() < 0.5  # the test exercises both branches
    close(merge("arcee_fusion", a, [b], [{}]), want)


def test_passthrough_copies_or_scales():
    x = rnd(5, 5)
    assert torch.equal(merge("passthrough", None, [x], [{"scale": None}]), x)
    close(merge("passthrough", None, [x], [{"scale": 0.5}]), 0.5 * np64(x))


# ---------------------------------------------------------------------------- properties

vec = st.integers(min_value=2, max_value=64)


@settings(max_examples=40, deadline=None)
@given(n=vec, seed=st.integers(0, 2**31 - 1))
def test_slerp_endpoints_are_exact(n, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    assert torch.equal(merge("slerp", a, [b], [{}], t=0.0), a)
    assert torch.equal(merge("slerp", a, [b], [{}], t=1.0), b)


@settings(max_examples=40, deadline=None)
@given(n=vec, seed=st.integers(0, 2**31 - 1), t=st.floats(0, 1))
def test_slerp_keeps_the_norm_of_equal_norm_inputs(n, seed, t):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g).double(), torch.randn(n, generator=g).double()
    a, b = a / a.norm(), b / b.norm()
    assume(abs(float(a @ b)) <= 0.9995)  # nearly collinear inputs take the lerp (by design), which shortens
    out = merge("slerp", a, [b], [{}], t=t)
    assert abs(float(out.double().norm()) - 1) < 1e-5


@settings(max_examples=30, deadline=None)
@given(n=vec, seed=st.integers(0, 2**31 - 1))
def test_multislerp_of_two_equal_norm_models_is_the_slerp_midpoint(n, seed):
    # in general multislerp of two models is the normalized lerp, not slerp; they meet at the midpoint
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    b = b * (a.norm() / b.norm())
    got = merge("multislerp", None, [a, b], [{"weight": 1.0}, {"weight": 1.0}])
    close(got, ref_slerp(0.5, np64(a), np64(b), thr=2), tol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=vec, seed=st.integers(0, 2**31 - 1))
def test_karcher_of_one_model_is_that_model_and_of_two_is_the_midpoint(n, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    assert torch.equal(merge("karcher", None, [a], [{}]), a)
    b = b * (a.norm() / b.norm())
    got = merge("karcher", None, [a, b], [{}, {}], max_iter=100, tol=1e-7)
    close(got, ref_slerp(0.5, np64(a), np64(b), thr=2), tol=1e-4)


@settings(max_examples=30, deadline=None)
@given(n=vec, k=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_model_stock_of_identical_fine_tunes_returns_them(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    ft = base + torch.randn(n, generator=g) * 0.1
    got = merge("model_stock", base, [ft.clone() for _ in range(k)], [{}] * k)
    close(got, np64(ft), tol=1e-6)


@settings(max_examples=30, deadline=None)
@given(n=vec, seed=st.integers(0, 2**31 - 1), t=st.floats(1e-4, 1.0))
def test_nearswap_limits_and_bounds(n, seed, t):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    assert torch.equal(merge("nearswap", a, [b], [{}], t=0.0), a)
    assert torch.allclose(merge("nearswap", a, [b], [{}], t=1e9), b)
    out = merge("nearswap", a, [b], [{}], t=t)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    assert bool(((out >= lo - 1e-6) & (out <= hi + 1e-6)).all())
    moved = (out - a).abs() <= t + 1e-6 * (a.abs() + b.abs())  # at most t from the base (float32 rounding)
    assert bool(moved.all())


@settings(max_examples=30, deadline=None)
@given(r=st.integers(2, 8), c=st.integers(2, 32), seed=st.integers(0, 2**31 - 1))
def test_arcee_fusion_takes_each_element_from_one_model(r, c, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, c, generator=g), torch.randn(r, c, generator=g)
    out = merge("arcee_fusion", a, [b], [{}])
    assert bool(((out == a) | (out == b)).all())


@settings(max_examples=30, deadline=None)
@given(n=vec, seed=st.integers(0, 2**31 - 1))
def test_sce_of_one_model_is_that_model(n, seed):
    g = torch.Generator().manual_seed(seed)
    base, x = torch.randn(n, generator=g), torch.randn(n, generator=g)
    close(merge("sce", base, [x], [{}]), np64(x), tol=1e-6)


def test_methods_command_lists_every_method_with_its_parameters():
    from click.testing import CliRunner

    from mergesmith.cli import cli
    from mergesmith.methods import METHODS

    out = CliRunner().invoke(cli, ["methods"]).output
    blocks = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            name = line.split()[0]
            blocks[name] = [line]
        else:
            blocks[name].append(line)
    assert set(blocks) == set(METHODS)
    for name, m in METHODS.items():
        text = "\n".join(blocks[name])
        assert m.description in text
        for p in m.params:
            assert any(ln.split()[0] == p.name for ln in blocks[name][1:]), (name, p.name)
