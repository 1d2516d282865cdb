"""model_stock and karcher on tensors in row blocks (BLOCK_ELEMENTS patched small), against float64 references
written here: model_stock's t from the offsets' cosines over the whole tensor, karcher's fixed-point steps (and stop
rule) on whole float64 vectors."""

import math

import numpy as np
import pytest
import torch

from helpers import through_executor
import mergesmith.execute as execute_module
import mergesmith.methods.karcher as karcher_module
from mergesmith.methods import METHODS
from mergesmith.methods import compiled
from mergesmith.methods.spherical import gram64

BLOCK = 1000  # elements per block in these tests: shapes below take 5 to 20 blocks


def blocks_of(name, base, xs, block_elements, monkeypatch, **shared):
    """The tensor as the executor computes it (row blocks when it is over block_elements), and its blocks."""
    out, blocks, _ = through_executor(name, base, xs, block_elements, monkeypatch, shared)
    return out, blocks


def whole_and_blocks(name, base, xs, monkeypatch, **shared):
    """The tensor merged whole, and in blocks of BLOCK elements."""
    whole, one = blocks_of(name, base, xs, 1 << 22, monkeypatch, **shared)
    parts, blocks = blocks_of(name, base, xs, BLOCK, monkeypatch, **shared)
    assert len(one) == 1 and len(blocks) >= 5
    return whole, parts


def family(seed, n, shape=(300, 41), spread=0.1, shift=0.0):
    """A base and n models around it (noise of scale `spread`, model k shifted by k * shift)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + spread * torch.randn(*shape, generator=g) + shift * k for k in range(n)]


def assert_near(got, want, rel):
    """float32 result vs float64 reference, relative to the reference's largest magnitude."""
    err = np.abs(got.double().numpy() - want).max()
    assert err <= rel * max(1.0, float(np.abs(want).max())), err


# ---------------------------------------------------------------------------- references (float64, numpy)


