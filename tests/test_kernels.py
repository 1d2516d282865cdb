"""Merge kernels against independent float64 references written here, plus statistical properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ref_della_mask
from mergesmith.methods import METHODS
from mergesmith.methods.rng import stream_key, uniform
from mergesmith.methods.sparsify import della_keep_probabilities

G = torch.Generator().manual_seed(0)


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def merge(name, base, xs, per_input, keys=None, **shared):
    m = METHODS[name]
    full = {p.name: p.default for p in m.shared_params}
    full.update(shared)
    per = []
    for p in per_input:
        d = {q.name: q.default for q in m.input_params if q.default is not object and not q.required}
        d.update(p)
        per.append(d)
    return m.merge(base, xs, full, per, keys or [stream_key(1, f"m{i}", "t") for i in range(len(xs))])


# ---------------------------------------------------------------- references (float64, numpy, written here)


def ref_linear(xs, ws, normalize=True):
    acc = sum(w * x.double().numpy() for w, x in zip(ws, xs))
    return acc / sum(ws) if normalize else acc


def ref_task_arithmetic(base, xs, ws, lam=1.0, normalize=False):
    b = base.double().numpy()
    acc = sum(w * (x.double().numpy() - b) for w, x in zip(ws, xs))
    if normalize:
        acc = acc / sum(ws)
    return b + lam * acc


def topk_mask(d, density):
    flat = np.abs(d).ravel()
    k = max(1, int(density * flat.size))
    keep = np.argsort(-flat, kind="stable")[:k]
    m = np.zeros(flat.size)
    m[keep] = 1
    return m.reshape(d.shape)


def ref_ties(base, xs, ws, ds, normalize=True, lam=1.0):
    b = base.double().numpy()
    W = [w * (x.double().numpy() - b) * topk_mask(x.double().numpy() - b, d) for x, w, d in zip(xs, ws, ds)]
    total = sum(W)
    elected = np.where(total >= 0, 1.0, -1.0)
    mixed = np.zeros_like(b)
    div = np.zeros_like(b)
    for Wi, w in zip(W, ws):
        agree = np.sign(Wi) == elected
        mixed += np.where(agree, Wi, 0)
        div += np.where(agree, w, 0)
    div[div == 0] = 1
    if normalize:
        mixed = mixed / div
    return b + lam * mixed


def ref_breadcrumbs_mask(d, density, gamma):
    flat = np.abs(d).ravel()
    n = flat.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(flat, kind="stable")
    m = np.zeros(n)
    m[order[n_bot : n_bot + target]] = 1
    return m.reshape(d.shape)


# ---------------------------------------------------------------- deterministic methods


def test_linear_matches_reference():
    xs = [rnd(7, 5) for _ in range(3)]
    ws = [0.3, 0.1, 0.4]
    for norm in (True, False):
        out = merge("linear", None, xs, [{"weight": w} for w in ws], normalize=norm)
        np.testing.assert_allclose(out.double().numpy(), ref_linear(xs, ws, norm), rtol=1e-6, atol=1e-6)


def test_task_arithmetic_lambda_normalize():
    base = rnd(6, 4)
    xs = [base + rnd(6, 4, scale=0.1) for _ in range(3)]
    ws = [0.5, -0.25, 1.0]
    out = merge("task_arithmetic", base, xs, [{"weight": w} for w in ws], **{"lambda": 0.7})
    np.testing.assert_allclose(out.numpy(), ref_task_arithmetic(base, xs, ws, lam=0.7), rtol=1e-5, atol=1e-6)
    out = merge("task_arithmetic", base, xs, [{"weight": w} for w in ws], normalize=True)
    np.testing.assert_allclose(out.numpy(), ref_task_arithmetic(base, xs, ws, normalize=True), rtol=1e-5, atol=1e-6)


def test_ties_matches_reference():
    base = rnd(16, 12)
    xs = [base + rnd(16, 12, scale=0.1) for _ in range(3)]
    ws, ds = [0.3, 0.5, 0.2], [0.25, 0.5, 0.9]
    out = merge("ties", base, xs, [{"weight": w, "density": d} for w, d in zip(ws, ds)])
    np.testing.assert_allclose(out.numpy(), ref_ties(base, xs, ws, ds), rtol=1e-5, atol=1e-6)
    out = merge(
        "ties", base, xs, [{"weight": w, "density": d} for w, d in zip(ws, ds)], normalize=False, **{"lambda": 2.0}
    )
    np.testing.assert_allclose(out.numpy(), ref_ties(base, xs, ws, ds, normalize=False, lam=2.0), rtol=1e-5, atol=1e-6)


def test_ties_hand_checked():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 3.0, 0.0])
    b = torch.tensor([-3.0, 1.0, 1.0, 0.0])
    out = merge("ties", base, [a, b], [{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}])
    # elected signs: [-, -, +, +]; agreeing: [b], [a], [a, b], none -> means: -3, -2, 2, 0
    assert out.tolist() == [-3.0, -2.0, 2.0, 0.0]


@pytest.mark.parametrize("name,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_matches_reference(name, consensus):
    base = rnd(20, 10)
    xs = [base + rnd(20, 10, scale=0.1) for _ in range(2)]
    ws, ds, gs = [0.6, 0.4], [0.5, 0.3], [0.05, 0.1]
    out = merge(name, base, xs, [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(ws, ds, gs)])
    b = base.double().numpy()
    masked = [
        b + (x.double().numpy() - b) * ref_breadcrumbs_mask(x.double().numpy() - b, d, g) for x, d, g in zip(xs, ds, gs)
    ]
    if consensus:
        ref = ref_ties(torch.from_numpy(b), [torch.from_numpy(m) for m in masked], ws, [1.0, 1.0], normalize=False)
    else:
        ref = ref_task_arithmetic(torch.from_numpy(b), [torch.from_numpy(m) for m in masked], ws)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- randomized methods


def test_uniform_matches_pure_python_splitmix():
    M = (1 << 64) - 1

    def py(key, i):
        z = (i * 0x9E3779B97F4A7C15 + key) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        z = z ^ (z >> 31)
        return (z >> 40) / 2**24

    key = stream_key(42, "model0", "model.layers.0.mlp.up_proj.weight")
    got = uniform(key, 10**9, 64)
    want = [py(key & M, 10**9 + i) for i in range(64)]
    assert got.tolist() == pytest.approx(want, abs=0)
    u = uniform(key, 0, 200_000)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert uniform(stream_key(1, "a", "b"), 0, 8).tolist() != uniform(stream_key(2, "a", "b"), 0, 8).tolist()


@pytest.mark.parametrize("shape", [(40, 257), (3, 1), (1, 5000), (9, 2)])
@pytest.mark.parametrize("density,epsilon", [(0.4, 0.05), (0.25, 0.2), (0.5, 0.5)])
def test_della_mask_matches_a_ranked_reference(shape, density, epsilon):
    """The band shortcut (most elements decided without a rank) keeps exactly the elements a full ranking keeps,
    on bf16-like deltas full of ties and zeros, for every row length."""
    from mergesmith.methods.rng import uniform_like
    from mergesmith.methods.sparsify import keep_mask

    base = rnd(*shape, scale=0.02).to(torch.bfloat16)
    ft = (base.float() + rnd(*shape, scale=0.0005)).to(torch.bfloat16)
    d = ft.float() - base.float()
    d[0, : shape[1] // 2] = 0
    key = stream_key(3, "m", "t")
    got, _ = keep_mask(d, "della_magprune", density, key, epsilon, row_offset=5)
    u = uniform_like(key, d.shape, row_offset=5).numpy()
    want = ref_della_mask(d.numpy(), u, density, epsilon)
    assert np.array_equal(got.numpy(), want)


def test_della_keep_probabilities_range_per_row():
    d = rnd(3, 101)
    p = della_keep_probabilities(d, density=0.4, epsilon=0.1)
    for r in range(3):
        order = np.argsort(np.abs(d[r].numpy()))
        assert p[r, order[0]].item() == pytest.approx(0.3)
        assert p[r, order[-1]].item() == pytest.approx(0.5)
        assert np.all(np.diff(p[r].numpy()[order]) > 0)  # increasing with magnitude rank
        assert p[r].mean().item() == pytest.approx(0.4, abs=1e-6)


@pytest.mark.parametrize("name", ["della_linear", "della", "dare_linear", "dare_ties"])
def test_random_methods_keep_fraction_and_l1(name):
    base = torch.zeros(64, 512)
    x = rnd(64, 512)
    out = merge(name, base, [x], [{"weight": 1.0, "density": 0.3, "epsilon": 0.1}])
    kept = (out != 0).float()
    per_row = kept.mean(dim=1)
    assert abs(per_row.mean().item() - 0.3) < 0.01
    if name.startswith("della"):
        assert per_row.min().item() > 0.3 - 0.1 and per_row.max().item() < 0.3 + 0.1
    # rescale (mergekit: L1 match) keeps the delta's L1 norm
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)


def test_della_keeps_large_magnitudes_more_often():
    x = torch.linspace(0.01, 1, 200).repeat(400, 1)
    out = merge(
        "della_linear", torch.zeros_like(x), [x], [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}], rescale=False
    )
    rate = (out != 0).float().mean(dim=0)
    assert rate[:20].mean().item() == pytest.approx(0.32, abs=0.03)
    assert rate[-20:].mean().item() == pytest.approx(0.68, abs=0.03)


def test_della_linear_expected_value_is_task_arithmetic():
    """Paper variant (per-element 1/p rescale) is unbiased: the mean over many seeds -> weighted task arithmetic."""
    base = rnd(8, 64)
    xs = [base + rnd(8, 64, scale=0.5) for _ in range(3)]
    ws, ds = [0.3, 0.1, 0.4], [0.25, 0.4, 0.5]
    per = [{"weight": w, "density": d, "epsilon": 0.05} for w, d in zip(ws, ds)]
    n = 2000
    acc = torch.zeros_like(base, dtype=torch.float64)
    for s in range(n):
        keys = [stream_key(s, f"m{i}", "t") for i in range(3)]
        acc += merge("della_linear", base, xs, per, keys, rescale_mode="inverse_prob").double()
    mean = acc / n
    ref = torch.from_numpy(ref_task_arithmetic(base, xs, ws))
    # per-element standard error of the mean, from the Bernoulli variances
    var = sum((w * (x - base).double()) ** 2 * (1 - d) / d for x, w, d in zip(xs, ws, ds)) / n
    z = ((mean - ref) / var.sqrt().clamp_min(1e-12)).abs()
    assert z.max().item() < 5.0
    assert z.mean().item() < 1.0


def test_della_l1_mode_mean_close_to_task_arithmetic():
    """mergekit's L1 rescale is unbiased in aggregate: the seed-mean tracks task arithmetic closely."""
    base = rnd(8, 64)
    xs = [base + rnd(8, 64, scale=0.5) for _ in range(3)]
    ws, ds = [0.3, 0.1, 0.4], [0.25, 0.4, 0.5]
    per = [{"weight": w, "density": d, "epsilon": 0.05} for w, d in zip(ws, ds)]
    acc = torch.zeros_like(base, dtype=torch.float64)
    for s in range(500):
        acc += merge("della_linear", base, xs, per, [stream_key(s, f"m{i}", "t") for i in range(3)]).double()
    delta = acc / 500 - base.double()
    ref = torch.from_numpy(ref_task_arithmetic(base, xs, ws)) - base.double()
    cos = torch.nn.functional.cosine_similarity(delta.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.98
    assert delta.abs().sum().item() == pytest.approx(ref.abs().sum().item(), rel=0.05)


def test_della_rank_scope_tensor():
    x = torch.cat([torch.full((1, 50), 0.01), torch.full((1, 50), 1.0)])  # small row, large row
    x = x + torch.linspace(0, 1e-3, 50)
    p_row = della_keep_probabilities(x, 0.5, 0.2, "row")
    p_tensor = della_keep_probabilities(x, 0.5, 0.2, "tensor").reshape(2, 50)
    assert p_row[0].mean().item() == pytest.approx(0.5)
    assert p_tensor[0].max().item() < 0.5 < p_tensor[1].min().item()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    density=st.floats(0.1, 0.9),
    name=st.sampled_from(["della_linear", "dare_linear", "della", "dare_ties"]),
)
def test_random_methods_are_row_block_and_order_free(rows, cols, seed, density, name):
    """A block of rows merged alone equals the same rows of the whole-tensor merge (the stream is per element)."""
    base = torch.zeros(rows, cols)
    xs = [rnd(rows, cols), rnd(rows, cols)]
    eps = min(density, 1 - density) / 2
    per = [{"weight": 0.5, "density": density, "epsilon": eps}] * 2
    keys = [stream_key(seed, "m0", "t"), stream_key(seed, "m1", "t")]
    a = merge(name, base, xs, per, keys, rescale=False)
    b = merge(name, base, xs[::-1], per, keys[::-1], rescale=False)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # model order does not matter
    from mergesmith.methods.rng import uniform_like

    u = uniform_like(keys[0], torch.Size([rows, cols]))
    u2 = uniform_like(keys[0], torch.Size([rows - rows // 2, cols]), row_offset=rows // 2)
    assert torch.equal(u[rows // 2 :], u2)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 50), levels=st.integers(1, 2000), seed=st.integers(0, 10**6))
def test_radix_row_argsort_equals_stable_sort(rows, cols, levels, seed):
    """The numpy radix path orders like a stable float sort, ties (frequent in bf16 deltas) by index."""
    from mergesmith.methods.sparsify import stable_argsort_rows

    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, levels, (rows, cols), generator=g).float() * 1e-3) ** 2  # many exact ties and zeros
    x[:, ::3] += torch.rand(rows, (cols + 2) // 3, generator=g) * 1e-7  # and some that are not bf16-exact
    want = np.argsort(x.numpy(), axis=1, kind="stable")
    assert np.array_equal(stable_argsort_rows(x).numpy(), want)


def test_magnitude_ties_keep_lower_indices_breadcrumbs_drop_lower():
    from mergesmith.methods.sparsify import magnitude, magnitude_outliers

    d = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 2.0])
    # k = 3: 2.0, then the first two of the four tied 1.0 magnitudes
    assert magnitude(d, 0.5).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 2.0]
    # ascending order with ties by index: 0.5, 1, -1, 1, -1, 2 -> drop n_bot = 6 - 3 - 0 = 3 smallest
    assert magnitude_outliers(d, 0.5, gamma=0.0).tolist() == [0.0, 0.0, 1.0, -1.0, 0.0, 2.0]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 300),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    lo=st.integers(0, 300),
    width=st.integers(0, 300),
    largest=st.booleans(),
)
def test_rank_range_mask_equals_a_stable_sort(n, levels, seed, lo, width, largest):
    """Selection-based top-k / rank ranges keep exactly what a stable sort keeps, ties (few levels) by index."""
    from mergesmith.methods.sparsify import rank_range_mask

    rng = np.random.default_rng(seed)
    a = rng.integers(0, levels, n).astype(np.float32) * 0.5
    order = np.argsort(-a if largest else a, kind="stable")
    want = np.zeros(n, dtype=bool)
    want[order[lo : lo + width]] = True
    got = rank_range_mask(torch.from_numpy(a), lo, lo + width, largest_first=largest).numpy()
    assert np.array_equal(got, want)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 300),
    levels=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    lo=st.integers(0, 300),
    width=st.integers(0, 300),
    largest=st.booleans(),
    n_blocks=st.integers(1, 7),
)
def test_a_cut_applied_block_by_block_keeps_what_a_stable_sort_keeps(n, levels, seed, lo, width, largest, n_blocks):
    """Row-block TIES: the whole tensor's RankCut, found block by block (radix selection) and applied to blocks
    with the tie-group counts of earlier blocks, keeps what a stable sort of the whole tensor keeps."""
    from mergesmith.methods.sparsify import apply_cut, rank_cut, rank_cut_blocks

    rng = np.random.default_rng(seed)
    # values sharing their high 16 bits (1, the next float32 up, 1 + 2**-20) and not (0, 0.25, 3, 1e-30)
    values = np.array(
        [0.0, 0.25, 1.0, np.nextafter(np.float32(1), np.float32(2)), 1 + 2.0**-20, 3.0, 1e-30], dtype=np.float32
    )[:levels]
    a = values[rng.integers(0, levels, n)]
    order = np.argsort(-a if largest else a, kind="stable")
    want = np.zeros(n, dtype=bool)
    want[order[lo : lo + width]] = True
    bounds = sorted(set([0, n] + rng.integers(0, n + 1, n_blocks - 1).tolist()))
    cut, counts = rank_cut_blocks(lambda k: a[bounds[k] : bounds[k + 1]], len(bounds) - 1, n, lo, lo + width, largest)
    assert cut == rank_cut(a, lo, lo + width, largest)
    running = [0] * len(cut.groups)
    got = []
    for k, (x, y) in enumerate(zip(bounds, bounds[1:])):
        got.append(apply_cut(torch.from_numpy(a[x:y]), cut, running).numpy())
        running = [r + c for r, c in zip(running, counts[k])]
    assert np.array_equal(np.concatenate(got), want)


def test_kept_is_torch_where_bit_for_bit():
    """The bitwise select keeps NaN, Inf and -0.0 where the mask holds and writes +0.0 elsewhere, like where."""
    from mergesmith.methods.sparsify import kept

    x = rnd(37, 41)
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5])
    mask = torch.rand(37, 41, generator=G) < 0.5
    mask[0, :6] = torch.tensor([True, False, True, True, False, False])
    want = torch.where(mask, x, torch.zeros(()))
    for got in (kept(x, mask), kept(x.clone(), mask, out=None), kept(x.clone(), mask, out=x.clone())):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    y = x.clone()
    kept(y, mask, out=y)
    assert torch.equal(y.view(torch.int32), want.view(torch.int32))
