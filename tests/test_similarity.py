"""Similarity engine: every number is checked against a plain float64 numpy reference written
here (loops, explicit centring matrices, textbook CCA), or against a known identity.
"""

import math
import threading
import warnings

import numpy as np
import pytest
import torch

from layerprobe.similarity import (
    SimilarityConfig,
    SimilarityWarning,
    bias_floor,
    cka,
    cka_matrix,
    diagnostics_rows,
    minibatch_cka,
    mutual_knn,
    procrustes,
    pwcca,
    similarity_rows,
    streaming_cka,
    svcca,
)
from layerprobe.similarity import estimators
from layerprobe.similarity.estimators import feature_stats, gram_stats, gram_tiles, linear_grams

# ----------------------------------------------------------------------------------------
# Independent float64 references


def ref_hsic_biased(k, l):
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def ref_hsic_unbiased(k, l):
    """Song et al. (2012), eq. 5, term by term."""
    n = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def ref_cka_from_grams(k, l, debiased):
    hsic = ref_hsic_unbiased if debiased else ref_hsic_biased
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def ref_linear(x, y, debiased=False):
    # centring first keeps the float64 reference itself accurate for large means; the
    # formulas above centre again (H or U-centring), and translation invariance is tested apart
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    return ref_cka_from_grams(x @ x.T, y @ y.T, debiased)


def ref_rbf_gram(x, threshold=1.0):
    """Kornblith et al. (2019) reference code, gram_rbf."""
    x = np.asarray(x, np.float64)
    dots = x @ x.T
    sq = np.diag(dots)
    d2 = -2 * dots + sq[:, None] + sq[None, :]
    return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


def ref_cca(x, y):
    """Canonical correlations by whitening: svd(Sxx^-1/2 Sxy Syy^-1/2)."""
    x, y = x - x.mean(0), y - y.mean(0)

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    wx, wy = inv_sqrt(sxx), inv_sqrt(syy)
    u, rho, vt = np.linalg.svd(wx @ sxy @ wy)
    return rho, wx @ u  # correlations and X-side canonical directions


def make_pair(n, d, noise=1.0, seed=0, layers=None):
    rng = np.random.default_rng(seed)
    shape = (n, d) if layers is None else (n, layers, d)
    x = rng.standard_normal(shape)
    y = x @ rng.standard_normal((d, d)) / math.sqrt(d) + noise * rng.standard_normal(shape)
    return x, y


def random_orthogonal(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------------------
# Identities


@pytest.mark.parametrize("kernel,debiased", [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)])
def test_self_similarity_is_one_and_cka_is_symmetric(kernel, debiased):
    x, y = make_pair(40, 7)
    assert cka(x, x, kernel, debiased) == pytest.approx(1.0, abs=1e-6)
    assert cka(x, y, kernel, debiased) == pytest.approx(cka(y, x, kernel, debiased), abs=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances_and_a_generic_map_that_breaks_them(debiased):
    x, y = make_pair(50, 6, seed=1)
    base = cka(x, y, debiased=debiased, gram_dtype="float64")
    q = random_orthogonal(6, 3)
    assert cka(x @ q, y, debiased=debiased, gram_dtype="float64") == pytest.approx(base, abs=1e-10)
    assert cka(7.5 * x, y, debiased=debiased, gram_dtype="float64") == pytest.approx(base, abs=1e-10)
    assert cka(x + 100.0, y - 3.0, debiased=debiased, gram_dtype="float64") == pytest.approx(base, abs=1e-9)
    stretch = np.diag([1.0, 8.0, 0.2, 1.0, 3.0, 0.5]) @ random_orthogonal(6, 4)  # invertible, not orthogonal
    assert abs(cka(x @ stretch, y, debiased=debiased) - base) > 1e-2


def test_rbf_is_invariant_to_rotation_scale_and_translation():
    x, y = make_pair(40, 5, seed=2)
    base = cka(x, y, "rbf")
    assert cka(3.0 * x @ random_orthogonal(5, 1) + 2.0, y, "rbf") == pytest.approx(base, abs=1e-9)


# ----------------------------------------------------------------------------------------
# Estimators against their references


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_space_equals_gram_space(debiased):
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.standard_normal((60, 2, 5)) + 4.0)
    y = torch.tensor(rng.standard_normal((60, 2, 8)))
    xc = [x[:, l] - x[:, l].mean(0) for l in range(2)]
    yc = [y[:, l] - y[:, l].mean(0) for l in range(2)]
    scale = torch.ones(2, dtype=torch.float64)
    feat = feature_stats(xc, yc, False, scale, scale).cka(debiased)
    gram = gram_stats(linear_grams(x, [0, 1], "cpu", torch.float64), linear_grams(y, [0, 1], "cpu", torch.float64), False).cka(debiased)
    torch.testing.assert_close(feat, gram, atol=1e-12, rtol=0)
    ref = [[ref_linear(x[:, i].numpy(), y[:, j].numpy(), debiased) for j in range(2)] for i in range(2)]
    np.testing.assert_allclose(feat.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("n,d", [(30, 200), (300, 4)])  # Gram path (n < d) and feature path (n >> d)
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matches_reference_on_both_paths(n, d, debiased):
    x, y = make_pair(n, d, seed=5)
    assert cka(x, y, debiased=debiased) == pytest.approx(ref_linear(x, y, debiased), abs=1e-7)
    assert cka(x, y, debiased=debiased, gram_dtype="float64") == pytest.approx(ref_linear(x, y, debiased), abs=1e-12)


def test_large_mean_float64_input_on_the_float32_gram_path():
    x, y = make_pair(40, 300, seed=22)  # n < d: Gram path, float32 products by default
    want = ref_linear(x, y, True)
    assert cka(x + 1e6, y - 3e5, debiased=True) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_loop_over_pairs(debiased):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((25, 3, 9)) + 2.0
    b = np.concatenate([a[:, :2] @ rng.standard_normal((9, 9)), rng.standard_normal((25, 2, 9))], axis=1)  # 4 layers
    got = cka_matrix(a, b, debiased=debiased)
    ref = [[ref_linear(a[:, i], b[:, j], debiased) for j in range(4)] for i in range(3)]
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, ref, atol=1e-7)
    within = cka_matrix(a, debiased=debiased)  # one call also gives a model against itself
    np.testing.assert_allclose(within, [[ref_linear(a[:, i], a[:, j], debiased) for j in range(3)] for i in range(3)], atol=1e-7)