def ref_model_stock(base, ws):
    """mergekit's formula over the whole tensor: t = N c / (1 + (N-1) c), c the mean pairwise cosine of the
    offsets (norm products clamped to >= 1e-6, cosines to [-1, 1]); t = 0 where the denominator is ~0."""
    b = base.double().numpy()
    ds = [w.double().numpy().ravel() - b.ravel() for w in ws]
    n = len(ds)
    cos = [
        np.clip(ds[i] @ ds[j] / max(np.linalg.norm(ds[i]) * np.linalg.norm(ds[j]), 1e-6), -1, 1)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    c = float(np.mean(cos))
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    return t * sum(w.double().numpy() for w in ws) / n + (1 - t) * b


def ref_karcher(xs, max_iter, tol, floor=1e-6, stall=20):
    """The kernel's steps on whole float64 vectors: (result, tangents computed, how it stopped)."""
    vs = [x.double().numpy().ravel() for x in xs]
    n = len(vs)
    norms = [float(np.linalg.norm(v)) for v in vs]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros(xs[0].shape), 0, "zero"
    a = [1 / len(valid)] * len(valid)
    us = [vs[i] / norms[i] for i in valid]
    m = sum(w * u for w, u in zip(a, us))
    m = us[0].copy() if np.linalg.norm(m) < tol else m / np.linalg.norm(m)
    stop, best, since, steps, how = max(tol, floor), math.inf, 0, 0, "max_iter"
    for _ in range(max_iter):
        tangent = np.zeros_like(m)
        for w, u in zip(a, us):
            d = float(np.clip(m @ u, -1, 1))
            theta = math.acos(d)
            if theta >= tol:
                tangent += w * theta / math.sin(theta) * (u - d * m)
        steps += 1
        tn = float(np.linalg.norm(tangent))
        if tn < stop:
            how = "converged"
            break
        best, since = (tn, 0) if tn < best else (best, since + 1)
        if since >= stall:
            how = "stall"
            break
        m = math.cos(tn) * m + math.sin(tn) * tangent / tn
        m = m / np.linalg.norm(m) if np.linalg.norm(m) > tol else m
    return (m * sum(norms) / n).reshape(xs[0].shape), steps, how


# ---------------------------------------------------------------------------- gram64


@pytest.mark.parametrize("use_compiled", [True, False])
def test_gram64_is_the_float64_gram_matrix_on_any_thread_count(monkeypatch, use_compiled):
    """Compiled (chunk sums in fixed lanes) or torch's: float64 products, the same on one or two threads."""
    if not use_compiled:
        monkeypatch.setattr(compiled, "_LIB", None)
    elif not compiled.available():
        pytest.skip("the C extension was not built")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(517, 389, generator=g) for _ in range(3)]  # 201113 elements: chunks and a tail
    xs[1][0, :7] = torch.tensor([1e30, -1e30, 3.0, 1e-30, 0.0, -0.0, 7.0])  # float64 products beyond float32's range
    want = np.stack([x.double().numpy().ravel() for x in xs])
    want = want @ want.T
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gram64(xs)
        torch.set_num_threads(2)
        two = gram64(xs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and one.dtype == torch.float64
    np.testing.assert_allclose(one.numpy(), want, rtol=1e-13)


@pytest.mark.parametrize("use_compiled", [True, False])
def test_gram64_of_differences_takes_them_in_float32(monkeypatch, use_compiled):
    """With a base: the Gram matrix of the float32 differences x_i - base (rounded to float32 before the float64
    products, as a subtraction in torch would), chunks and tail alike."""
    if not use_compiled:
        monkeypatch.setattr(compiled, "_LIB", None)
    elif not compiled.available():
        pytest.skip("the C extension was not built")
    g = torch.Generator().manual_seed(4)
    base = torch.randn(301, 97, generator=g) * 3
    xs = [torch.randn(301, 97, generator=g) * 0.5 for _ in range(3)]  # differences that round in float32
    d = np.stack([(x.numpy() - base.numpy()).astype(np.float64).ravel() for x in xs])
    want = np.array([[math.fsum(d[i] * d[j]) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(gram64(xs, base=base).numpy(), want, rtol=1e-14)
    assert not np.allclose(gram64(xs).numpy(), want, rtol=1e-3)


@pytest.mark.parametrize("with_base", [True, False])
def test_gram64_of_bfloat16_as_stored_is_the_float64_gram_of_their_values(monkeypatch, with_base):
    """bfloat16 tensors (as the blocks are stored) give the Gram matrix of their values (differences rounded to
    float32 where a base is given), chunks and tail alike, without widening them first."""
    if not compiled.available():
        pytest.skip("the C extension was not built")
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(301, 97, generator=g) * 3).bfloat16()
    xs = [(base.float() + torch.randn(301, 97, generator=g)).bfloat16() for _ in range(3)]
    b = base.float().numpy() if with_base else 0
    d = np.stack([(x.float().numpy() - b).astype(np.float64).ravel() for x in xs])
    want = np.array([[math.fsum(d[i] * d[j]) for j in range(3)] for i in range(3)])
    widened = []
    monkeypatch.setattr(torch.Tensor, "float", lambda t: widened.append(t) or t.to(torch.float32))
    got = gram64(xs, base=base if with_base else None)
    assert not widened
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14)


# ---------------------------------------------------------------------------- model_stock


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed,n,shift", [(0, 2, 0.0), (1, 3, 0.03), (2, 4, 0.01), (3, 3, -0.02)])
def test_model_stock_in_blocks_is_the_whole_tensor_formula(seed, n, shift, dtype, monkeypatch):
    """One t for the whole tensor (from the blocks' Gram matrices): the reference's t, so the same output as the
    whole tensor up to float64 summation order in t (which does not change its float32 rounding here). bfloat16
    blocks are taken as stored by both passes."""
    base, ws = family(seed, n, shift=shift)
    base, ws = base.to(dtype), [w.to(dtype) for w in ws]
    whole, parts = whole_and_blocks("model_stock", base, ws, monkeypatch)
    ref = ref_model_stock(base, ws)
    assert_near(parts, ref, 2e-7)
    assert_near(whole, ref, 2e-7)
    assert torch.equal(whole, parts)


def test_model_stock_blocks_that_differ_still_get_one_ratio(monkeypatch):
    """The fine-tunes agree on the first rows and oppose each other on the last: a t per block would differ."""
    base, ws = family(4, 3, shape=(200, 30))
    ws[1][100:] = 2 * base[100:] - ws[0][100:]
    whole, parts = whole_and_blocks("model_stock", base, ws, monkeypatch)
    assert_near(parts, ref_model_stock(base, ws), 2e-7)
    assert torch.equal(whole, parts)


def test_model_stock_singular_denominator_in_blocks_keeps_the_base(monkeypatch):
    """Two fine-tunes with opposite offsets: cos = -1, 1 + (N-1) cos = 0, t = 0: the base, exactly."""
    base, (a,) = family(5, 1)
    b = 2 * base - a
    _, parts = whole_and_blocks("model_stock", base, [a, b], monkeypatch)
    assert torch.equal(parts, base)


def test_model_stock_of_identical_fine_tunes_in_blocks_returns_them(monkeypatch):
    base, (ft,) = family(6, 1)
    _, parts = whole_and_blocks("model_stock", base, [ft.clone() for _ in range(3)], monkeypatch)
    assert_near(parts, ft.double().numpy(), 1e-6)


def test_model_stock_filter_wise_goes_by_rows_with_the_whole_tensors_bytes(monkeypatch):
    base, ws = family(7, 3, shift=0.02)
    assert METHODS["model_stock"].streaming_for({"filter_wise": True}).value == "rows"
    whole, parts = whole_and_blocks("model_stock", base, ws, monkeypatch, filter_wise=True)
    assert torch.equal(whole, parts)
    ref = np.stack([ref_model_stock(base[i], [w[i] for w in ws]) for i in range(base.shape[0])])
    assert_near(parts, ref, 2e-7)


# ---------------------------------------------------------------------------- karcher


class Steps:
    """Counts the tangents karcher computes (one per step, and one more that meets the stop rule)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = karcher_module._tangent

        def counting(*args, **kw):
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(karcher_module, "_tangent", counting)


KARCHER_CASES = [
    # seed, models, spread, max_iter, tol
    (0, 3, 1.0, 1, 1e-5),
    (1, 4, 3.0, 3, 1e-5),
    (2, 2, 5.0, 10, 1e-5),
    (3, 5, 3.0, 1000, 1e-6),
    (4, 3, 0.05, 1000, 1e-9),
    (5, 4, 3.0, 100, 1e-3),
    (6, 3, 10.0, 1000, 1e-6),
]


@pytest.mark.parametrize("seed,n,spread,max_iter,tol", KARCHER_CASES)
def test_karcher_in_blocks_takes_the_float64_references_steps(seed, n, spread, max_iter, tol, monkeypatch):
    """The mean as coefficients of the inputs, iterated on their Gram matrix: the reference's number of steps
    and result (to float32 rounding); the whole tensor's float32 iterate differs from it by float32 rounding."""
    _, xs = family(seed, n, spread=spread)
    want, steps, how = ref_karcher(xs, max_iter, tol)
    counter = Steps(monkeypatch)
    parts, blocks = blocks_of("karcher", None, xs, BLOCK, monkeypatch, max_iter=max_iter, tol=tol)
    assert len(blocks) >= 5 and counter.calls == steps, how
    assert_near(parts, want, 2e-7)
    whole, _ = blocks_of("karcher", None, xs, 1 << 22, monkeypatch, max_iter=max_iter, tol=tol)
    assert_near(whole, want, 1e-6 if how == "converged" else 3e-7)


@pytest.mark.parametrize(
    "max_iter,tol,note",
    [
        (2, 1e-5, "karcher: not converged in max_iter 2 iterations"),
        (1000, 1e-9, "karcher: tol 1e-09 is below what float32 iterations reach"),
    ],
)
def test_karcher_in_blocks_reports_once_per_tensor(max_iter, tol, note, monkeypatch):
    warnings = []
    monkeypatch.setattr(execute_module, "warn", warnings.append)
    _, xs = family(8, 3, spread=1.0)
    blocks_of("karcher", None, xs, BLOCK, monkeypatch, max_iter=max_iter, tol=tol)
    assert len(warnings) == 1 and warnings[0].startswith(f"tensor t: {note}"), warnings


def test_karcher_in_blocks_stops_when_the_tangent_norm_stops_falling(monkeypatch):
    """Without the floor, float64 steps too reach a tangent norm below which rounding moves them about: the
    iteration stops after STALL steps without a new low, not after max_iter."""
    monkeypatch.setattr(karcher_module, "TOL_FLOOR", 1e-30)
    warnings = []
    monkeypatch.setattr(execute_module, "warn", warnings.append)
    counter = Steps(monkeypatch)
    _, xs = family(11, 3, spread=3.0)
    blocks_of("karcher", None, xs, BLOCK, monkeypatch, max_iter=100000, tol=1e-20)
    assert counter.calls <= 200
    assert any("stopped falling above tol 1e-20" in w for w in warnings), warnings


def test_karcher_in_blocks_leaves_out_zero_tensors_and_keeps_the_mean_norm(monkeypatch):
    """A zero tensor takes no part in the directions but counts in the mean norm (weights 1/N over all)."""
    _, xs = family(9, 3, spread=1.0)
    xs.append(torch.zeros_like(xs[0]))
    want, _, _ = ref_karcher(xs, 100, 1e-6)
    _, parts = whole_and_blocks("karcher", None, xs, monkeypatch, max_iter=100, tol=1e-6)
    assert_near(parts, want, 2e-7)
    zeros = [torch.zeros(300, 41) for _ in range(3)]
    assert torch.equal(whole_and_blocks("karcher", None, zeros, monkeypatch)[1], zeros[0])


def test_karcher_in_blocks_is_the_same_on_any_thread_count(monkeypatch):
    """Blocks large enough for torch to share a sum between threads (60000 elements)."""
    _, xs = family(10, 3, spread=1.0, shape=(600, 300))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, blocks = blocks_of("karcher", None, xs, 60000, monkeypatch, max_iter=50, tol=1e-6)
        torch.set_num_threads(2)
        two, _ = blocks_of("karcher", None, xs, 60000, monkeypatch, max_iter=50, tol=1e-6)
    finally:
        torch.set_num_threads(before)
    assert len(blocks) == 3 and torch.equal(one, two)
