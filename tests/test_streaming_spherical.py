"""slerp, nuslerp and multislerp on tensors merged in row blocks, their whole-tensor norms and dot products summed
in float64 over the blocks in a first pass: against float64 references written here from mergekit's formulas,
against the same tensor merged whole, and reading one block of rows at a time."""

import math

import numpy as np
import pytest
import torch

from helpers import through_executor, ref_multislerp
from mergesmith.methods import compiled
from mergesmith.methods import METHODS, Streaming

SHAPE = (64, 48)
BLOCK = 500  # elements: blocks of 10 rows, the last of 4


def run(name, base, xs, per, monkeypatch, block=BLOCK, **shared):
    """(merged tensor, its row blocks, the most rows read at once) through the executor."""
    out, blocks, reads = through_executor(name, base, xs, block, monkeypatch, shared, per)
    return out, blocks, max(xs[0].shape[0] if r is None else r[1] - r[0] for r in reads)


def blocked(name, base, xs, per, monkeypatch, **shared):
    """The merge in row blocks; checks that it was one, read a block at a time."""
    out, blocks, most = run(name, base, xs, per, monkeypatch, **shared)
    assert len(blocks) == 7 and most == 10
    return out


def models(n, seed, base=True, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(SHAPE, generator=g)
    return (b if base else None), [b + scale * torch.randn(SHAPE, generator=g) for _ in range(n)]


def np64(x):
    return x.double().numpy()


def close(got, want, tol=2e-6):
    """float32 result vs float64 reference, relative to the reference's scale."""
    err = np.abs(got.double().numpy() - want).max()
    assert err <= tol * max(1.0, float(np.abs(want).max())), err


# ---------------------------------------------------------------------------- float64 references (mergekit 0.1.5)


def ref_slerp(t, a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    d = float(np.clip(np.sum(a * b) / (na * nb), -1, 1))
    if abs(d) > 0.9995:
        return (1 - t) * a + t * b
    th = math.acos(d)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def ref_nuslerp_vectors(t, a, b):
    """Slerp of each row of a and b (norms clamped to >= 1e-7; lerp where 1 - cos^2 <= 1e-16)."""
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        u = a[i] / max(np.linalg.norm(a[i]), 1e-7)
        v = b[i] / max(np.linalg.norm(b[i]), 1e-7)
        c = float(np.clip(np.sum(u * v), -1, 1))
        if 1 - c * c <= 1e-16:
            out[i] = (1 - t) * a[i] + t * b[i]
        else:
            th = math.acos(c)
            out[i] = (math.sin((1 - t) * th) * a[i] + math.sin(t * th) * b[i]) / math.sin(th)
    return out


def ref_nuslerp(t, base, x0, x1, flatten, row_wise):
    a, b = (x0 - base, x1 - base) if base is not None else (x0, x1)
    if flatten:
        out = ref_nuslerp_vectors(t, a.reshape(1, -1), b.reshape(1, -1)).reshape(a.shape)
    elif row_wise:
        out = ref_nuslerp_vectors(t, a.T, b.T).T
    else:
        out = ref_nuslerp_vectors(t, a, b)
    return out + base if base is not None else out


# ---------------------------------------------------------------------------- blocked vs float64


@pytest.mark.parametrize("t", [0.3, 0.75])
def test_slerp_in_row_blocks_matches_float64(t, monkeypatch):
    base, (x,) = models(1, 1, scale=1.0)
    close(blocked("slerp", base, [x], [{}], monkeypatch, t=t), ref_slerp(t, np64(base), np64(x)))


def test_slerp_in_row_blocks_nearly_collinear_is_the_lerp(monkeypatch):
    base, (x,) = models(1, 2, scale=1e-3)
    got = blocked("slerp", base, [x], [{}], monkeypatch, t=0.4)
    close(got, 0.6 * np64(base) + 0.4 * np64(x))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, True), (False, False)])