def test_unbiased_hsic_is_invariant_to_shifting_the_features():
    # Shifting features by c adds a_i + b_j terms to K, which U-centring removes (Szekely & Rizzo
    # 2014, Ann. Statist. 42(6), arXiv 1310.2926; Song et al. 2012's estimator is that U-centred
    # inner product): so centring the features before the float32 products changes no number.
    x, y = make_pair(50, 7, seed=30)
    shift = 5.0 * np.random.default_rng(30).standard_normal(7)
    xc, yc = x - x.mean(0), y - y.mean(0)
    want = ref_hsic_unbiased(xc @ xc.T, yc @ yc.T)
    assert ref_hsic_unbiased((x + shift) @ (x + shift).T, (y - 2.0) @ (y - 2.0).T) == pytest.approx(want, rel=1e-9)
    assert ref_hsic_biased((x + shift) @ (x + shift).T, y @ y.T) == pytest.approx(ref_hsic_biased(xc @ xc.T, yc @ yc.T), rel=1e-9)


@pytest.mark.parametrize("n,r_max", [(5, 64), (600, 300), (1001, 260), (2000, 409)])
def test_gram_tiles_cover_every_pair_once(n, r_max):
    cover = np.zeros((n, n), dtype=int)
    for i, j, w in gram_tiles(n, r_max):
        assert (w == 1.0) == (i == j)  # only a tile on the diagonal counts once; the others stand for their transpose
        assert i.stop - i.start <= r_max and j.stop - j.start <= r_max
        cover[i, j] += 1
        if w == 2.0:
            cover[j, i] += 1
    np.testing.assert_array_equal(cover, 1)


@pytest.mark.parametrize("gram_dtype,tol", [(torch.float32, 1e-8), (torch.float64, 1e-12)])
def test_tiled_gram_stats_match_the_float64_reference(monkeypatch, gram_dtype, tol):
    # A small block budget makes n = 600 two blocks of 300 rows (an off-diagonal tile of weight 2)
    # with each diagonal block split in halves; features far from the origin (means ~1e3) show
    # that centring before the float32 products keeps them exact (measured error ~4e-10).
    n = 600
    monkeypatch.setattr(estimators, "GRAM_BLOCK_BYTES", 12 * 5 * 300**2)  # 5 = 2 + 3 layers
    assert {(i.stop - i.start, j.stop - j.start) for i, j, _ in gram_tiles(n, 300)} == {(300, 300), (150, 150)}
    rng = np.random.default_rng(31)
    a = rng.standard_normal((n, 2, 40))
    mix = lambda x: x @ rng.standard_normal((40, 40)) / math.sqrt(40)  # noqa: E731
    b = np.stack([mix(a[:, 0]) + 0.5 * rng.standard_normal((n, 40)), rng.standard_normal((n, 40)), mix(a[:, 1])], axis=1)
    src_a = linear_grams(a + 1e3 * rng.standard_normal(40), [0, 1], "cpu", gram_dtype)
    src_b = linear_grams(b - 1e3, [0, 1, 2], "cpu", gram_dtype)
    src_b2 = linear_grams(b - 1e3, [0, 1], "cpu", gram_dtype)
    for debiased in (False, True):
        ref = np.array([[ref_linear(a[:, i], b[:, j], debiased) for j in range(3)] for i in range(2)])
        within = np.array([[ref_linear(a[:, i], a[:, j], debiased) for j in range(2)] for i in range(2)])
        np.testing.assert_allclose(gram_stats(src_a, src_b, False).cka(debiased).numpy(), ref, atol=tol, rtol=0)
        np.testing.assert_allclose(gram_stats(src_a, src_b2, True).cka(debiased).numpy(), np.diag(ref[:, :2]), atol=tol, rtol=0)
        np.testing.assert_allclose(gram_stats(src_a, src_a, False).cka(debiased).numpy(), within, atol=tol, rtol=0)
        np.testing.assert_allclose(gram_stats(src_a, src_a, True).cka(debiased).numpy(), [1.0, 1.0], atol=tol, rtol=0)
        # stored Grams (RBF kernels, resampling) go through the same tiles as views
        np.testing.assert_allclose(gram_stats(src_a.stored(), src_b.stored(), False).cka(debiased).numpy(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_cka_matches_kornblith_reference(debiased):
    x, y = make_pair(31, 6, seed=7)  # odd n: the median is a middle element
    want = ref_cka_from_grams(ref_rbf_gram(x, 0.8), ref_rbf_gram(y, 0.8), debiased)
    assert cka(x, y, "rbf", debiased, rbf_threshold=0.8) == pytest.approx(want, abs=1e-6)
    x, y = make_pair(30, 6, seed=8)  # even n: numpy averages the two middle values
    assert cka(x, y, "rbf", gram_dtype="float64") == pytest.approx(ref_cka_from_grams(ref_rbf_gram(x), ref_rbf_gram(y), False), abs=1e-12)


def test_biased_floor_and_debiased_mean_on_independent_data():
    n, d = 60, 30
    rng = np.random.default_rng(9)
    biased, unbiased = [], []
    for _ in range(40):
        x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        biased.append(cka(x, y))
        unbiased.append(cka(x, y, debiased=True))
    assert np.mean(biased) == pytest.approx(bias_floor(n, d), rel=0.1)
    assert abs(np.mean(unbiased)) < 0.02


def test_fp16_inputs_are_finite_and_match_fp64():
    rng = np.random.default_rng(10)
    # large offsets and scales: fp16 Grams of the raw values would overflow (65504)
    a = (rng.standard_normal((80, 2, 64)) * 30 + 200).astype(np.float16)
    b = (a.astype(np.float64) @ rng.standard_normal((64, 64)) * 0.2 + rng.standard_normal((80, 2, 64)) * 40).astype(np.float16)
    for debiased in (False, True):
        got = cka_matrix(a, b, debiased=debiased)
        want = cka_matrix(a.astype(np.float64), b.astype(np.float64), debiased=debiased, gram_dtype="float64")
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-3)
        tgot = cka_matrix(torch.tensor(a), torch.tensor(b).to(torch.bfloat16), debiased=debiased)
        assert isinstance(tgot, torch.Tensor) and torch.isfinite(tgot).all()


def test_torch_inputs_return_torch_on_their_device():
    x, y = make_pair(30, 5, layers=2)
    got = cka_matrix(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), debiased=True)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.device.type == "cpu"
    np.testing.assert_allclose(got.numpy(), cka_matrix(x, y, debiased=True), atol=1e-6)


