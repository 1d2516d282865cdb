"""sce and arcee_fusion in row blocks: their whole-tensor selections (sce's variance top-k, arcee_fusion's quartile
threshold) and sce's energy weights come from pass 1, so a tensor merged in blocks equals a float64 reference of
the whole-tensor formula written here, and the tensor merged whole; ties across blocks go to the lower index."""

import numpy as np
import pytest
import torch

from helpers import through_executor

BLOCK = 1000  # BLOCK_ELEMENTS in the tests: tensors of a few thousand elements go in several blocks


def executed(name, base, xs, block_elements, monkeypatch, **shared):
    """One tensor through the executor: (output, row blocks, rows of every read)."""
    return through_executor(name, base, xs, block_elements, monkeypatch, shared)


def blocked_and_whole(name, base, xs, monkeypatch, **shared):
    """The tensor merged in blocks of about BLOCK elements (every read a block) and merged whole."""
    parts, blocks, reads = executed(name, base, xs, BLOCK, monkeypatch, **shared)
    rows = BLOCK // base[0].numel()
    assert len(blocks) > 3 and all(r is not None and r[1] - r[0] <= rows for r in reads)
    whole, one, _ = executed(name, base, xs, 1 << 22, monkeypatch, **shared)
    assert len(one) == 1
    return parts, whole


# ---------------------------------------------------------------- float64 references


def ref_sce(base, xs, topk, var_key=None):
    """mergekit's sce in float64: keep the int(nonzero * topk) elements of largest variance (ties to the lower
    index; `var_key` orders like the variance where that must be exact), weight by energy, elect signs by sum."""
    b = base.double().numpy()
    ds = np.stack([x.double().numpy() - b for x in xs])
    if topk < 1:
        key = (var_key if var_key is not None else ds.var(axis=0)).ravel()
        k = int(np.count_nonzero(key) * topk)
        mask = np.zeros(key.size)
        mask[np.argsort(-key, kind="stable")[:k]] = 1
        ds = ds * mask.reshape(b.shape)
    e = (ds**2).reshape(len(xs), -1).mean(axis=1)
    w = np.full(len(xs), 1 / len(xs)) if e.sum() < 1e-6 else e / e.sum()
    elected = np.where(ds.sum(axis=0) >= 0, 1.0, -1.0)
    ew = w.reshape((-1,) + (1,) * b.ndim) * (np.sign(ds) == elected)
    return b + (ds * ew).sum(axis=0) / np.maximum(ew.sum(axis=0), 1e-6)


