"""The compiled kernels against independent references: the DARE/DELLA keep masks against a ranked reference
(np.lexsort ranks, uniforms of the stream) and the numpy path they replace, on rows full of ties, zeros and equal
values, rows of every length, and keep-probability tables with long runs of equal steps; their L1 sums against
float64 sums; the radix counts against np.bincount and np.unique."""

import numpy as np
import pytest
import torch

from helpers import ref_della_mask
from mergesmith.methods import compiled
from mergesmith.methods.rng import stream_key, uniform_like
from mergesmith.methods.sparsify import keep_mask, l1_sums

pytestmark = pytest.mark.skipif(not compiled.available(), reason="the C extension was not built")


def deltas(rows, cols, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    ft = (base.float() + torch.randn(rows, cols, generator=g) * 0.0005).to(torch.bfloat16)
    d = ft.float() - base.float()  # bf16 differences: many ties and zeros
    if kind == "zeros":
        d[:, ::2] = 0
    elif kind == "equal":
        d[:] = -0.25
    elif kind == "levels":
        d = torch.round(d * 1e4) / 1e4  # a few hundred values: big histogram buckets
    elif kind == "spread":
        d = d * torch.exp2(torch.randint(-60, 60, (rows, cols), generator=g).float())  # 120 binades
    elif kind == "cluster":  # one bucket of a thousand values between a huge and a tiny one: ranked after a sort
        d = 1 + torch.randint(0, 1000, (rows, cols), generator=g).float() * 2**-20
        d[:, 0], d[:, -1] = 1e30, 1e-30
    return d


def fast_mask(d, method, density, key, epsilon=0.15, row_offset=0):
    mask, _ = keep_mask(d, method, density, key, epsilon, row_offset=row_offset, need_p=False)
    return mask.numpy()


KINDS = ["bf16", "zeros", "equal", "levels", "spread", "cluster"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(7, 333), (3, 1), (2, 2), (1, 6000), (70, 129)])
@pytest.mark.parametrize("density,epsilon", [(0.4, 0.05), (0.25, 0.2), (0.5, 0.5), (0.6, 1e-6), (0.3, 0.0)])
def test_della_kernel_matches_a_ranked_reference(kind, shape, density, epsilon):
    d = deltas(*shape, kind)
    key = stream_key(7, "model", "tensor")
    u = uniform_like(key, d.shape, row_offset=11).numpy()
    want = ref_della_mask(d.numpy(), u, density, epsilon)
    assert np.array_equal(fast_mask(d, "della_magprune", density, key, epsilon, row_offset=11), want)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.7, 0.95, 1 / 3])
def test_dare_kernel_keeps_draws_below_the_density(density):
    d = deltas(65, 300, "bf16")
    key = stream_key(-3, "m", "t")
    u = uniform_like(key, d.shape, row_offset=4).numpy()
    assert np.array_equal(fast_mask(d, "random", density, key, row_offset=4), u < np.float32(density))


@pytest.mark.parametrize("method", ["random", "della_magprune"])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_equals_the_numpy_path_with_sums(monkeypatch, method, kind):
    """Same masks as the path without the extension, and (sum |delta|, sum |kept|) within float64 rounding of
    float64 sums of the same elements."""
    d = deltas(130, 257, kind, seed=1)  # 130 rows: split over the row pool
    key = stream_key(1, "m", "t")
    (before, after), mask = l1_sums(d, method, 0.35, key, epsilon=0.1, row_offset=9)
    monkeypatch.setattr(compiled, "_LIB", None)
    (b0, a0), mask0 = l1_sums(d, method, 0.35, key, epsilon=0.1, row_offset=9)
    assert torch.equal(mask, mask0)
    a = d.double().abs()
    assert before == pytest.approx(float(a.sum()), rel=1e-12)
    assert after == pytest.approx(float(a[mask].sum()), rel=1e-12)
    assert (before, after) == pytest.approx((b0, a0), rel=1e-12)


def test_kernel_sums_do_not_depend_on_the_thread_count():
    d = deltas(256, 100, "spread", seed=2)
    key = stream_key(2, "m", "t")
    runs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(l1_sums(d, "della_magprune", 0.4, key, epsilon=0.1))
        finally:
            torch.set_num_threads(old)
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_dare_drops_a_draw_equal_to_the_density():
    key = stream_key(5, "m", "t")
    u = uniform_like(key, torch.Size([4, 50])).numpy()
    density = float(u[2, 7])  # a multiple of 2**-24: the same number in float32
    mask = fast_mask(deltas(4, 50, "bf16"), "random", density, key)
    assert not mask[2, 7] and np.array_equal(mask, u < np.float32(density))


@pytest.mark.parametrize("n,density,epsilon", [(257, 0.5, 0.5), (6000, 0.6, 1e-5), (5000, 0.3, 0.01)])
def test_della_decides_at_the_threshold_rank(n, density, epsilon):
    """An element whose draw is in the band, given exactly the smallest rank that keeps it (and one rank less),
    in rows where equal keep probabilities run long (the threshold is found by bisection) or where the draw equals
    a keep probability."""
    key = stream_key(9, "m", "t")
    steps = np.float32(np.arange(n) * np.float32(2 * epsilon / (n - 1))) + np.float32(density - epsilon)
    u = uniform_like(key, torch.Size([4000, n])).numpy()
    in_band = np.argwhere((u >= steps[0]) & (u < steps[-1]))
    hits = [in_band[0], in_band[-1]] + [p for p in in_band if (steps == u[p[0], p[1]]).any()][:3]
    g = torch.Generator().manual_seed(0)
    for r, j in hits:
        k = int((steps <= u[r, j]).sum())  # ranks >= k keep the element
        for rank in (k, k - 1):
            mags = torch.randperm(n, generator=g).float()
            mags[mags == rank] = mags[j].item()
            mags[j] = rank
            d = (mags + 1).reshape(1, n) * torch.where(torch.rand(1, n, generator=g) < 0.5, -1.0, 1.0)
            got = fast_mask(d, "della_magprune", density, key, epsilon, row_offset=int(r))
            assert got[0, j] == (rank >= k)
            assert np.array_equal(got, ref_della_mask(d.numpy(), u[r : r + 1], density, epsilon))