# ----------------------------------------------------------------------------------------
# Permutation null: the closed-form mean against Monte Carlo


@pytest.mark.parametrize("debiased", [False, True])
def test_exact_null_mean_matches_monte_carlo(debiased):
    x, y = make_pair(20, 8, seed=11, layers=1)
    cfg = SimilarityConfig(measures=["debiased_cka" if debiased else "linear_cka"])
    row = similarity_rows("t", {"a": x, "b": y}, [("a", "b")], cfg)[0]
    rng = np.random.default_rng(12)
    k, l = x[:, 0] @ x[:, 0].T, y[:, 0] @ y[:, 0].T
    draws = []
    for _ in range(3000):
        p = rng.permutation(20)
        draws.append(ref_cka_from_grams(k, l[np.ix_(p, p)], debiased))
    assert row["null_mean"] == pytest.approx(np.mean(draws), abs=4 * np.std(draws) / math.sqrt(3000) + 1e-12)


# ----------------------------------------------------------------------------------------
# Streaming


def test_streaming_moments_are_exact():
    a, b = make_pair(257, 6, seed=13, layers=3)
    a = a + 1e3  # a large mean: the shifted moments must not lose the signal
    res = streaming_cka(a, b, batch_size=50)
    for l in range(3):
        assert res["linear_cka"][l] == pytest.approx(ref_linear(a[:, l], b[:, l]), abs=1e-9)
        assert res["debiased_cka"][l] == pytest.approx(ref_linear(a[:, l], b[:, l], True), abs=1e-9)
    assert res["n"] == 257


def test_minibatch_estimate_agrees_with_full_debiased():
    a, b = make_pair(1200, 8, noise=1.5, seed=14, layers=2)
    full = cka_matrix(a, b, debiased=True)
    mb = minibatch_cka(a, b, batch_size=200)
    np.testing.assert_allclose(mb, full, atol=0.03)


class ThreadRanks:
    """Two 'ranks' as threads; all_reduce sums what both contribute (the torch.distributed contract)."""

    def __init__(self, world=2):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def reducer(self, rank):
        def all_reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            return total

        return all_reduce


@pytest.mark.parametrize("kind", ["moments", "minibatch"])
def test_streaming_all_reduce_across_ranks(kind):
    a, b = make_pair(400, 5, seed=15, layers=2)
    ranks, results = ThreadRanks(), [None, None]
    shards = [slice(0, 230), slice(230, 400)]

    def work(r):
        if kind == "moments":
            results[r] = streaming_cka(a[shards[r]], b[shards[r]], batch_size=64, all_reduce=ranks.reducer(r))
        else:
            results[r] = minibatch_cka(a[shards[r]], b[shards[r]], batch_size=40, all_reduce=ranks.reducer(r))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    if kind == "moments":
        for r in range(2):
            assert results[r]["n"] == 400
            np.testing.assert_allclose(results[r]["debiased_cka"], [ref_linear(a[:, l], b[:, l], True) for l in range(2)], atol=1e-9)
    else:
        np.testing.assert_allclose(results[0], results[1], atol=1e-12)
        np.testing.assert_allclose(np.diag(results[0]), np.diag(cka_matrix(a, b, debiased=True)), atol=0.05)