def ref_fusion(a, b):
    """mergekit's arcee_fusion in float64 with exact quartiles: (merged, importance, threshold)."""
    a, b = a.double().numpy(), b.double().numpy()

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    imp = np.abs(b - a) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    s = np.sort(imp.ravel())
    q1, med, q3 = (s[int(f * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    thr = med + 1.5 * (q3 - q1)
    return np.where(imp >= thr, b, a), imp, thr


def assert_close(got, want, tol=2e-6):
    got = got.double().numpy()
    assert np.abs(got - want).max() <= tol * max(1.0, float(np.abs(want).max())), np.abs(got - want).max()


# ---------------------------------------------------------------- sce


def tied_family(seed, shape=(120, 50)):
    """Base and 3 models whose deltas are drawn from a few triples of small dyadic numbers (exact in float32):
    variances tie exactly between elements with the same triple, all over the tensor; distinct triples have
    distinct variances. Also returns N^2 var as an exact key (N sum d^2 - (sum d)^2)."""
    g = np.random.default_rng(seed)
    triples = np.array([[0, 0, 0], [1, 1, 1], [3, 0, 0], [0, 2, -2], [1, 2, 3], [-4, 1, 1], [5, -1, 0], [2, 2, -4]])
    key = 3 * (triples**2).sum(1) - triples.sum(1) ** 2
    assert len(set(key[1:])) == len(key) - 1 and key[0] == key[1] == 0  # zero variance only for equal deltas
    pick = g.choice(len(triples), size=shape, p=[0.1, 0.1, 0.2, 0.15, 0.1, 0.15, 0.1, 0.1])
    base = torch.from_numpy(g.integers(-8, 9, size=shape) / 16).float()
    xs = [base + torch.from_numpy(triples[pick, i] / 64).float() for i in range(3)]
    return base, xs, key[pick]


@pytest.mark.parametrize("topk", [0.3, 0.5, 0.77])
@pytest.mark.parametrize("seed", [0, 1])
def test_sce_variance_ties_across_blocks_go_to_the_lower_index(topk, seed, monkeypatch):
    base, xs, key = tied_family(seed)
    parts, whole = blocked_and_whole("sce", base, xs, monkeypatch, select_topk=topk)
    # the cut falls inside a group of tied variances spread over several blocks: some members kept, some not
    k = int(np.count_nonzero(key) * topk)
    boundary = np.sort(key.ravel())[::-1][k - 1]
    group = np.flatnonzero(key.ravel() == boundary)
    kept = int((key.ravel() > boundary).sum())
    assert 0 < k - kept < len(group) and len(set(group // base.shape[1] // (BLOCK // base.shape[1]))) > 2
    assert torch.equal(parts, whole)
    assert_close(parts, ref_sce(base, xs, topk, var_key=key.astype(np.float64)))


def float_family(seed, n, shape=(96, 64)):
    """Base and n models of float32 noise of different scales; model 0 changes only the later rows (its energy
    lies in the last blocks)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + torch.randn(shape, generator=g) * (0.01 * (i + 1)) for i in range(n)]
    xs[0][: shape[0] // 2] = base[: shape[0] // 2]
    return base, xs


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_sce_in_blocks_matches_the_float64_reference(topk, n, monkeypatch):
    base, xs = float_family(n, n)
    parts, whole = blocked_and_whole("sce", base, xs, monkeypatch, select_topk=topk)
    ds = np.stack([x.double().numpy() - base.double().numpy() for x in xs])
    var = np.sort(ds.var(axis=0).ravel())[::-1]
    k = int(np.count_nonzero(var) * topk)
    if 0 < k < var.size:  # no variances so close at the cut that float32 rounding could swap them
        assert var[k - 1] - var[k] > 1e-4 * var[k - 1]
    assert_close(parts, ref_sce(base, xs, topk))
    # the weights come from float64 sums added block by block: they may differ from the whole tensor's sums in
    # the last bits, which float32 weights almost never show
    assert torch.equal(parts, whole)


def test_sce_weights_are_the_whole_tensors(monkeypatch):
    """One model's deltas are large in the first rows only, another's everywhere small: per-block energies would
    give the blocks different weights; the whole tensor's give every block the same."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(100, 40, generator=g)
    big = base + torch.randn(100, 40, generator=g) * 0.5
    big[25:] = base[25:] + torch.randn(75, 40, generator=g) * 1e-3
    small = base + torch.randn(100, 40, generator=g) * 0.05
    parts, whole = blocked_and_whole("sce", base, [big, small], monkeypatch, select_topk=0.6)
    assert_close(parts, ref_sce(base, [big, small], 0.6))
    assert torch.equal(parts, whole)


@pytest.mark.parametrize("use_compiled", [True, False])
def test_variances_equal_torch_var_bit_for_bit(monkeypatch, use_compiled):
    """sce's variances: the values of torch.var(dim=0, unbiased=False) (what mergekit's mask ranks), chunked, by
    the compiled kernel and by the torch ops that run where it is not built."""
    from mergesmith.methods import compiled
    from mergesmith.methods.sce import VAR_CHUNK, variances

    if use_compiled and not compiled.available():
        pytest.skip("the C extension was not built")
    if not use_compiled:
        monkeypatch.setattr(compiled, "_LIB", None)

    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 3, 5, 8):
        for scale in (1.0, 1e-3, 1e5, 1e-30):
            d = torch.randn(n, VAR_CHUNK * 2 + 77, generator=g) * scale
            d[:, :500] = torch.randint(-3, 4, (n, 500), generator=g).float()  # ties and zero variances
            d[:, 500:600] = -0.0
            d[0, 600:700] = -0.0
            want = d.var(dim=0, unbiased=False)
            assert torch.equal(variances(d).view(torch.int32), want.view(torch.int32)), (n, scale)
    d = torch.randn(3, 7, 5, 11, generator=g)
    assert torch.equal(variances(d), d.var(dim=0, unbiased=False))


# ---------------------------------------------------------------- arcee_fusion


def fusion_pair(seed, shape=(200, 40)):
    """Base and other: small changes everywhere, larger ones on 10% of elements, and rows left unchanged (their
    importance is exactly 0: ties at the first quartile)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    b = (
        a
        + torch.randn(shape, generator=g) * 0.01
        + torch.randn(shape, generator=g) * 0.3 * (torch.rand(shape, generator=g) < 0.1)
    )
    b[::3] = a[::3]
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arcee_fusion_in_blocks_matches_the_float64_reference(seed, monkeypatch):
    a, b = fusion_pair(seed)
    parts, whole = blocked_and_whole("arcee_fusion", a, [b], monkeypatch)
    want, imp, thr = ref_fusion(a, b)
    assert 0.01 < (imp >= thr).mean() < 0.5  # both branches taken
    assert torch.equal(parts, whole)
    # each element exactly one model's, as the reference says, except where float32 rounding of the importance
    # (KL sums of p log(p/q) with p close to q) can decide: within 0.1% of the threshold
    clear = np.abs(imp - thr) > 1e-3 * thr
    assert clear.mean() > 0.99
    assert torch.equal(parts[torch.from_numpy(clear)], torch.from_numpy(want[clear]).float())


def test_radix_ranks_equal_a_sort_over_blocks():
    """RadixRanks on blocks of a float32 array of any sign (ties, -0.0, infinities, NaN) gives the values that
    np.sort puts at the ranks (NaN last)."""
    from mergesmith.methods.sparsify import RadixRanks

    g = np.random.default_rng(4)
    a = np.concatenate(
        [
            g.standard_normal(3000).astype(np.float32) * np.float32(1e-3),
            np.repeat(np.float32([0.5, -0.25, 0.0, -0.0, 1e-42, -1e-42]), 200),
            np.float32([np.inf, -np.inf, np.nan, -np.nan, 7.0, -7.0]),
        ]
    )
    g.shuffle(a)
    blocks = np.array_split(a, 7)
    ks = [0, 1, 100, 1499, 2000, 2200, 2299, 3000, 4000, a.size - 3, a.size - 1]
    high = sum(RadixRanks.high_counts(RadixRanks.keys(x)).astype(np.int64) for x in blocks)
    r = RadixRanks(high, ks)
    for x in blocks:
        r.add_low(r.low_counts(RadixRanks.keys(x)))
    s = np.sort(a)
    for k, v in zip(ks, r.values()):
        assert (v == s[k]) or (np.isnan(v) and np.isnan(s[k])), (k, v, s[k])


@pytest.mark.parametrize("name,shared", [("sce", {"select_topk": 0.5}), ("sce", {}), ("arcee_fusion", {})])
def test_device_paths_give_the_cpu_bytes(name, shared, monkeypatch):
    """With the numpy fast paths off (what `--device cuda` runs: torch.sort for the quartiles, kthvalue for the
    whole-tensor cut, torch float64 sums of squares), blocks and whole tensors give the numpy paths' bytes."""
    from mergesmith.methods import sparsify

    base, xs = float_family(7, 3) if name == "sce" else fusion_pair(7)
    xs = xs if name == "sce" else [xs]
    want = blocked_and_whole(name, base, xs, monkeypatch, **shared)
    calls = []

    def off(t):
        calls.append(t.shape)
        return False

    monkeypatch.setattr(sparsify, "numpy_path", off)
    got = blocked_and_whole(name, base, xs, monkeypatch, **shared)
    assert calls and all(torch.equal(g, w) for g, w in zip(got, want))


def test_arcee_fusion_keeps_the_blocks_divergences_in_one_buffer():
    """Pass 1 keeps every block's row divergences (reused by round 2 and the merge) in one buffer, not one small
    tensor a block: each block gets back its own values and shape, all views of the one buffer."""
    from mergesmith.methods.arcee_fusion import Fusion

    g = torch.Generator().manual_seed(0)
    stat, parts, row = Fusion(), {}, 0
    for rows in (3, 5, 1, 8, 2, 13):
        kl = torch.rand(rows, 1, generator=g)
        stat.keep(row, kl)
        parts[row], row = kl, row + rows
    buffer = stat.kl.untyped_storage().data_ptr()
    for first, kl in parts.items():
        got = stat.of(first)
        assert torch.equal(got, kl) and got.untyped_storage().data_ptr() == buffer