@pytest.mark.parametrize(
    "weights,normalize", [([0.3, 0.1, 0.4], False), ([0.3, 0.1, 0.4], True), ([1.0, 1.0, 1.0], False)]
)
@pytest.mark.parametrize("sums", [[(3.0, 1.7), (2.0, 0.9), (5.0, 4.1)], [(1.0, 1.0), (0.0, 0.0), (7.0, 3.0)]])
@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("shape", [(37, 301), (601, 997)])
def test_pass_two_sum_in_one_compiled_pass_is_the_same_float32(monkeypatch, weights, normalize, sums, stored, shape):
    """kept(x - base) * factor * weight numerator, summed in recipe order: the compiled pass gives the bits of the
    torch ops it replaces, on bf16 inputs (many results halfway between bf16 values) and odd block lengths; the
    same from the bfloat16 tensors as stored (`stored`: widened by the kernel). The larger block is split over
    the threads (each range reads the masks from its own offset)."""
    from mergesmith.methods.task_arithmetic import L1Share, generalized_task_arithmetic

    g = torch.Generator().manual_seed(3)
    base = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16).float()
    xs = [(base + torch.randn(*shape, generator=g) * 0.001).to(torch.bfloat16).float() for _ in range(3)]
    masks = [np.packbits((torch.rand(base.numel(), generator=g) < 0.4).numpy()) for _ in range(3)]

    def merged(base=base, xs=xs):
        return generalized_task_arithmetic(
            base,
            xs,
            weights,
            [0.4] * 3,
            keys=[1, 2, 3],
            sparsification="della_magprune",
            normalize=normalize,
            rescale=True,
            lambda_=1.5,
            stat=L1Share(sums, masks),
        )

    fused = merged(base.bfloat16(), [x.bfloat16() for x in xs]) if stored else merged()
    assert fused.dtype == torch.float32
    monkeypatch.setattr(compiled, "_LIB", None)
    want = merged()
    assert torch.equal(fused.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("shape", [(), (0,), (5, 0), (3,)])
@pytest.mark.parametrize("method", ["random", "della_magprune"])
def test_scalars_and_empty_tensors_take_the_path_that_serves_them(shape, method):
    d = torch.full(shape, 0.3)
    (before, after), mask = l1_sums(d, method, 0.5, 1, epsilon=0.1)
    assert before == pytest.approx(0.3 * d.numel())
    assert mask.shape == d.shape


def test_inputs_of_another_dtype_are_not_summed_by_the_compiled_pass():
    from mergesmith.methods.task_arithmetic import L1Share, generalized_task_arithmetic

    base = torch.ones(4, 8)
    xs = [torch.full((4, 8), 2.0, dtype=torch.bfloat16)]
    out = generalized_task_arithmetic(
        base,
        xs,
        [1.0],
        [0.5],
        keys=[1],
        sparsification="random",
        rescale=True,
        stat=L1Share([(32.0, 32.0)], [np.packbits(np.ones(32, dtype=bool))]),
    )
    assert torch.equal(out, torch.full((4, 8), 2.0))


@pytest.mark.parametrize("n", [0, 1, 7, 100_003])
def test_radix_counts_are_the_counts_of_the_high_and_low_halves(n):
    g = np.random.default_rng(n)
    x = np.concatenate([g.integers(0, 1 << 32, n, dtype=np.uint32), np.uint32([0x12340005] * (n // 3))])
    x[: n // 4] = (np.uint32(0x12340000) | x[: n // 4] & np.uint32(0xFF)) if n else x[:0]
    want_high = np.bincount(x >> 16, minlength=1 << 16)
    assert np.array_equal(compiled.high_counts(x), want_high)
    assert np.array_equal(compiled.high_counts(x.view(np.float32)), want_high)
    buckets = [0x1234, 0x0000, 0xFFFF] + (
        [int(x[-1] >> 16)] if n and int(x[-1] >> 16) not in (0x1234, 0, 0xFFFF) else []
    )
    got = compiled.low_counts(x[::-1], buckets)  # a strided view: copied
    assert sorted(got) == sorted(buckets)
    for b in buckets:
        vals, counts = np.unique(x[(x >> 16) == b] & 0xFFFF, return_counts=True)
        assert np.array_equal(got[b][0], vals) and np.array_equal(got[b][1], counts)
    with pytest.raises(ValueError):
        compiled.low_counts(x, [1 << 16])
    with pytest.raises(TypeError):
        compiled.high_counts(x.astype(np.int64))


def ref_consensus(deltas, nums, count, normalize):
    """The TIES disjoint merge element by element in numpy float32, models in order."""
    w = [d * np.float32(n) if n != 1 else d for d, n in zip(deltas, nums)]
    votes = None
    for x in w:
        v = np.sign(np.nan_to_num(x, nan=0.0)).astype(np.float32) if count else x
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, as in the merge
            votes = v.copy() if votes is None else votes + v
    positive = votes >= 0
    total = divisor = None
    for x, n in zip(w, nums):
        agree = np.where(positive, x > 0, x < 0)
        term = np.where(agree, x, np.float32(0))
        total = term if total is None else total + term
        c = agree.astype(np.float32) * np.float32(n)
        divisor = c if divisor is None else divisor + c
    return total / np.where(divisor == 0, np.float32(1), divisor) if normalize else total


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weights", [[1.0, 2.0, 1.0], [3.0, -1.0, 1.0, 2.0], [1.0]])
@pytest.mark.parametrize("n", [1, 7, 513, 5000])
def test_ties_merge_in_one_compiled_pass_is_the_float32_reference(consensus, normalize, weights, n):
    """Signs elected by sum or count, agreeing parts summed and divided by the agreeing weights: the bits of a
    numpy float32 reference, with NaN, infinities, signed zeros and exact vote ties among the values."""
    from mergesmith.methods.task_arithmetic import generalized_task_arithmetic

    g = np.random.default_rng(n + len(weights))
    base = np.zeros(n, dtype=np.float32)
    xs = []
    for _ in weights:
        x = (g.standard_normal(n) * 10.0 ** g.integers(-3, 3, n)).astype(np.float32)
        special = g.random(n)
        x[special < 0.03] = np.nan
        x[(special > 0.03) & (special < 0.06)] = np.inf
        x[(special > 0.06) & (special < 0.15)] = -0.0
        x[(special > 0.15) & (special < 0.25)] = 0.5  # equal and opposite values: votes of exactly zero
        xs.append(x)
    if len(xs) > 1:
        xs[1][(g.random(n) < 0.2)] = -0.5
    want = ref_consensus([x - base for x in xs], weights, consensus == "count", normalize)
    got = generalized_task_arithmetic(
        torch.from_numpy(base),
        [torch.from_numpy(x) for x in xs],
        weights,
        [1.0] * len(xs),
        consensus=consensus,
        normalize=normalize,
    )
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("normalize", [False, True])
def test_ties_merge_with_fractional_weights_is_the_torch_path(monkeypatch, normalize):
    """Weights that are not whole numbers (integer numerators over a denominator): the compiled pass gives the
    bits of the torch ops it replaces, trimmed deltas of bf16 inputs included."""
    from mergesmith.methods.task_arithmetic import generalized_task_arithmetic

    g = torch.Generator().manual_seed(5)
    base = (torch.randn(29, 301, generator=g) * 0.02).to(torch.bfloat16).float()
    xs = [(base + torch.randn(29, 301, generator=g) * 0.001).to(torch.bfloat16).float() for _ in range(3)]

    def merged():
        return generalized_task_arithmetic(
            base,
            xs,
            [0.3, 0.1, 0.45],
            [0.4, 0.6, 0.5],
            sparsification="magnitude",
            consensus="sum",
            normalize=normalize,
            lambda_=1.5,
        )

    fused = merged()
    monkeypatch.setattr(compiled, "_LIB", None)
    assert torch.equal(fused.view(torch.int32), merged().view(torch.int32))


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("largest_first", [True, False])
@pytest.mark.parametrize("lo,hi", [(0, 1), (0, 700), (150, 900), (999, 1000), (0, 1000)])
def test_trim_by_a_rank_cut_in_blocks_keeps_the_stably_ranked_range(largest_first, lo, hi, with_base, stored):
    """A cut taken on the whole array and applied block by block (members of each boundary tie group in earlier
    blocks as offsets) keeps the elements whose rank in a stable sort of |d| lies in [lo, hi), the values themselves
    (signed zeros included), +0.0 elsewhere; d = x, or x - base computed by the trim itself (from float32, or from
    bfloat16 as stored: these values are exact in it)."""
    from mergesmith.methods.sparsify import cut_kept, rank_cut

    g = np.random.default_rng(lo + hi)
    d = (g.integers(-6, 7, 1000) * 0.25).astype(np.float32)  # 13 values: tie groups of ~80 at each boundary
    d[g.random(1000) < 0.05] = -0.0
    base = (g.integers(-4, 5, 1000) * 0.5).astype(np.float32) if with_base else None
    x = d + base if with_base else d
    if with_base:
        base[g.random(1000) < 0.05] = 0.0
        x[base == 0.0] = d[base == 0.0]  # -0.0 - 0.0 stays -0.0
        d = x - base
    a = np.abs(d)
    order = np.argsort(-a if largest_first else a, kind="stable")
    want = np.zeros(1000, dtype=np.float32)
    want[order[lo:hi]] = d[order[lo:hi]]
    cut = rank_cut(a, lo, hi, largest_first)
    got, seen = [], [0] * len(cut.groups)
    for block in np.split(np.arange(1000), [37, 500, 501, 800]):
        b = torch.from_numpy(base[block]) if with_base else None
        xb = torch.from_numpy(x[block])
        if stored:
            xb, b = xb.bfloat16(), (b.bfloat16() if with_base else None)
        got.append(cut_kept(xb, cut, list(seen), base=b).numpy())
        seen = [s + int(np.count_nonzero(a[block] == v)) for s, (v, _, _) in zip(seen, cut.groups)]
    assert np.array_equal(np.concatenate(got).view(np.int32), want.view(np.int32))


def sce_inputs(n, models, seed):
    """bf16-rounded base and fine-tunes (many equal deltas and zero variances), signed zeros among the deltas."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()
    xs = [(base + torch.randn(n, generator=g) * 0.0005).to(torch.bfloat16).float() for _ in range(models)]
    for i, x in enumerate(xs):
        x[i::7] = base[i::7]  # zero deltas
        x[3::11] = -0.0
    base[3::22] = 0.0  # -0.0 - 0.0: a negative zero delta
    return base, xs


@pytest.mark.parametrize("models", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 1023, 70_001])
def test_sce_variances_of_the_deltas_are_torch_var(models, n):
    """Variances of x_i - base without stacking the deltas: the bits of torch.var over the stacked deltas."""
    base, xs = sce_inputs(n, models, seed=n + models)
    want = torch.var(torch.stack(xs) - base, dim=0, unbiased=False)
    assert torch.equal(compiled.variances(xs, base).view(torch.int32), want.view(torch.int32))
    assert torch.equal(
        compiled.variances(xs).view(torch.int32), torch.stack(xs).var(dim=0, unbiased=False).view(torch.int32)
    )


@pytest.mark.parametrize("lo,hi", [(0, 1), (0, 700), (150, 900), (0, 1000)])
def test_sce_selection_in_blocks_keeps_the_stably_ranked_range(lo, hi):
    """The variance cut taken on the whole array and applied block by block: the elements whose rank in a stable
    descending sort lies in [lo, hi)."""
    from mergesmith.methods.sparsify import block_groups, rank_cut

    g = np.random.default_rng(lo + hi)
    v = (g.integers(0, 9, 1000) * 0.125).astype(np.float32)  # 9 values: tie groups of ~110 at each boundary
    want = np.zeros(1000, dtype=bool)
    want[np.argsort(-v, kind="stable")[lo:hi]] = True
    cut = rank_cut(v, lo, hi, largest_first=True)
    got, seen = [], [0] * len(cut.groups)
    for block in np.array_split(v, [37, 500, 501, 800]):
        got.append(compiled.cut_mask(torch.from_numpy(block), cut.low, cut.high, block_groups(cut, seen)).numpy())
        seen = [s + int(np.count_nonzero(block == val)) for s, (val, _, _) in zip(seen, cut.groups)]
    assert np.array_equal(np.concatenate(got), want)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 127, 128, 129, 136, 1000, 8193, 100_003, (1 << 20) + 5])
@pytest.mark.parametrize("masked", [False, True])
def test_sce_energies_are_numpys_pairwise_sums(n, masked):
    """Float64 sums of the squared selected deltas: the value np.add.reduce gives over their float64 squares, on
    one thread or two."""
    base, (x,) = sce_inputs(n, 1, seed=n)
    x = x * torch.exp2(torch.randint(-20, 20, (n,), generator=torch.Generator().manual_seed(n)).float())
    mask = torch.from_numpy(np.random.default_rng(n).random(n) < 0.6) if masked else None
    d = (x - base) * (mask if masked else 1)
    want = float(np.add.reduce(np.square(d.numpy().astype(np.float64))))
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert compiled.selected_squares(x, base, mask) == want
    finally:
        torch.set_num_threads(threads)


def ref_sce_merge(base, xs, mask, weights):
    """sce's merge element by element in numpy float32: selected deltas, signs elected by their sum, agreeing
    deltas weighted and divided by the agreeing weights (at least 1e-6); every sum from +0.0 in model order."""
    with np.errstate(invalid="ignore", over="ignore"):
        ds = [(x - base) * mask.astype(np.float32) if mask is not None else x - base for x in xs]
        votes = np.float32(0) + ds[0]
        for d in ds[1:]:
            votes = votes + d
        num = den = np.zeros_like(base)
        for d, w in zip(ds, weights):
            agree = np.where(votes >= 0, d > 0, d < 0)
            e = np.float32(w) * agree.astype(np.float32)
            num, den = num + d * e, den + e
        least = np.float32(1e-6)
        return base + num / np.where(den < least, least, den)


@pytest.mark.parametrize("weights", [[0.5, 0.25, 0.25], [0.2, 0.0, 0.8, 0.0], [1e-8, 2e-8], [1.0]])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n", [1, 513, 5000])
def test_sce_merge_in_one_compiled_pass_is_the_float32_reference(weights, masked, n):
    """The merge given the mask and energy weights: the bits of a numpy float32 reference, with signed zeros, exact
    vote ties, weights summing to less than the 1e-6 floor, and NaN and infinities (NaN where the reference has)."""
    base, xs = sce_inputs(n, len(weights), seed=n + len(weights))
    if len(xs) > 1:
        xs[1][::5] = base[::5] - (xs[0][::5] - base[::5])  # equal and opposite deltas: votes of exactly zero
    xs[0][::97] = float("nan")
    xs[-1][1::89] = float("inf")
    base[5::13] = -0.0
    for x in xs:
        x[5::13] = -1.0  # all deltas negative on a -0.0 base: masked out, every product is -0.0 and the sum +0.0
    mask = torch.from_numpy(np.random.default_rng(n).random(n) < 0.5) if masked else None
    got = compiled.sce_merge(base, xs, mask, torch.tensor(weights)).numpy()
    want = ref_sce_merge(base.numpy(), [x.numpy() for x in xs], None if mask is None else mask.numpy(), weights)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok].view(np.int32), want[ok].view(np.int32))


@pytest.mark.parametrize("topk,models", [(0.5, 3), (1.0, 3), (0.0, 3), (0.5, 4), (0.5, 5), (0.5, 8), (0.5, 20)])
def test_sce_in_blocks_on_the_compiled_path_is_the_torch_path(monkeypatch, topk, models):
    """Every round of sce in row blocks (variance cut, energies, merge) on the compiled kernels: the bits of the torch
    ops they replace (rows of 41: torch's sum over 5 or more models is then not in model order)."""
    from helpers import through_executor

    base, xs = sce_inputs(96 * 41, models, seed=11)
    base, xs = base.reshape(96, 41), [x.reshape(96, 41) for x in xs]
    fused, blocks, _ = through_executor("sce", base, xs, 1000, monkeypatch, {"select_topk": topk})
    assert len(blocks) > 3
    monkeypatch.setattr(compiled, "_LIB", None)
    plain, _, _ = through_executor("sce", base, xs, 1000, monkeypatch, {"select_topk": topk})
    assert torch.equal(fused.view(torch.int16), plain.view(torch.int16))


def ram_inputs(n, models, epsilon, seed):
    """Deltas spread around epsilon (some exactly at it, in float32), zeros, NaN and infinities."""
    g = np.random.default_rng(seed)
    base = (g.standard_normal(n) * 0.02).astype(np.float32)
    xs = []
    for _ in range(models):
        d = (g.standard_normal(n) * epsilon * 2).astype(np.float32)
        d[g.random(n) < 0.3] = 0.0
        x = base + d
        at = g.random(n) < 0.05
        x[at] = base[at] + np.float32(epsilon)  # a delta at epsilon, rounded as float32 sums round it
        x[g.random(n) < 0.01] = np.nan
        x[g.random(n) < 0.01] = -np.inf
        xs.append(x)
    return torch.from_numpy(base), [torch.from_numpy(x) for x in xs]


@pytest.mark.parametrize("epsilon", [1e-5, 0.1, 0.0])
@pytest.mark.parametrize("models", [1, 2, 3, 5])
def test_ram_overlap_counts_in_one_compiled_pass_are_the_counted_elements(epsilon, models):
    """Per model, its changed elements (|x - base| > epsilon, compared in float32) that others changed too and
    those it alone changed: counted here in numpy."""
    from mergesmith.methods.ramplus_tl import overlap_counts

    base, xs = ram_inputs(70_001, models, epsilon, seed=models)
    with np.errstate(invalid="ignore"):
        on = np.stack([np.abs(x.numpy() - base.numpy()) > np.float32(epsilon) for x in xs])
    c = on.sum(axis=0)
    want = [(int(np.sum(o & (c > 1))), int(np.sum(o & (c == 1)))) for o in on]
    assert overlap_counts(base, xs, epsilon) == want


@pytest.mark.parametrize(
    "method,shared",
    [("ram", {"epsilon": 1e-5}), ("ramplus_tl", {"r": 0.3, "alpha": 0.7, "epsilon": 1e-5}), ("ram", {"epsilon": 0.1})],
)
@pytest.mark.parametrize("models", [1, 2, 3, 4])
def test_ram_merge_in_one_compiled_pass_is_the_torch_path(monkeypatch, method, shared, models):
    """RAM and RAM+ in one compiled pass: the bits of the torch ops they replace (boosted deltas as one fused
    multiply-add, as torch's add with alpha rounds them), NaN where those give NaN."""
    from mergesmith.methods import get_method

    base, xs = ram_inputs(5003, models, shared["epsilon"], seed=10 + models)
    for x in xs:
        x[:100] = base[:100] + 3e-3 * (1 + torch.arange(100) % 3)  # changed by every model: exact means and not
    m = get_method(method)
    fused = m.merge(base, xs, shared, [{}] * models, None)
    monkeypatch.setattr(compiled, "_LIB", None)
    plain = m.merge(base, xs, shared, [{}] * models, None)
    assert torch.equal(torch.isnan(fused), torch.isnan(plain))
    ok = ~torch.isnan(plain)
    assert torch.equal(fused[ok].view(torch.int32), plain[ok].view(torch.int32))


@pytest.mark.parametrize("method", ["random", "della_magprune"])
@pytest.mark.parametrize("shape", [(37, 301), (4, 4096)])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_keep_masks_take_the_deltas_themselves_from_a_model_and_its_base(monkeypatch, method, shape, stored):
    """A model and its base given to the kernel (in float32, or bfloat16 as stored: widened where read): the
    masks and float64 sums of their deltas x - base (rounded as float32 subtraction rounds them) given as deltas."""
    base, xs = sce_inputs(shape[0] * shape[1], 1, seed=shape[0])
    base, x = base.reshape(shape), xs[0].reshape(shape)
    (sums, mask) = l1_sums(x.to(stored), method, 0.4, 17, epsilon=0.1, row_offset=5, base=base.to(stored))
    monkeypatch.setattr(compiled, "_LIB", None)  # the numpy path, on the deltas
    (want_sums, want_mask) = l1_sums(x - base, method, 0.4, 17, epsilon=0.1, row_offset=5)
    assert sums == want_sums and torch.equal(mask, want_mask)
    assert want_sums[0] == pytest.approx(float((x - base).double().abs().sum()), rel=1e-12)


@pytest.mark.parametrize("steps", [None, torch.linspace(0.3, 0.5, 301)])
def test_keep_masks_of_bfloat16_deltas_without_a_base(steps):
    """The kernel given bfloat16 rows of deltas and no base: the masks and float64 sums of the same deltas in
    float32 (DARE without steps, DELLA with them)."""
    base, xs = sce_inputs(37 * 301, 1, seed=8)
    d = (xs[0] - base).bfloat16().reshape(37, 301)
    got = compiled.keep_masks(d, 17, 5, steps, 0.4)
    want = compiled.keep_masks(d.float(), 17, 5, steps, 0.4)
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    assert 0 < want[2] < want[1] == pytest.approx(float(d.double().abs().sum()), rel=1e-12)


@pytest.mark.parametrize("stored", [False, True])
def test_radix_counts_of_magnitudes_take_a_model_and_its_base(stored):
    """With a base, the counts are those of the float32 magnitudes |x - base| (signed zeros and equal values
    among them), also from bfloat16 tensors as stored (`stored`: widened by the kernel)."""
    base, (x,) = sce_inputs(100_003, 1, seed=4)
    a, b = x.numpy(), base.numpy()
    mags = np.abs(a - b)
    want = np.bincount(mags.view(np.uint32) >> 16, minlength=1 << 16)
    if stored:
        a, b = x.bfloat16(), base.bfloat16()
    assert np.array_equal(compiled.high_counts(a, b), want)
    buckets = [int(v) for v in np.argsort(want)[-3:]]
    got = compiled.low_counts(a, buckets, b)
    for k in buckets:
        vals, counts = np.unique(mags.view(np.uint32)[(mags.view(np.uint32) >> 16) == k] & 0xFFFF, return_counts=True)
        assert np.array_equal(got[k][0], vals) and np.array_equal(got[k][1], counts)
    with pytest.raises(TypeError):
        compiled.high_counts(a, b[:-1])
    with pytest.raises(TypeError):
        compiled.high_counts(x.bfloat16(), base)  # a stored input with a base of another dtype


@pytest.mark.skipif(not compiled.fused_multiply_add(), reason="torch adds with alpha unfused on this CPU")
@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 1023, 1024, 1025, 70_001])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("stored", [False, True])
def test_weighted_sum_in_float64_is_torchs(n, k, stored):
    """karcher's combination: float64 sums of w_i x_i in model order (zero weights skipped), rounded once; the bits
    of torch's float64 add_ with alpha, on tails and ranges alike."""
    g = torch.Generator().manual_seed(n * 10 + k)
    xs = [torch.randn(n, generator=g) * 10.0 ** (i - 1) for i in range(k)]
    xs[0][::5] = -0.0
    ws = [float(v) for v in torch.randn(k, generator=g).double() / 3]
    if k == 2:  # near cancellation: the product's rounding shows in float32 unless it is fused with the sum
        xs[1], ws = xs[0].clone(), [1 / 3, -(1 / 3) * (1 - 2**-40)]
    if k == 3:  # a zero weight skips its model, infinities included
        ws[-1] = 0.0
        xs[-1][::3] = float("inf")
    if stored:  # bfloat16 as stored: the sums of their float32 values
        xs = [x.bfloat16() for x in xs]
    want = torch.zeros(n, dtype=torch.float64)
    for w, x in zip(ws, xs):
        if w:
            want.add_(x.float(), alpha=w)
    got = compiled.weighted_sum64(xs, ws)
    assert torch.equal(got.view(torch.int32), want.float().view(torch.int32))


@pytest.mark.skipif(not compiled.fused_multiply_add(), reason="torch adds with alpha unfused on this CPU")
@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 1023, 1024, 1025, 70_001])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("stored", [False, True])
def test_weighted_sum_in_float32_is_torchs(n, k, stored):
    """multislerp's weighted unit sum: zeros, then add_ with alpha per model in float32; the bits of torch's (zero
    weights included: they still add their NaN or Inf)."""
    g = torch.Generator().manual_seed(n * 10 + k)
    xs = [torch.randn(n, generator=g) * 10.0 ** (i - 1) for i in range(k)]
    xs[0][::5] = -0.0
    ws = [float(v) for v in torch.randn(k, generator=g).double() / 3]
    if k == 2:  # near cancellation: the product's rounding shows unless it is fused with the sum
        xs[1], ws = xs[0].clone(), [1 / 3, -(1 / 3) * (1 - 2**-12)]
    if k == 3:
        ws[-1] = 0.0
        xs[-1][::3] = float("inf")
    if k == 4:  # all terms -0.0: the sum starts from +0.0, so it stays +0.0
        ws = [abs(w) for w in ws]
        for x in xs:
            x[0] = -0.0
    if stored:  # bfloat16 as stored: the sums of their float32 values
        xs = [x.bfloat16() for x in xs]
    want = torch.zeros(n)
    for w, x in zip(ws, xs):
        want.add_(x.float(), alpha=w)
    got = compiled.weighted_sum32(xs, ws)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_narrowing_to_bfloat16_is_torchs_and_flags_nan_and_inf():
    """The output's conversion: torch's round-to-nearest-even bits for finite values (ties, subnormals, values that
    round up to infinity), and a flag where any value is NaN or Inf."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_003, generator=g) * torch.exp2(torch.randint(-140, 128, (100_003,), generator=g).float())
    bits = x.view(torch.int32)
    bits[:2000] = (bits[:2000] & ~0xFFFF) | 0x8000  # exact ties: to even
    x[2000:2004] = torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, -0.0])
    x = x.nan_to_num(posinf=1.0, neginf=-1.0)
    out, finite = compiled.narrow(x)
    assert finite and torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[77_777] = bad
        assert compiled.narrow(y)[1] is False


@pytest.mark.skipif(not compiled.fused_multiply_add(), reason="torch adds with alpha unfused on this CPU")
@pytest.mark.parametrize("method", ["karcher", "multislerp"])
def test_compiled_weighted_sums_give_the_methods_torch_bits(monkeypatch, method):
    """karcher and multislerp through their compiled weighted sums and through torch's adds: the same bits."""
    from mergesmith.methods.karcher import _coefficients, karcher
    from mergesmith.methods.multislerp import multislerp
    from mergesmith.methods.spherical import gram64

    g = torch.Generator().manual_seed(8)
    base = torch.randn(300, 70, generator=g)
    xs = [base + torch.randn(300, 70, generator=g) * 0.1 for _ in range(3)]
    stat = _coefficients(gram64(xs), 10, 1e-5)  # karcher's block path: the combination of its inputs

    def merged():
        if method == "karcher":
            return karcher(xs, lambda note: None, stat=stat)
        return multislerp(base, xs, weight=[0.3, 0.1, 0.4])

    calls = []
    kernel = "weighted_sum64" if method == "karcher" else "weighted_sum32"
    real = getattr(compiled, kernel)
    monkeypatch.setattr(compiled, kernel, lambda *a: calls.append(1) or real(*a))
    fast = merged()
    monkeypatch.setattr(compiled, "fused_multiply_add", lambda: False)
    assert calls and torch.equal(fast.view(torch.int32), merged().view(torch.int32))


@pytest.mark.parametrize("factor", [1.0, 0.7310586])
@pytest.mark.parametrize("n", [11, 600_001])
def test_masked_delta_from_bfloat16_as_stored_is_the_float32_reference(factor, n):
    """A DARE/DELLA delta under the TIES consensus from bfloat16 x and base as stored: kept(x - base) * factor in
    float32 (+0.0 where dropped), written here in torch; the larger tensor is split over the threads (each range
    reads the mask from its own offset)."""
    g = torch.Generator().manual_seed(n)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    x = (base.float() + torch.randn(n, generator=g) * 0.001).bfloat16()
    keep = torch.rand(n, generator=g) < 0.4
    d = x.float() - base.float()
    want = torch.where(keep, d, torch.zeros_like(d))
    if factor != 1.0:
        want = want * torch.tensor(factor, dtype=torch.float32)
    got = compiled.masked_delta(x, base, np.packbits(keep.numpy()), factor)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    with pytest.raises(TypeError):
        compiled.masked_delta(x, base.float(), np.packbits(keep.numpy()), factor)


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("k, n", [(2, 1), (2, 17), (3, 1003), (4, 77), (5, 300), (6, 255)])
def test_model_stock_interpolation_is_torchs_in_one_compiled_pass_up_to_four_models(monkeypatch, stored, k, n):
    """A block's t * mean(x_i) + (1 - t) * base from float32 or bfloat16 as stored: torch's bits for that expression
    on the float32 values, within an ulp of float64 math. Up to 4 models in one compiled pass (torch sums that many
    stacked models in order; more in an order that depends on the length, as here: torch's path)."""
    from mergesmith.methods.model_stock import model_stock

    if not compiled.available():
        pytest.skip("the C extension was not built")
    g = torch.Generator().manual_seed(k * n)
    xs = [torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 3, (n,), generator=g) for _ in range(k)]
    base = torch.randn(n, generator=g)
    xs[0][:3], base[:2] = -0.0, -0.0  # signed zeros; a model cancelling another
    xs[1][:3] = -0.0
    xs[-1][3:6] = -xs[0][3:6]
    if stored:
        xs, base = [x.bfloat16() for x in xs], base.bfloat16()
    stat = torch.tensor([[0.3712]], dtype=torch.float64)
    t, ws, w0 = stat.float(), torch.stack([x.float() for x in xs]), base.float()
    want = (t * (ws.sum(dim=0) / k) + (1 - t) * w0).reshape(-1)
    calls = []
    kernel = compiled.stock_merge
    monkeypatch.setattr(compiled, "stock_merge", lambda *a: calls.append(1) or kernel(*a))
    got = model_stock(base, xs, stat=stat)
    assert len(calls) == (k <= 4) and got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    exact = float(t) * ws.double().mean(dim=0) + (1 - float(t)) * w0.double()
    assert torch.allclose(got.double(), exact, rtol=4e-7, atol=1e-6 * float(exact.abs().max()))


def test_a_models_delta_from_bfloat16_as_stored_is_torchs():
    """x.float() - base.float() of bfloat16 tensors, in one pass: torch's bits, with signed zeros, NaN, infinities
    and tiny values; other dtypes are left to torch."""
    if not compiled.available():
        pytest.skip("the C extension was not built")
    g = torch.Generator().manual_seed(9)
    x, base = (torch.randn(1031, generator=g).bfloat16() for _ in range(2))
    x[:6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40])
    base[:6] = torch.tensor([-0.0, -0.0, 1.0, 2.0, -float("inf"), -1e-40])
    got = compiled.delta(x.reshape(1, -1), base.reshape(1, -1))
    want = x.float() - base.float()
    assert got.shape == (1, 1031) and torch.equal(got.reshape(-1).view(torch.int32), want.view(torch.int32))
    assert compiled.delta(x.float(), base.float()) is None


def test_the_base_added_back_from_bfloat16_as_stored_is_torchs():
    """base.float() + acc into acc: torch's bits, with signed zeros, infinities and tiny values, over a length that
    splits across threads; other dtypes, shapes and strides are left to torch."""
    if not compiled.available():
        pytest.skip("the C extension was not built")
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 300_001, generator=g).bfloat16()
    acc = torch.randn(3, 300_001, generator=g) * 1e-3
    base.view(-1)[:5] = torch.tensor([-0.0, 0.0, float("inf"), 1e-40, -2.0])
    acc.view(-1)[:5] = torch.tensor([-0.0, -0.0, 1.0, -1e-40, 2.0])
    want = base.double().float() + acc.clone()  # widened exactly, then one float32 addition
    got = compiled.add_base(acc, base)
    assert got is acc and torch.equal(acc.view(torch.int32), want.view(torch.int32))
    assert compiled.add_base(acc, base.float()) is None
    assert compiled.add_base(acc, base[:, :5]) is None
    assert compiled.add_base(acc.t(), base.t()) is None


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_trims_in_blocks_take_bfloat16_as_stored_with_the_bytes_of_their_float32_values(monkeypatch, method):
    """Row blocks of bfloat16 models (TIES, breadcrumbs) are trimmed by the tensor's cut from bfloat16 as stored:
    the bytes of the same merge of float32 copies of those values."""
    from helpers import through_executor

    g = torch.Generator().manual_seed(3)
    base = torch.randn(96, 41, generator=g).bfloat16()
    xs = [(base.float() + torch.randn(96, 41, generator=g) * 0.01).bfloat16() for _ in range(3)]
    xs[1][::7] = base[::7]  # zero deltas: tie groups at the cut
    per = [{"weight": w, "density": d} for w, d in ((0.3, 0.5), (0.2, 0.4), (0.5, 0.7))]
    if method != "ties":
        per = [{**p, "gamma": 0.05} for p in per]
    seen, keep = [], compiled.cut_keep
    monkeypatch.setattr(compiled, "cut_keep", lambda flat, *a, **k: seen.append(flat.dtype) or keep(flat, *a, **k))
    stored, blocks, _ = through_executor(method, base, xs, 1000, monkeypatch, per=per)
    assert len(blocks) > 3 and set(seen) == {torch.bfloat16}
    widened, _, _ = through_executor(method, base.float(), [x.float() for x in xs], 1000, monkeypatch, per=per)
    assert torch.equal(stored.view(torch.int32), widened.view(torch.int32))