def test_streaming_rows_reads_a_memmap(tmp_path):
    a, b = make_pair(90, 4, seed=16, layers=2)
    np.save(tmp_path / "a.npy", a.astype(np.float32))
    np.save(tmp_path / "b.npy", b.astype(np.float16))
    feats = {"base": np.load(tmp_path / "a.npy", mmap_mode="r"), "tuned": np.load(tmp_path / "b.npy", mmap_mode="r")}
    cfg = SimilarityConfig(measures=["linear_cka", "debiased_cka", "minibatch_cka"], stream_batch_size=20, cross_layer=True)
    rows = similarity_rows("t", feats, [("base", "tuned")], cfg)
    exact = {(r["measure"], r["layer_a"]): r["value"] for r in rows if r["measure"] != "minibatch_cka"}
    assert exact[("debiased_cka", 1)] == pytest.approx(ref_linear(feats["base"][:, 1], feats["tuned"][:, 1], True), abs=1e-9)
    assert sum(r["measure"] == "minibatch_cka" for r in rows) == 4


# ----------------------------------------------------------------------------------------
# The other measures, each against its own definition


def test_svcca_matches_definition():
    x, y = make_pair(200, 6, seed=17)
    x = x @ np.diag([5, 4, 3, 1, 0.05, 0.01])  # two low-variance directions fall below 99%

    def reduce(z, share):
        z = z - z.mean(0)
        u, s, _ = np.linalg.svd(z, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), share) + 1)
        return u[:, :k] * s[:k]

    rho, _ = ref_cca(reduce(x, 0.99), reduce(y, 0.99))
    assert svcca(x, y) == pytest.approx(np.mean(rho[: min(reduce(x, 0.99).shape[1], reduce(y, 0.99).shape[1])]), abs=1e-9)


def test_pwcca_matches_definition():
    x, y = make_pair(300, 5, seed=18)
    y = np.concatenate([y, np.random.default_rng(1).standard_normal((300, 2))], axis=1)  # x has fewer neurons
    rho, dirs = ref_cca(x, y)
    xc = x - x.mean(0)
    h = xc @ dirs  # canonical variates of x
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ xc).sum(1)  # sum over neurons j of |<h_i, x_j>|
    assert pwcca(x, y) == pytest.approx(np.sum(alpha / alpha.sum() * rho[: len(alpha)]), abs=1e-9)


def test_procrustes_is_the_minimum_over_rotations():
    x, y = make_pair(50, 4, seed=19)
    a = (x - x.mean(0)) / np.linalg.norm(x - x.mean(0))
    b = (y - y.mean(0)) / np.linalg.norm(y - y.mean(0))
    u, _, vt = np.linalg.svd(b.T @ a)
    best = np.linalg.norm(a - b @ (u @ vt)) ** 2  # Schonemann's solution, evaluated directly
    assert procrustes(x, y, form="squared") == pytest.approx(best, abs=1e-10)
    assert procrustes(x, y) == pytest.approx(math.sqrt(best), abs=1e-10)  # the metric form is the default
    assert procrustes(x, y, form="angular") == pytest.approx(math.acos(1 - best / 2), abs=1e-10)
    for seed in range(5):
        assert np.linalg.norm(a - b @ random_orthogonal(4, seed)) ** 2 >= best - 1e-12
    assert procrustes(x, x @ random_orthogonal(4, 7) * 3 + 1) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="form"):
        procrustes(x, y, form="cubed")


def test_procrustes_metric_forms_obey_the_triangle_inequality():
    """The squared form does not: three points on a line in shape space (A, midpoint, C)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((30, 3))
    c = rng.standard_normal((30, 3))
    a, c = a - a.mean(0), c - c.mean(0)
    a, c = a / np.linalg.norm(a), c / np.linalg.norm(c)
    b = (a + c) / 2
    sq = {k: procrustes(*pair, form="squared") for k, pair in {"ab": (a, b), "bc": (b, c), "ac": (a, c)}.items()}
    assert sq["ab"] + sq["bc"] < sq["ac"]  # the squared distance breaks it
    for form in ("metric", "angular"):
        for _ in range(30):
            x, y, z = (rng.standard_normal((30, 3)) @ rng.standard_normal((3, 3)) for _ in range(3))
            assert procrustes(x, z, form=form) <= procrustes(x, y, form=form) + procrustes(y, z, form=form) + 1e-12
        assert procrustes(a, c, form=form) <= procrustes(a, b, form=form) + procrustes(b, c, form=form) + 1e-12


def test_pwcca_weights_the_side_with_fewer_live_neurons():
    """Morcos et al. count neurons that survive the variance filter: dead (constant) ones do not count."""
    rng = np.random.default_rng(5)
    x, y = make_pair(300, 4, seed=21)
    y = np.concatenate([y, rng.standard_normal((300, 1))], axis=1)  # 5 live neurons
    x_dead = np.concatenate([x, np.full((300, 2), 3.0)], axis=1)  # 6 columns, 4 live
    rho, dirs = ref_cca(x, y)
    xc = x - x.mean(0)
    h = xc @ dirs
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ xc).sum(1)
    expected = np.sum(alpha / alpha.sum() * rho[: len(alpha)])
    assert pwcca(x_dead, y) == pytest.approx(expected, abs=1e-9)  # x's side, although it is wider
    assert pwcca(y, x_dead) == pytest.approx(expected, abs=1e-9)  # the same side from the other argument order
    assert abs(pwcca(x, y[:, :4] @ rng.standard_normal((4, 4))) - pwcca(y[:, :4], x)) >= 0  # defined both ways


def test_rbf_bandwidth_with_many_tied_examples():
    """75% identical rows: the all-pairs median distance is 0; the nonzero median takes over, with a warning."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40, 5))
    x[10:] = x[0]
    y = x @ rng.standard_normal((5, 5)) + 0.1 * rng.standard_normal((40, 5))
    with pytest.warns(SimilarityWarning, match="tied examples"):
        value = cka(x, y, kernel="rbf", gram_dtype="float64")

    def gram(z):
        z = np.asarray(z, np.float64)
        d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * np.median(d2[d2 > 0])))

    assert np.isfinite(value)
    # y has no exact ties, so its bandwidth follows Kornblith's rule; x's uses the nonzero median
    assert value == pytest.approx(ref_cka_from_grams(gram(x), ref_rbf_gram(y), False), abs=1e-9)
    assert cka(x, y) == pytest.approx(ref_linear(x, y), abs=1e-9)