def test_nuslerp_in_row_blocks_matches_float64(with_base, flatten, row_wise, monkeypatch):
    base, xs = models(2, 3, scale=0.5)
    base = base if with_base else None
    per = [{"weight": 0.3}, {"weight": 0.1}]
    got = blocked("nuslerp", base, xs, per, monkeypatch, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    want = ref_nuslerp(0.25, np64(base) if with_base else None, np64(xs[0]), np64(xs[1]), flatten, row_wise)
    close(got, want)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_in_row_blocks_matches_float64(with_base, normalize, monkeypatch):
    base, xs = models(3, 4)
    base = base if with_base else None
    ws = [0.3, 0.1, 0.4]
    got = blocked("multislerp", base, xs, [{"weight": w} for w in ws], monkeypatch, normalize_weights=normalize)
    close(got, ref_multislerp([np64(x) for x in xs], ws, np64(base) if with_base else None, normalize))


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_from_bfloat16_as_stored_is_the_merge_of_their_float32_values(with_base, monkeypatch):
    """The blocks' bfloat16 inputs are taken as stored (their deltas widened in the pass that takes them): the
    bytes of the same merge of float32 copies of those values."""
    base, xs = models(3, 8)
    base, xs = (base.bfloat16() if with_base else None), [x.bfloat16() for x in xs]
    per = [{"weight": w} for w in (0.3, 0.1, 0.4)]
    took, delta = [], compiled.delta
    monkeypatch.setattr(compiled, "delta", lambda x, b: took.append(x.dtype) or delta(x, b))
    stored = blocked("multislerp", base, xs, per, monkeypatch)
    assert set(took) == ({torch.bfloat16} if with_base else set())
    widened = blocked("multislerp", base.float() if with_base else None, [x.float() for x in xs], per, monkeypatch)
    assert torch.equal(stored.view(torch.int32), widened.view(torch.int32))


def signs(seed):
    """Elements +-1 and +-0.5: their products with any float32 factor are exact, so a weighted sum of opposite
    unit tensors is exactly zero."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.where(torch.rand(SHAPE, generator=g) < 0.5, 1.0, 0.5)
    return torch.where(torch.rand(SHAPE, generator=g) < 0.5, mag, -mag)


def test_multislerp_in_row_blocks_of_opposite_models_is_the_lerp(monkeypatch):
    x = signs(5)
    got = blocked("multislerp", None, [x, -x], [{"weight": 2.0}, {"weight": 2.0}], monkeypatch)
    assert torch.equal(got, torch.zeros(SHAPE))  # mergekit's fallback: 0.5 x + 0.5 (-x)


def test_multislerp_in_row_blocks_refuses_balanced_opposites_as_whole(monkeypatch):
    x = signs(6)
    per = [{"weight": 1.0}, {"weight": 1.0}, {"weight": 2.0}]
    for block in (BLOCK, 1 << 22):
        with pytest.raises(ValueError, match="weighted sum of the unit tensors is zero"):
            run("multislerp", None, [x, x, -x], per, monkeypatch, block=block)


def test_multislerp_in_row_blocks_of_one_model_is_that_model(monkeypatch):
    _, (x,) = models(1, 7, base=False)
    assert torch.equal(blocked("multislerp", None, [x], [{"weight": 0.5}], monkeypatch), x)


# ---------------------------------------------------------------------------- blocked vs whole


CASES = [
    ("slerp", 1, True, [{}], {"t": 0.4}),
    ("nuslerp", 2, False, [{"weight": 0.3}, {"weight": 0.1}], {}),
    ("nuslerp", 2, True, [{"weight": 0.3}, {"weight": 0.1}], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 3, False, [{"weight": w} for w in (0.3, 0.1, 0.4)], {}),
    ("multislerp", 3, True, [{"weight": w} for w in (0.3, 0.1, 0.4)], {}),
]


@pytest.mark.parametrize("name,n,with_base,per,shared", CASES)
def test_row_blocks_differ_from_the_whole_tensor_by_summation_order_only(name, n, with_base, per, shared, monkeypatch):
    """The float64 sums are added in another order, so a coefficient may move by an ulp of float64; once rounded
    to float32 an element moves by at most one float32 ulp, and almost never."""
    for seed in range(5):
        base, xs = models(n, 10 + seed, base=with_base, scale=0.5)
        whole, one, _ = run(name, base, xs, per, monkeypatch, block=1 << 22, **shared)
        parts = blocked(name, base, xs, per, monkeypatch, **shared)
        assert len(one) == 1
        ulp = torch.finfo(torch.float32).eps * whole.abs().clamp(min=torch.finfo(torch.float32).tiny)
        assert ((parts - whole).abs() <= ulp).all()
        assert (parts != whole).sum() <= whole.numel() // 100


def test_nuslerp_row_vectors_take_row_blocks_with_the_same_bytes(monkeypatch):
    assert METHODS["nuslerp"].streaming_for({"nuslerp_flatten": False, "nuslerp_row_wise": False}) is Streaming.ROWS
    base, xs = models(2, 20, scale=0.5)
    per = [{"weight": 0.3}, {"weight": 0.1}]
    for b in (None, base):
        whole, _, _ = run("nuslerp", b, xs, per, monkeypatch, block=1 << 22, nuslerp_flatten=False)
        assert torch.equal(blocked("nuslerp", b, xs, per, monkeypatch, nuslerp_flatten=False), whole)


def test_nuslerp_row_sums_do_not_depend_on_the_rows_beside_them():
    """A row's float64 norms and dot product are the same alone (a block of one row) as among the others."""
    from mergesmith.methods.nuslerp import slerp_vectors

    _, (x0, x1) = models(2, 21, scale=0.5)
    x0, x1 = x0.repeat(1, 100), x1.repeat(1, 100)  # rows of 4800: float64 sums that depend on their order
    rows = torch.cat([slerp_vectors(0.3, x0[r : r + 1], x1[r : r + 1], flatten=False) for r in range(x0.shape[0])])
    assert torch.equal(rows, slerp_vectors(0.3, x0, x1, flatten=False))
    from mergesmith.methods import nuslerp as nu

    alone = [nu._sums(None, [x0[r : r + 1], x1[r : r + 1]], nuslerp_flatten=False) for r in range(x0.shape[0])]
    together = nu._sums(None, [x0, x1], nuslerp_flatten=False)
    for k in range(3):
        assert torch.equal(torch.cat([a[k] for a in alone]), together[k])