@pytest.mark.parametrize("n", [1, 127, 1000, 70_001])
def test_sce_kernels_take_bfloat16_as_stored_with_the_values_of_their_float32(n):
    """Variances, energies and merge from bfloat16 inputs as stored: the bits the kernels give on float32 copies
    (which tests above hold to torch's and numpy's)."""
    base, xs = sce_inputs(n, 3, seed=n)  # values exact in bfloat16
    base16, xs16 = base.bfloat16(), [x.bfloat16() for x in xs]
    assert torch.equal(base16.float(), base) and all(torch.equal(a.float(), b) for a, b in zip(xs16, xs))
    mask = torch.from_numpy(np.random.default_rng(n).random(n) < 0.5)
    same = [
        (compiled.variances(xs16, base16), compiled.variances(xs, base)),
        (
            compiled.sce_merge(base16, xs16, mask, torch.tensor([0.5, 0.2, 0.3])),
            compiled.sce_merge(base, xs, mask, torch.tensor([0.5, 0.2, 0.3])),
        ),
    ]
    for got, want in same:
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    for x16, x in zip(xs16, xs):
        assert compiled.selected_squares(x16, base16, mask) == compiled.selected_squares(x, base, mask)


@pytest.mark.parametrize("topk", [0.5, 1.0])
def test_sce_in_blocks_takes_bfloat16_as_stored_with_the_bytes_of_their_float32_values(monkeypatch, topk):
    """sce's rounds and merge on bfloat16 row blocks as stored: the bytes of the same merge of float32 copies."""
    from helpers import through_executor

    base, xs = sce_inputs(96 * 41, 3, seed=12)
    base, xs = base.reshape(96, 41).bfloat16(), [x.reshape(96, 41).bfloat16() for x in xs]
    seen, merge = [], compiled.sce_merge
    monkeypatch.setattr(compiled, "sce_merge", lambda b, *a: seen.append(b.dtype) or merge(b, *a))
    stored, blocks, _ = through_executor("sce", base, xs, 1000, monkeypatch, {"select_topk": topk})
    assert len(blocks) > 3 and set(seen) == {torch.bfloat16}
    widened, _, _ = through_executor(
        "sce", base.float(), [x.float() for x in xs], 1000, monkeypatch, {"select_topk": topk}
    )
    assert torch.equal(stored.view(torch.int32), widened.view(torch.int32))