def test_bias_floor_for_unequal_widths_matches_simulation():
    rng = np.random.default_rng(9)
    n, dx, dy = 100, 20, 200
    sims = [cka(rng.standard_normal((n, dx)), rng.standard_normal((n, dy)), gram_dtype="float64") for _ in range(60)]
    assert np.mean(sims) == pytest.approx(bias_floor(n, dx, dy), rel=0.03)
    assert bias_floor(n, dx, dy) == pytest.approx(math.sqrt(dx * dy / ((n + dx) * (n + dy))))
    assert bias_floor(n, 50) == pytest.approx(50 / 150)
    with pytest.raises(ValueError):
        bias_floor(0, 5)


def test_streaming_nan_policy_and_constant_layer_warning():
    a, b = make_pair(120, 4, seed=22, layers=2)
    a = a.copy()
    a[7, 1, 2] = np.nan
    with pytest.raises(ValueError, match="layer 1.*example 7"):
        streaming_cka(a, b, batch_size=32)
    with pytest.warns(SimilarityWarning, match="dropped 1 of 120"):
        res = streaming_cka(a, b, batch_size=32, nan_policy="mask")
    keep = np.arange(120) != 7
    for l in range(2):
        assert res["debiased_cka"][l] == pytest.approx(ref_linear(a[keep, l], b[keep, l], True), abs=1e-9)
    assert res["n"] == 119
    const = a[keep].copy()
    const[:, 0] = 2.5
    with pytest.warns(SimilarityWarning, match="constant representation"):
        res = streaming_cka(const, b[keep], batch_size=32)
    assert math.isnan(res["linear_cka"][0]) and np.isfinite(res["linear_cka"][1])
    with pytest.raises(ValueError, match="nan_policy"):
        streaming_cka(a, b, nan_policy="drop")


def test_minibatch_layer_constant_within_a_batch_counts_as_zero():
    """Layer a is constant in 3 of 8 batches; the reference sums per-batch U-statistics itself."""
    rng = np.random.default_rng(10)
    n, bs = 400, 50
    order = np.random.default_rng(0).permutation(n)  # the documented batching: default_rng(seed), array_split
    x = rng.standard_normal((n, 1, 6))
    for part in np.array_split(order, n // bs)[:3]:
        x[part] = 1.5
    y = x + 0.5 * rng.standard_normal((n, 1, 6))
    value = minibatch_cka(x, y, batch_size=bs, gram_dtype="float64")[0, 0]
    sums = np.zeros(3)
    for part in np.array_split(order, n // bs):
        xs, ys = x[np.sort(part), 0], y[np.sort(part), 0]
        xs, ys = xs - xs.mean(0), ys - ys.mean(0)
        k, l = xs @ xs.T, ys @ ys.T
        sums += [ref_hsic_unbiased(k, l), ref_hsic_unbiased(k, k), ref_hsic_unbiased(l, l)]
    assert np.isfinite(value)
    assert value == pytest.approx(sums[0] / math.sqrt(sums[1] * sums[2]), abs=1e-9)
    x_nan = x.copy()
    x_nan[3, 0, 0] = np.inf
    with pytest.raises(ValueError, match="example 3"):
        minibatch_cka(x_nan, y, batch_size=bs)
    with pytest.warns(SimilarityWarning, match="dropped 1"):
        assert np.isfinite(minibatch_cka(x_nan, y, batch_size=bs, nan_policy="mask")[0, 0])
    with pytest.warns(SimilarityWarning, match="constant representation"):
        assert math.isnan(minibatch_cka(np.ones((n, 1, 3)), y, batch_size=bs)[0, 0])
    # at most one informative row per batch: every batch's debiased self-HSIC is 0, so the estimate is undefined
    sparse = np.zeros((n, 1, 6))
    sparse[order[::bs][:5]] = rng.standard_normal((5, 1, 6))
    with pytest.warns(SimilarityWarning, match="non-positive debiased self-HSIC"):
        assert math.isnan(minibatch_cka(sparse, y, batch_size=bs)[0, 0])


def test_mutual_knn_matches_brute_force():
    x, y = make_pair(40, 5, noise=0.7, seed=20)

    def neighbours(z):
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        s = z @ z.T
        return [set(np.argsort(-np.where(np.arange(len(z)) == i, -np.inf, s[i]))[:4]) for i in range(len(z))]

    nx, ny = neighbours(x), neighbours(y)
    want = np.mean([len(nx[i] & ny[i]) / 4 for i in range(40)])
    assert mutual_knn(x, y, k=4) == pytest.approx(want)


# ----------------------------------------------------------------------------------------
# similarity_rows: the pipeline's interface


def _features(n=40, layers=3, d=6, seed=21):
    a, b = make_pair(n, d, seed=seed, layers=layers)
    return {"base": a.astype(np.float32), "tuned": b.astype(np.float32)}


def test_rows_diagonal_and_cross_layer_shapes():
    feats = _features()
    keys = {"task", "model_a", "model_b", "layer_a", "layer_b", "measure", "value", "ci_low", "ci_high", "null_mean"}
    rows = similarity_rows("sst2", feats, [("base", "tuned")], SimilarityConfig(), ids=[f"e{i}" for i in range(40)])
    assert len(rows) == 2 * 3 and all(keys <= set(r) and r["layer_a"] == r["layer_b"] for r in rows)
    assert all(math.isnan(r["ci_low"]) for r in rows)  # bootstrap off
    rows = similarity_rows("sst2", feats, [("base", "tuned")], SimilarityConfig(cross_layer=True, within_model=True), layers=[0, 2])
    pairs = {(r["model_a"], r["model_b"]) for r in rows}
    assert pairs == {("base", "tuned"), ("base", "base"), ("tuned", "tuned")}
    assert len(rows) == 3 * 2 * 4
    cell = next(r for r in rows if (r["model_a"], r["layer_a"], r["layer_b"], r["measure"]) == ("base", 0, 2, "debiased_cka") and r["model_b"] == "tuned")
    assert cell["value"] == pytest.approx(ref_linear(feats["base"][:, 0], feats["tuned"][:, 2], True), abs=1e-6)


def test_rows_all_measures_with_ci_and_null():
    feats = _features(n=48)
    measures = ["linear_cka", "debiased_cka", "rbf_cka", "svcca", "pwcca", "procrustes", "mutual_knn"]
    cfg = SimilarityConfig(measures=measures, bootstrap=30, permutations=30, knn_k=5)
    rows = similarity_rows("t", feats, [("base", "tuned")], cfg, layers=[1])
    assert [r["measure"] for r in rows] == measures
    for r in rows:
        assert r["ci_low"] <= r["value"] <= r["ci_high"], r
        assert r["p_value"] == pytest.approx(1 / 31)  # related data beats every shuffle
        assert math.isfinite(r["null_mean"])
    by = {r["measure"]: r for r in rows}
    assert by["debiased_cka"]["null_mean"] == 0.0
    assert by["procrustes"]["null_mean"] > by["procrustes"]["value"]  # a distance: the null is farther


@pytest.mark.parametrize("feature_space", [False, True])
def test_resampling_paths_agree(monkeypatch, feature_space):
    """Batched resamples of matched layers = one-by-one resamples inside the layer x layer
    matrix, and the feature-space path = the Gram path: same index sets, same numbers."""
    import layerprobe.similarity.rows as rows_mod

    monkeypatch.setattr(rows_mod, "feature_space_is_cheaper", lambda *args: feature_space)
    feats = _features(n=24, layers=2, d=16, seed=30)
    cfg = dict(measures=["linear_cka", "debiased_cka", "rbf_cka"], bootstrap=20, permutations=20, seed=3)
    paired = similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(**cfg))
    cross = similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(cross_layer=True, **cfg))
    cross = {(r["measure"], r["layer_a"]): r for r in cross if r["layer_a"] == r["layer_b"]}
    for r in paired:
        other = cross[r["measure"], r["layer_a"]]
        for key in ("value", "ci_low", "ci_high", "null_mean", "p_value"):
            assert r[key] == pytest.approx(other[key], abs=1e-9), (r["measure"], key)
    monkeypatch.setattr(rows_mod, "feature_space_is_cheaper", lambda *args: not feature_space)
    flipped = similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(**cfg))
    for r, f in zip(paired, flipped):
        for key in ("value", "ci_low", "ci_high", "null_mean", "p_value"):
            assert r[key] == pytest.approx(f[key], abs=1e-6), (r["measure"], key)