def test_order_keys_of_signed_values_sort_like_the_values():
    """RadixRanks' keys in one compiled pass: the sign bit set on non-negative floats, all bits flipped on negative
    ones, NaN (any sign or payload) the largest; sorting by key sorts the values, -0.0 before +0.0, NaN last."""
    if not compiled.available():
        pytest.skip("the C extension was not built")
    g = np.random.default_rng(5)
    a = (g.standard_normal(10_007) * 10.0 ** g.integers(-40, 38, 10_007)).astype(np.float32)
    a[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45]
    a.view(np.uint32)[8] = 0x7FC00123  # a NaN with a payload
    u = a.view(np.uint32).astype(np.uint64)
    want = np.where(u >= 2**31, ~u & 0xFFFFFFFF, u | 2**31)
    want[np.isnan(a)] = 0xFFFFFFFF
    keys = compiled.order_keys(a)
    assert keys.dtype == np.uint32 and np.array_equal(keys, want.astype(np.uint32))
    s = a[np.argsort(keys, kind="stable")]
    finite = s[~np.isnan(s)]
    assert np.isnan(s[-3:]).all() and (np.diff(finite.astype(np.float64)) >= 0).all()
    zeros = np.signbit(finite[finite == 0])
    assert zeros.tolist() == sorted(zeros.tolist(), reverse=True)


@pytest.mark.parametrize("shape", [(7,), (33, 129), (4, 5, 17)])
def test_fusion_importance_in_one_compiled_pass_is_torchs(shape):
    """Arcee Fusion's |other - base| * kl (kl one value a row): torch's bits, signed zeros, infinities and NaN
    included; other dtypes are left to torch."""
    if not compiled.available():
        pytest.skip("the C extension was not built")
    g = torch.Generator().manual_seed(len(shape))
    base, other = (torch.randn(shape, generator=g) for _ in range(2))
    kl = torch.rand(shape[:-1] + (1,), generator=g) * 1e-3
    flat_b, flat_o = base.view(-1), other.view(-1)
    flat_b[:4], flat_o[:4] = torch.tensor([0.0, -0.0, 1.0, float("inf")]), torch.tensor([-0.0, -0.0, float("nan"), 1.0])
    kl.view(-1)[-1] = float("inf")
    want = (other - base).abs() * kl
    got = compiled.fusion_importance(base, other, kl)
    assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert compiled.fusion_importance(base.double(), other.double(), kl.double()) is None