def test_feature_space_resamples_are_each_index_sets_cka():
    """The feature path evaluates a chunk of resamples per batched product: every half-sample
    and permutation value must be the float64 reference CKA of exactly that index set, and a
    constant layer stays NaN under resampling."""
    from layerprobe.similarity.families import LinearCKA
    from layerprobe.similarity.rows import Resamples, prepare_run

    feats = _features(n=30, layers=2, d=3, seed=8)
    feats["base"][:, 1] = 2.0  # a constant layer
    cfg = SimilarityConfig(measures=["linear_cka", "debiased_cka"], bootstrap=7, permutations=5, seed=4, gram_dtype="float64")
    run = prepare_run(feats, [("base", "tuned")], cfg)
    res = Resamples(run.n, cfg, run.device)
    fam = LinearCKA(cfg.measures, paired=True, feature_space=True, gram_dtype="float64")
    x, y = feats["base"].astype(np.float64), feats["tuned"].astype(np.float64)
    for layer in range(2):
        pa, pb = (fam.prepare(run.model(role, [layer])) for role in ("base", "tuned"))
        for subs, perms in ((res.subs[0], res.perms), (res.subs[1], [])):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SimilarityWarning)
                boots, nulls = fam.evaluate_many(pa, pb, subs, perms)
            for debiased in (False, True):
                name = "debiased_cka" if debiased else "linear_cka"
                assert boots[name].shape == (len(subs), 1)
                for i, sub in enumerate(subs):
                    want = np.nan if layer == 1 else ref_linear(x[sub, layer], y[sub, layer], debiased)
                    np.testing.assert_allclose(float(boots[name][i, 0]), want, rtol=1e-10)
                for i, perm in enumerate(perms):
                    want = np.nan if layer == 1 else ref_linear(x[:, layer], y[perm, layer], debiased)
                    np.testing.assert_allclose(float(nulls[name][i, 0]), want, rtol=1e-10)


def test_half_sample_interval_tracks_sampling_spread():
    # the interval's half-width should match the spread of the estimate across fresh samples
    values, widths = [], []
    for seed in range(12):
        feats = _features(n=80, layers=1, d=4, seed=100 + seed)
        row = similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(measures=["debiased_cka"], bootstrap=60, seed=seed))[0]
        values.append(row["value"])
        widths.append((row["ci_high"] - row["ci_low"]) / (2 * 1.96))
    assert 0.5 < np.mean(widths) / np.std(values, ddof=1) < 2.0


@pytest.mark.parametrize("strength", [2.0, 0.3, 0.0])
def test_interval_coverage_against_the_population_value(strength):
    """Y = c X + E with X, E ~ N(0, I_d): population linear CKA = c^2 / (c^2 + 1) exactly (Sxy = cI, Syy = (c^2+1)I).

    Debiased CKA's interval must cover that value; biased CKA's covers its own expectation at
    this n (estimated by the simulation mean), which is above the population value.
    """
    rng = np.random.default_rng(int(strength * 10))
    population = strength**2 / (strength**2 + 1)
    n, d, reps = 120, 8, 100
    hits, rows = [], []
    for r in range(reps):
        x = rng.standard_normal((n, 1, d))
        y = strength * x + rng.standard_normal((n, 1, d))
        cfg = SimilarityConfig(measures=["linear_cka", "debiased_cka"], bootstrap=150, seed=r, gram_dtype="float64")
        out = {row["measure"]: row for row in similarity_rows("t", {"a": x, "b": y}, [("a", "b")], cfg)}
        hits.append(out["debiased_cka"]["ci_low"] <= population <= out["debiased_cka"]["ci_high"])
        rows.append(out["linear_cka"])
    assert 0.90 <= np.mean(hits) <= 0.99
    expected = np.mean([row["value"] for row in rows])
    assert 0.90 <= np.mean([row["ci_low"] <= expected <= row["ci_high"] for row in rows]) <= 0.99


def test_p_values_adjusted_by_holm_and_bh():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    m = 4
    order = np.argsort([0.01, 0.04, 0.03, 0.005])  # independent loops over the textbook definitions
    finite = np.array([0.01, 0.04, 0.03, 0.005])
    holm = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * finite[i])
        holm[i] = min(1.0, running)
    bh = np.empty(m)
    for i in range(m):
        bh[i] = min(min(m / (k + 1) * finite[order[k]] for k in range(m) if finite[order[k]] >= finite[i]), 1.0)
    from layerprobe.similarity import adjust_p_values

    np.testing.assert_allclose(adjust_p_values(p, "holm")[[0, 1, 2, 4]], holm)
    np.testing.assert_allclose(adjust_p_values(p, "bh")[[0, 1, 2, 4]], bh)
    assert np.isnan(adjust_p_values(p, "holm")[3])
    feats = _features(n=40, layers=3, d=4, seed=3)
    rows = similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(measures=["debiased_cka"], permutations=50, p_adjust="bh"))
    raw = [r["p_value"] for r in rows]
    np.testing.assert_allclose([r["p_adjusted"] for r in rows], adjust_p_values(raw, "bh"))
    with pytest.raises(ValueError, match="p_adjust"):
        SimilarityConfig(p_adjust="bonferroni")


def test_rows_accept_memmap_and_torch(tmp_path):
    feats = _features()
    np.save(tmp_path / "base.npy", feats["base"])
    mm = {"base": np.load(tmp_path / "base.npy", mmap_mode="r"), "tuned": torch.tensor(feats["tuned"])}
    got = similarity_rows("t", mm, [("base", "tuned")], {"measures": ["debiased_cka"]})
    want = similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(measures=["debiased_cka"]))
    assert [r["value"] for r in got] == pytest.approx([r["value"] for r in want], abs=1e-9)


def test_rows_selects_store_rows_lazily(tmp_path):
    feats = _features(n=50)
    feats["tuned"][3, 0, 0] = np.inf  # outside the selection: never read, never an error
    feats["base"][20, 1, 2] = np.nan  # inside: masked from both models
    np.save(tmp_path / "base.npy", feats["base"])
    np.save(tmp_path / "tuned.npy", feats["tuned"])
    mm = {r: np.load(tmp_path / f"{r}.npy", mmap_mode="r") for r in feats}
    test = np.arange(10, 50)
    ids = [f"e{i}" for i in test]
    with pytest.raises(ValueError, match="example 'e20'"):
        similarity_rows("t", mm, [("base", "tuned")], SimilarityConfig(), ids=ids, rows=test)
    with pytest.warns(SimilarityWarning, match="dropped 1 of 40"):
        got = similarity_rows("t", mm, [("base", "tuned")], SimilarityConfig(nan_policy="mask"), ids=ids, rows=test)
    keep = np.array([i for i in test if i != 20])
    assert got[0]["n"] == 39
    assert got[0]["value"] == pytest.approx(ref_linear(feats["base"][keep, 0], feats["tuned"][keep, 0]), abs=1e-6)
    with pytest.warns(SimilarityWarning, match="dropped 1 of 40"):
        diag = diagnostics_rows("t", mm, [("base", "tuned")], SimilarityConfig(nan_policy="mask", diagnostics_top_k=1), ids=ids, rows=test)
    assert all(r["example_id"] in ids for r in diag if r["example_id"] is not None)


# ----------------------------------------------------------------------------------------
# Bad input


def test_mismatched_counts_and_ids_name_both_models():
    feats = _features()
    feats["tuned"] = feats["tuned"][:39]
    with pytest.raises(ValueError, match="'base' has 40 examples but model 'tuned' has 39"):
        similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig())
    feats = _features()
    ids = {"base": [f"e{i}" for i in range(40)], "tuned": [f"e{i}" for i in range(40)]}
    ids["tuned"][5] = "other"
    with pytest.raises(ValueError, match=r"ids differ between model 'base' and model 'tuned' at row 5"):
        similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(), ids=ids)
    with pytest.raises(ValueError, match="names model 'control'"):
        similarity_rows("t", feats, [("base", "control")], SimilarityConfig())


def test_debiased_needs_four_examples():
    x, y = make_pair(3, 2)
    with pytest.raises(ValueError, match="at least 4 examples"):
        cka(x, y, debiased=True)
    assert math.isfinite(cka(x, y))


def test_zero_variance_is_nan_with_a_warning():
    x, _ = make_pair(20, 3)
    const = np.ones((20, 3), dtype=np.float16) * 7
    with pytest.warns(SimilarityWarning, match="zero variance"):
        assert math.isnan(cka(x, const))
    with pytest.warns(SimilarityWarning):
        assert math.isnan(cka(const, x, debiased=True))


@pytest.mark.parametrize("fn", [svcca, pwcca, procrustes, mutual_knn])
def test_zero_variance_is_nan_for_every_other_measure(fn):
    x, _ = make_pair(20, 3)
    const = np.full((20, 3), 7.0)
    with pytest.warns(SimilarityWarning, match="zero variance"):
        assert math.isnan(fn(x, const))


def test_nan_policy_error_names_layer_and_example_and_mask_drops_jointly():
    feats = _features()
    feats["tuned"][7, 2, 1] = np.nan
    ids = [f"e{i}" for i in range(40)]
    with pytest.raises(ValueError, match=r"model 'tuned' has NaN/inf at layer 2 for example 'e7'"):
        similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(), ids=ids)
    with pytest.warns(SimilarityWarning, match="dropped 1 of 40"):
        rows = similarity_rows("t", feats, [("base", "tuned")], SimilarityConfig(nan_policy="mask"), ids=ids)
    keep = np.arange(40) != 7
    assert rows[0]["n"] == 39
    want = ref_linear(feats["base"][keep, 0], feats["tuned"][keep, 0])  # example 7 gone from BOTH models
    assert rows[0]["value"] == pytest.approx(want, abs=1e-6)


def test_config_validation_and_yaml_mirror():
    import dataclasses
    from pathlib import Path

    import yaml

    with pytest.raises(ValueError, match="similarity.measures='cca'"):
        SimilarityConfig(measures=["cca"])
    with pytest.raises(ValueError, match="similarity.nan_policy"):
        SimilarityConfig(nan_policy="drop")
    with pytest.raises(ValueError, match="minibatch_cka"):
        SimilarityConfig(stream_batch_size=64, cross_layer=True)
    with pytest.raises(ValueError, match="stream_batch_size"):
        SimilarityConfig(measures=["rbf_cka"], stream_batch_size=64)
    conf = yaml.safe_load((Path(__file__).parents[1] / "conf" / "similarity" / "default.yaml").read_text())
    defaults = SimilarityConfig()
    assert conf.pop("defaults") == ["schema"]  # the typed schema registered by layerprobe.config
    assert set(conf) == {f.name for f in dataclasses.fields(SimilarityConfig)}
    assert all(conf[k] == getattr(defaults, k) for k in conf)


# ----------------------------------------------------------------------------------------
# Diagnostics


def test_diagnostics_rogue_dimension_and_exact_leave_one_out():
    feats = _features(n=30, layers=2, d=5)
    feats["base"][:, :, 3] *= 20.0  # a rogue dimension
    feats["tuned"][4] += 15.0  # an outlier example
    ids = [f"e{i}" for i in range(30)]
    rows = diagnostics_rows("t", feats, [("base", "tuned")], SimilarityConfig(diagnostics_top_k=2), ids=ids)
    rogue = next(r for r in rows if r["diagnostic"] == "top_dim_variance_share" and r["model_a"] == "base" and r["layer"] == 0)
    x = feats["base"][:, 0].astype(np.float64)
    var = ((x - x.mean(0)) ** 2).sum(0)
    assert rogue["dim"] == 3 and rogue["value"] == pytest.approx(var.max() / var.sum())
    loo = [r for r in rows if r["diagnostic"].startswith("loo_delta") and r["layer"] == 1]
    assert loo[0]["example_id"] == "e4"  # the highest-norm example comes first
    keep = np.arange(30) != 4
    a, b = feats["base"][:, 1], feats["tuned"][:, 1]
    for r in loo[:2]:
        debiased = r["diagnostic"].endswith("debiased_cka")
        want = ref_linear(a[keep], b[keep], debiased) - ref_linear(a, b, debiased)
        assert r["value"] == pytest.approx(want, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu():
    a, b = make_pair(64, 12, seed=40, layers=3)
    ta, tb = torch.tensor(a, dtype=torch.float16, device="cuda"), torch.tensor(b, dtype=torch.float32, device="cuda")
    got = cka_matrix(ta, tb, debiased=True)
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), cka_matrix(a.astype(np.float16), b.astype(np.float32), debiased=True), atol=1e-6)
    cfg = SimilarityConfig(measures=["linear_cka", "debiased_cka", "mutual_knn", "procrustes"], bootstrap=10, permutations=10, device="cuda", knn_k=5)
    on_gpu = similarity_rows("t", {"a": ta, "b": tb}, [("a", "b")], cfg)
    cfg.device = "cpu"
    on_cpu = similarity_rows("t", {"a": ta.cpu(), "b": tb.cpu()}, [("a", "b")], cfg)
    for g, c in zip(on_gpu, on_cpu):
        assert g["value"] == pytest.approx(c["value"], abs=1e-6)
