"""Centred kernel alignment: linear, RBF and debiased (U-statistic) CKA, one pair or all layer pairs.

Every estimator here is a function of a few statistics of the two Gram matrices K (model a,
one layer) and L (model b, one layer), collected in `GramStats`:

    cross  = sum_{i != j} K_ij L_ij      self_a = sum_{i != j} K_ij^2
    diag   = K_ii                        rows   = sum_{j != i} K_ij

Biased HSIC is tr(K H L H) (Kornblith et al. 2019); debiased HSIC is the U-statistic of
Song et al. (2012), equal to Szekely & Rizzo's U-centred inner product:

    hsic_u = [cross + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) (K~1).(L~1)] / (n(n-3))

with K~ = K with its diagonal set to zero. Keeping the diagonal out of `cross` matters:
for unrelated data the diagonal terms dominate tr(KL) and cancel against the correction
terms, so summing them separately (in float64, from the features) avoids that cancellation.

The statistics come either from Gram blocks (n x n, cost ~ n^2 d per layer, then one GEMM
for all layer pairs) or, for the linear kernel, from feature-space moments (cost ~ n d^2
per pair); `feature_space_is_cheaper` picks by operation count.
"""

import concurrent.futures
import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ._arrays import (
    SimilarityWarning,
    as_output,
    check_pair,
    device_of,
    input_bits,
    is_torch,
    joint_rows,
    num_examples,
    read_layer,
    resolve_layers,
)
from .config import SimilarityError

# Upper bound on the Gram tile buffers held at once (float64 tiles of both models' layers plus a float32 scratch tile).
GRAM_BLOCK_BYTES = 96 << 20
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_ROW_CHUNK = 256  # rows of one layer processed together while they are in cache


@dataclass
class GramStats:
    """Sufficient statistics of CKA for layers A (rows) x layers B (columns), all float64.

    paired=True holds only the matched pairs (A[l], B[l]): `cross` is [L] instead of [La, Lb].
    """

    n: int
    cross: torch.Tensor
    self_a: torch.Tensor
    self_b: torch.Tensor
    diag_a: torch.Tensor
    diag_b: torch.Tensor
    rows_a: torch.Tensor
    rows_b: torch.Tensor
    zero_a: torch.Tensor
    zero_b: torch.Tensor
    paired: bool

    def _dot(self, u, v):
        return (u * v).sum(-1) if self.paired else u @ v.T

    def _outer(self, s, t):
        return s * t if self.paired else s[:, None] * t[None, :]

    def hsic(self, debiased: bool):
        """(numerator, self term of A, self term of B); CKA = num / sqrt(self_a * self_b).

        Scale factors common to all three (1/(n-1)^2, 1/(n(n-3))) cancel and are left out.
        """
        n = self.n
        ra, rb = self.rows_a, self.rows_b
        if debiased:
            sa, sb = ra.sum(-1), rb.sum(-1)
            c1, c2 = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2)
            num = self.cross + c1 * self._outer(sa, sb) - c2 * self._dot(ra, rb)
            den_a = self.self_a + c1 * sa * sa - c2 * (ra * ra).sum(-1)
            den_b = self.self_b + c1 * sb * sb - c2 * (rb * rb).sum(-1)
            return num, den_a, den_b
        # tr(KHLH) = <K, L> - 2/n (K1).(L1) + (1'K1)(1'L1)/n^2, with <K, L> = cross + diag.diag
        ka, kb = ra + self.diag_a, rb + self.diag_b
        ta, tb = ka.sum(-1), kb.sum(-1)
        num = self.cross + self._dot(self.diag_a, self.diag_b) - (2.0 / n) * self._dot(ka, kb) + self._outer(ta, tb) / n**2
        den_a = self.self_a + (self.diag_a**2).sum(-1) - (2.0 / n) * (ka * ka).sum(-1) + ta * ta / n**2
        den_b = self.self_b + (self.diag_b**2).sum(-1) - (2.0 / n) * (kb * kb).sum(-1) + tb * tb / n**2
        return num, den_a, den_b

    def cka(self, debiased: bool) -> torch.Tensor:
        """CKA values; NaN (with a warning) where a layer has zero variance or its debiased self-HSIC is <= 0."""
        num, den_a, den_b = self.hsic(debiased)
        bad_a = self.zero_a | (den_a <= 0)
        bad_b = self.zero_b | (den_b <= 0)
        _warn_undefined(bad_a, bad_b, debiased)
        out = num / torch.sqrt(self._outer(den_a.clamp_min(1e-300), den_b.clamp_min(1e-300)))
        return _mask_bad(out, bad_a, bad_b, self.paired)

    def null_mean(self, debiased: bool) -> torch.Tensor:
        """Exact mean of CKA over all permutations of B's examples (closed form, no resampling).

        Debiased: exactly 0, because a U-centred Gram has zero row sums. Biased: the "bias
        floor" tr(Kc) tr(Lc) / ((n-1) |Kc| |Lc|), about d/(n+d) for isotropic noise.
        """
        num, den_a, den_b = self.hsic(debiased)
        if debiased:
            return _mask_bad(torch.zeros_like(num), self.zero_a | (den_a <= 0), self.zero_b | (den_b <= 0), self.paired)
        n = self.n
        tra = self.diag_a.sum(-1) - (self.rows_a + self.diag_a).sum(-1) / n
        trb = self.diag_b.sum(-1) - (self.rows_b + self.diag_b).sum(-1) / n
        out = self._outer(tra, trb) / ((n - 1) * torch.sqrt(self._outer(den_a.clamp_min(1e-300), den_b.clamp_min(1e-300))))
        return _mask_bad(out, self.zero_a | (den_a <= 0), self.zero_b | (den_b <= 0), self.paired)


def _mask_bad(values, bad_a, bad_b, paired):
    bad = (bad_a | bad_b) if paired else (bad_a[:, None] | bad_b[None, :])
    return values.masked_fill(bad, math.nan)


def _warn_undefined(bad_a, bad_b, debiased):
    if bool(bad_a.any()) or bool(bad_b.any()):
        what = "zero variance or a non-positive debiased self-HSIC" if debiased else "zero variance"
        warnings.warn(
            f"CKA is NaN for {int(bad_a.sum())} layer(s) of model a and {int(bad_b.sum())} of model b: {what} "
            "(a constant representation has no similarity to measure)",
            SimilarityWarning,
            stacklevel=4,
        )


# ----------------------------------------------------------------------------------------
# Gram sources: where Gram blocks K[:, I, J] come from


class LinearGrams:
    """Centred features of several layers, [L, n, d]; linear Gram blocks X_I X_J' formed on demand.

    Only the products over features use the features' dtype (float32 by default); the
    diagonal K_ii = |x_i|^2, the row sums and every sum over examples are float64.
    """

    def __init__(self, x: torch.Tensor, diag: torch.Tensor, rows: torch.Tensor, raw_scale: torch.Tensor):
        self.x, self.diag, self.rows = x, diag, rows
        self.zero = zero_variance(diag.sum(1), raw_scale, diag.shape[1])
        self.n = diag.shape[1]
        self._stored = None

    def block(self, i: slice, j: slice, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """K[:, i, j] for every layer; `out` (contiguous, [L, |i|, |j|], features' dtype) is reused if given."""
        with exact_matmul():
            return torch.bmm(self.x[:, i], self.x[:, j].transpose(1, 2), out=out)

    def row_sums(self) -> torch.Tensor:
        return self.rows

    def stored(self) -> "StoredGrams":
        """The full Grams [L, n, n], formed on first use (resampling indexes into them)."""
        if self._stored is None:
            self._stored = StoredGrams(self.block(slice(None), slice(None)), self.diag, self.zero)
        return self._stored


class StoredGrams:
    """Full Gram matrices [L, n, n] held in memory (RBF kernels, resampling)."""

    def __init__(self, grams: torch.Tensor, diag: torch.Tensor, zero: torch.Tensor):
        self.grams, self.diag, self.zero = grams, diag, zero
        self.n = grams.shape[-1]

    def block(self, i: slice, j: slice, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        # A view: nothing to compute, so `out` (a scratch buffer for computed blocks) is not needed.
        return self.grams[:, i, j]

    def row_sums(self) -> torch.Tensor:
        return self.grams.sum(-1, dtype=torch.float64) - self.grams.diagonal(dim1=1, dim2=2).to(torch.float64)

    def take(self, idx: torch.Tensor) -> "StoredGrams":
        """The Grams of the examples `idx` (a resample or a permutation), without touching features."""
        return StoredGrams(self.grams[:, idx][:, :, idx], self.diag[:, idx], self.zero)


def zero_variance(centred_ss: torch.Tensor, raw_ss: torch.Tensor, n: int) -> torch.Tensor:
    # Centring identical rows in float64 leaves residue of order n*eps relative to the raw
    # values; anything below that is a constant representation, not a tiny signal.
    return centred_ss <= (64 * n * 2.0**-52) ** 2 * raw_ss.clamp_min(1e-300)


def linear_grams(x, layers: Sequence[int], device, dtype: torch.dtype, rows=None) -> LinearGrams:
    """Read, centre and keep each layer in `dtype`, layer by layer (no float64 copy of the stack)."""
    n = num_examples(x) if rows is None else len(rows)
    f64 = dict(dtype=torch.float64, device=device)
    feats = torch.empty(len(layers), n, int(x.shape[-1]), dtype=dtype, device=device)
    diag, sums, raw = torch.empty(len(layers), n, **f64), torch.empty(len(layers), n, **f64), torch.empty(len(layers), **f64)

    def centre(p):
        return _centre_into(x, layers[p], rows, feats[p], diag[p], sums[p])

    # numpy prepares CPU layers single-threaded (see _centre_into), so layers go to a thread
    # each (numpy releases the GIL in these loops): 2 threads halve this step on 2 cores.
    # Torch inputs are already spread over cores by torch itself.
    workers = min(torch.get_num_threads(), len(layers)) if not is_torch(x) and feats.device.type == "cpu" else 1
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            means = list(pool.map(centre, range(len(layers))))
    else:
        means = [centre(p) for p in range(len(layers))]
    for p, mean in enumerate(means):
        raw[p] = n * mean.dot(mean) + diag[p].sum()  # sum |x_i|^2 = sum |x_i - mean|^2 + n |mean|^2
    return LinearGrams(feats, diag, sums - diag, raw)


def _centre_into(x, layer, rows, out: torch.Tensor, sq_norms: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor:
    """out <- layer - mean; sq_norms <- |out_i|^2 and row_sums <- out_i . sum_j out_j, in float64.

    Returns the float64 mean. Stores of 32 bits or fewer are centred in float32 when `out` is
    float32: x_i - fl(mean) is exact up to float32 rounding of the result, and the only other
    error, fl(mean) - mean, is one shift common to every row, which CKA from Grams ignores
    (the row sums of K = out out' carry it, so the formulas stay exact for the data as stored).
    numpy inputs bound for the CPU are prepared with numpy: these steps are memory-bound and
    single-threaded numpy avoids torch's per-op thread synchronisation.
    """
    work = out.dtype if input_bits(x) <= 32 else torch.float64
    if not is_torch(x) and out.device.type == "cpu":
        part = x[:, layer] if rows is None else x[:, layer][rows]
        n = part.shape[0]
        mean = part.sum(0, dtype=np.float64) / n
        calc = torch.empty((), dtype=work).numpy().dtype
        shift = mean.astype(calc)
        # sum_j out_j = n (mean - shift): the part of the mean that rounding the shift left in
        # (each subtraction's own rounding adds ~1e-7 relative noise, the level of float32 Grams).
        total = (n * (mean - shift.astype(np.float64))).astype(out.numpy().dtype)
        dst, sq, rs = out.numpy(), sq_norms.numpy(), row_sums.numpy()
        for i in range(0, n, _ROW_CHUNK):  # one sweep in cache-sized chunks: the layer is read from RAM once
            c = dst[i : i + _ROW_CHUNK]
            np.subtract(part[i : i + _ROW_CHUNK], shift, out=c, dtype=calc, casting="unsafe")
            sq[i : i + _ROW_CHUNK] = np.einsum("ij,ij->i", c, c, dtype=np.float64)
            rs[i : i + _ROW_CHUNK] = c @ total
        return torch.from_numpy(mean)
    raw = read_layer(x, layer, out.device, rows, work)
    mean = raw.sum(0, dtype=torch.float64) / raw.shape[0]
    if work == out.dtype:
        torch.sub(raw, mean.to(work), out=out)
    else:
        out.copy_(raw - mean)
    sq_norms.copy_(torch.linalg.vector_norm(out, dim=1, dtype=torch.float64).square())
    row_sums.copy_(out @ out.sum(0, dtype=torch.float64).to(out.dtype))
    return mean


def centred_with_scale(x, layer, device, rows=None):
    """One layer centred in float64, and its raw sum of squares (the scale of `zero_variance`)."""
    raw = read_layer(x, layer, device, rows)
    return raw - raw.mean(0, keepdim=True), raw.square().sum()


def rbf_grams(x, layers: Sequence[int], device, dtype: torch.dtype, threshold: float, rows=None) -> StoredGrams:
    """RBF Grams exp(-|xi - xj|^2 / (2 t^2 median |xi - xj|^2)), Kornblith et al.'s bandwidth rule.

    The median runs over all n^2 entries (diagonal zeros included), as in the reference code
    of Kornblith et al. (2019), so results match theirs. When that median is 0 (half or more
    of the distances are zero: many tied examples) the median of the nonzero distances is
    used, with a warning. Distances come from float64 products.
    """
    grams, zero = [], []
    for layer in layers:
        c, ss = centred_with_scale(x, layer, device, rows)
        sq = (c * c).sum(1)
        with exact_matmul():
            d2 = (sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)).clamp_min(0.0)
        med = _median(d2.flatten())
        flat = bool(zero_variance(sq.sum(), ss, len(sq)))
        if not flat and float(med) <= 0.0:
            # Half or more of the pairwise distances are zero (tied examples): Kornblith et al.'s median
            # over all n^2 entries is 0, so fall back to the median of the nonzero distances.
            nonzero = d2[d2 > 0]
            share = 1.0 - nonzero.numel() / d2.numel()
            warnings.warn(
                f"rbf_cka: {share:.0%} of pairwise squared distances are zero (tied examples), so the median of all of them is 0; "
                "the bandwidth uses the median of the nonzero distances instead",
                SimilarityWarning,
                stacklevel=4,
            )
            med = _median(nonzero)
        zero.append(flat)
        grams.append(torch.exp(-d2 / (2.0 * threshold**2 * med)).to(dtype) if not flat else torch.zeros_like(d2, dtype=dtype))
    n = grams[0].shape[0]
    ones = torch.ones(len(grams), n, dtype=torch.float64, device=device)
    return StoredGrams(torch.stack(grams), ones, torch.tensor(zero, device=device))


def _median(v: torch.Tensor) -> torch.Tensor:
    """numpy's median: the mean of the two middle values when the count is even."""
    k = v.numel()
    lo = torch.kthvalue(v, (k + 1) // 2).values
    return lo if k % 2 else 0.5 * (lo + torch.kthvalue(v, k // 2 + 1).values)


@contextlib.contextmanager
def exact_matmul():
    """TF32 would cut float32 products to 10 mantissa bits on Ampere+ GPUs; keep full float32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------------------
# Statistics from Gram blocks (any kernel) or from features (linear kernel)


def gram_tiles(n: int, r_max: int, leaf: int = 128) -> list:
    """(rows, cols, weight) tiles covering the upper triangle of a symmetric n x n matrix once.

    Equal blocks of at most r_max rows; an off-diagonal block stands for its transpose too
    (weight 2). A diagonal block is split in halves, recursively, down to about `leaf` rows:
    a whole diagonal tile computes both of its triangles, so with 5 blocks of 400 rows the
    diagonal blocks alone would add 20% to the n^2/2 Gram products; halving them to 200 rows
    (which run at the same GEMM speed, measured on CPU) cuts that to 10%, and smaller leaves
    gain nothing because small GEMMs run slower.
    """
    r = -(-n // -(-n // r_max))  # equal blocks of at most r_max rows
    starts = list(range(0, n, r))
    tiles = []
    for p, i0 in enumerate(starts):
        i = slice(i0, min(i0 + r, n))
        _diagonal_tiles(i, leaf, tiles)
        tiles.extend((i, slice(j0, min(j0 + r, n)), 2.0) for j0 in starts[p + 1 :])
    return tiles


def _diagonal_tiles(s: slice, leaf: int, tiles: list) -> None:
    m = s.stop - s.start
    if m < 2 * leaf:
        tiles.append((s, s, 1.0))
        return
    lo, hi = slice(s.start, s.start + m // 2), slice(s.start + m // 2, s.stop)
    _diagonal_tiles(lo, leaf, tiles)
    tiles.append((lo, hi, 2.0))
    _diagonal_tiles(hi, leaf, tiles)


_GEMM_CHUNK = 8192  # columns per batch entry in _add_products


def _add_products(out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: float) -> None:
    """out += alpha * u @ v.T for [ku, m] u and [kv, m] v with m >> ku, kv (flattened Gram tiles).

    One GEMM with so few rows and so long an inner dimension is poorly parallelised by MKL:
    25 x 25 pairs of 160 000-long float64 rows took 12-15 ms on 2 CPU cores, the same
    products as a batch over 8192-column chunks, summed in float64, 7.5 ms (measured).
    Same float64 sums, only grouped differently.
    """
    q = u.shape[1] // _GEMM_CHUNK
    if q > 1:
        m = q * _GEMM_CHUNK
        uc = u[:, :m].view(u.shape[0], q, _GEMM_CHUNK).transpose(0, 1)
        vc = v[:, :m].view(v.shape[0], q, _GEMM_CHUNK).permute(1, 2, 0)
        out.add_(torch.bmm(uc, vc).sum(0), alpha=alpha)
        u, v = u[:, m:], v[:, m:]
    if u.shape[1]:
        out.addmm_(u, v.T, alpha=alpha)


def _dots(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of [k, m] matrices as one batched BLAS call (no [k, m] temporary)."""
    return torch.bmm(u.unsqueeze(1), v.unsqueeze(2)).view(-1)


def gram_stats(src_a, src_b, paired: bool) -> GramStats:
    """GramStats from upper-triangular tiles of the n x n Grams of every layer of both models.

    Each tile of all layers is copied into one float64 buffer [La+Lb, h, w] with its
    diagonal zeroed (`diag` carries K_ii exactly), then one float64 GEMM of model a's
    flattened tiles with model b's adds every cross term <K_a, L_b>, and batched dot
    products add the self terms <K_a, K_a>; within one model a single GEMM gives both.
    Only the La x Lb pairs that are needed are multiplied (not all (La+Lb)^2), and the
    buffers are allocated once and reused: a fresh 64 MB buffer per tile cost more in page
    faults than the copy itself. The float64 accumulation is what keeps the debiased
    estimate exact: for unrelated data its numerator is a small difference of large sums.
    """
    n = src_a.n
    same = src_b is src_a
    la, lb = src_a.diag.shape[0], src_b.diag.shape[0]
    k = la if same else la + lb
    dev = src_a.diag.device
    r_max = max(64, int(math.sqrt(GRAM_BLOCK_BYTES / (12 * k))))  # float64 buffer + float32 block
    tiles = gram_tiles(n, r_max)
    cap = max((i.stop - i.start) * (j.stop - j.start) for i, j, _ in tiles)
    buf = torch.empty(k * cap, dtype=torch.float64, device=dev)
    scratch = {}  # computed (not stored) Gram blocks land here, one buffer per dtype
    f64 = dict(dtype=torch.float64, device=dev)
    if same:
        g = None if paired else torch.zeros(la, la, **f64)
        sq = torch.zeros(la, **f64)
    else:
        cross = torch.zeros(la, **f64) if paired else torch.zeros(la, lb, **f64)
        sq = torch.zeros(k, **f64)

    def fill(src, dst, i, j):
        out = None
        if isinstance(src, LinearGrams):
            dt = src.x.dtype
            if dt == dst.dtype:
                out = dst  # float64 products go straight into the buffer
            else:
                if dt not in scratch:
                    scratch[dt] = torch.empty(max(la, lb) * cap, dtype=dt, device=dev)
                out = scratch[dt][: dst.numel()].view(dst.shape)
        got = src.block(i, j, out=out)
        if got is not dst:
            dst.copy_(got)

    for i, j, w in tiles:
        h, wd = i.stop - i.start, j.stop - j.start
        block = buf[: k * h * wd].view(k, h, wd)
        fill(src_a, block[:la], i, j)
        if not same:
            fill(src_b, block[la:], i, j)
        if i.start == j.start:
            block.diagonal(dim1=1, dim2=2).zero_()
        flat = block.view(k, -1)
        if same and not paired:
            _add_products(g, flat, flat, w)
            continue
        sq.add_(_dots(flat, flat), alpha=w)
        if same:
            continue
        if paired:  # only (a_l, b_l)
            cross.add_(_dots(flat[:la], flat[la:]), alpha=w)
        else:
            _add_products(cross, flat[:la], flat[la:], w)
    if same:
        self_a = self_b = sq if paired else g.diagonal()
        cross = self_a if paired else g
    else:
        self_a, self_b = sq[:la], sq[la:]
    rows_a = src_a.row_sums()
    rows_b = rows_a if same else src_b.row_sums()
    return GramStats(n, cross, self_a, self_b, src_a.diag, src_b.diag, rows_a, rows_b, src_a.zero, src_b.zero, paired)


def _frob2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|X'Y|_F^2 over the last two dims (sum_{i,j} K_ij L_ij of the linear kernels), any leading dims."""
    return (x.transpose(-1, -2) @ y).square().sum((-1, -2))


def feature_stats(xa: Sequence[torch.Tensor], xb: Sequence[torch.Tensor], paired: bool, raw_a, raw_b) -> GramStats:
    """GramStats of linear kernels from centred float64 features, without forming n x n Grams.

    With centred X, K1 = 0, so the off-diagonal row sums are -diag, and
    sum_{i != j} K_ij L_ij = |X'Y|_F^2 - sum_i K_ii L_ii.
    """
    n = xa[0].shape[0]
    diag_a = torch.stack([(x * x).sum(1) for x in xa])
    diag_b = torch.stack([(y * y).sum(1) for y in xb])
    self_a = torch.stack([_frob2(x, x) for x in xa]) - (diag_a**2).sum(1)
    self_b = torch.stack([_frob2(y, y) for y in xb]) - (diag_b**2).sum(1)
    if paired:
        cross = torch.stack([_frob2(x, y) for x, y in zip(xa, xb)]) - (diag_a * diag_b).sum(1)
    else:
        cross = torch.stack([torch.stack([_frob2(x, y) for y in xb]) for x in xa]) - diag_a @ diag_b.T
    zero_a = zero_variance(diag_a.sum(1), raw_a, n)
    zero_b = zero_variance(diag_b.sum(1), raw_b, n)
    return GramStats(n, cross, self_a, self_b, diag_a, diag_b, -diag_a, -diag_b, zero_a, zero_b, paired)


def feature_stats_batched(xa: torch.Tensor, xb: torch.Tensor, raw_a: torch.Tensor, raw_b: torch.Tensor) -> GramStats:
    """Paired GramStats of many matched feature sets at once: `feature_stats` (paired) over the
    leading dims. xa [..., n, da], xb [..., n, db] (centred float64; broadcastable leading dims,
    e.g. [L, resamples]), raw_a, raw_b: their raw sums of squares over those dims."""
    n = xb.shape[-2]
    diag_a, diag_b = (xa * xa).sum(-1), (xb * xb).sum(-1)
    self_a = _frob2(xa, xa) - (diag_a**2).sum(-1)
    self_b = _frob2(xb, xb) - (diag_b**2).sum(-1)
    cross = _frob2(xa, xb) - (diag_a * diag_b).sum(-1)
    shape = cross.shape
    diag_a, self_a = diag_a.expand(*shape, n), self_a.expand(shape)
    zero_a, zero_b = zero_variance(diag_a.sum(-1), raw_a, n), zero_variance(diag_b.sum(-1), raw_b, n)
    return GramStats(n, cross, self_a, self_b, diag_a, diag_b, -diag_a, -diag_b, zero_a, zero_b, paired=True)


def feature_space_is_cheaper(n: int, da: int, db: int, la: int, lb: int, paired: bool, gram_dtype: str) -> bool:
    """Operation count of feature-space moments (float64) vs Gram blocks (gram_dtype)."""
    pairs = la if paired else la * lb
    feature = pairs * n * da * db + n * (la * da * da + lb * db * db) / 2
    gram = n * n * (la * da + lb * db) / 2 + pairs * n * n
    if gram_dtype == "float32":  # float32 products run about twice as fast as float64
        gram /= 2
    return feature < gram


def linear_stats(a, b, layers_a, layers_b, paired, device, gram_dtype, rows=None) -> GramStats:
    """GramStats of the linear kernel, from features or Grams, whichever costs less."""
    n = num_examples(a) if rows is None else len(rows)
    da, db = int(a.shape[-1]), int(b.shape[-1])
    if feature_space_is_cheaper(n, da, db, len(layers_a), len(layers_b), paired, gram_dtype):
        ca = [centred_with_scale(a, l, device, rows) for l in layers_a]
        cb = ca if (b is a and list(layers_b) == list(layers_a)) else [centred_with_scale(b, l, device, rows) for l in layers_b]
        return feature_stats([c for c, _ in ca], [c for c, _ in cb], paired, torch.stack([s for _, s in ca]), torch.stack([s for _, s in cb]))
    dtype = DTYPES[gram_dtype]
    src_a = linear_grams(a, layers_a, device, dtype, rows)
    src_b = src_a if (b is a and list(layers_b) == list(layers_a)) else linear_grams(b, layers_b, device, dtype, rows)
    return gram_stats(src_a, src_b, paired)


# ----------------------------------------------------------------------------------------
# Public API


def cka_matrix(
    a,
    b=None,
    debiased: bool = False,
    kernel: str = "linear",
    rbf_threshold: float = 1.0,
    layers_a: Optional[Sequence[int]] = None,
    layers_b: Optional[Sequence[int]] = None,
    gram_dtype: str = "float32",
    nan_policy: str = "error",
    device=None,
):
    """CKA between every layer of `a` [n, La, da] and every layer of `b` [n, Lb, db] -> [La, Lb].

    `b=None` gives the within-model matrix of `a`. Inputs may be numpy arrays, memmaps or
    torch tensors on any device; the result is float64 of the same kind (torch stays on
    the input's device). NaN marks layers with zero variance (with a warning).
    """
    b = check_pair(a, b, 3)
    la = resolve_layers(a, layers_a, "a")
    lb = resolve_layers(b, layers_b, "b")
    if nan_policy not in ("error", "mask"):
        raise SimilarityError(f"nan_policy={nan_policy!r} is invalid; use 'error' or 'mask'")
    check_sample_size(num_examples(a), debiased)
    dev = device_of(a, device)
    models = {"a": a, "b": b} if b is not a else {"a": a}
    # NaN/inf anywhere in a row makes that row's float64 |x_i|^2 non-finite, so the linear
    # kernel needs no separate scan of the store unless something is wrong.
    rows = None if kernel == "linear" else joint_rows(models, {"a": la, "b": lb}, nan_policy)
    st = _stats(a, b, la, lb, False, dev, kernel, rbf_threshold, gram_dtype, rows)
    if not (bool(torch.isfinite(st.diag_a).all()) and bool(torch.isfinite(st.diag_b).all())):
        rows = joint_rows(models, {"a": la, "b": lb}, nan_policy)  # raises for nan_policy="error"
        check_sample_size(len(rows), debiased)
        st = _stats(a, b, la, lb, False, dev, kernel, rbf_threshold, gram_dtype, rows)
    return as_output(st.cka(debiased), a if is_torch(a) else b)


def cka(x, y, kernel: str = "linear", debiased: bool = False, rbf_threshold: float = 1.0, gram_dtype: str = "float32", device=None) -> float:
    """CKA between two representations x [n, dx] and y [n, dy] of the same n examples.

    kernel: ``linear`` or ``rbf`` (bandwidth = rbf_threshold x median distance).
    debiased: the U-statistic estimator (Song et al. 2012), ~0 for unrelated data at any n/d.
    """
    check_pair(x, y, 2, ("x", "y"))
    return float(cka_matrix(x[:, None], y[:, None], debiased, kernel, rbf_threshold, gram_dtype=gram_dtype, device=device)[0, 0])


def linear_cka(x, y, debiased: bool = False, **kw) -> float:
    """Linear CKA (Kornblith et al. 2019): |Xc'Yc|_F^2 / (|Xc'Xc|_F |Yc'Yc|_F)."""
    return cka(x, y, "linear", debiased, **kw)


def debiased_cka(x, y, kernel: str = "linear", rbf_threshold: float = 1.0, **kw) -> float:
    """Debiased CKA: CKA with the unbiased HSIC estimator of Song et al. (2012)."""
    return cka(x, y, kernel, True, rbf_threshold, **kw)


def rbf_cka(x, y, threshold: float = 1.0, debiased: bool = False, **kw) -> float:
    """RBF-kernel CKA, bandwidth = threshold x median pairwise distance (Kornblith et al. 2019)."""
    return cka(x, y, "rbf", debiased, threshold, **kw)


def bias_floor(n: int, d_x: int, d_y: Optional[int] = None) -> float:
    """Approximate biased linear CKA between unrelated isotropic representations of widths d_x, d_y.

    sqrt(d_x d_y / ((n + d_x)(n + d_y))), which is d / (n + d) when d_x = d_y = d (d_y=None).
    """
    d_y = d_x if d_y is None else d_y
    if n < 1 or d_x < 1 or d_y < 1:
        raise SimilarityError(f"bias_floor needs n >= 1 and widths >= 1, got n={n}, d_x={d_x}, d_y={d_y}")
    return math.sqrt(d_x * d_y / ((n + d_x) * (n + d_y)))


def check_sample_size(n: int, debiased: bool) -> None:
    if debiased and n < 4:
        raise SimilarityError(f"debiased CKA needs at least 4 examples, got {n}; compare more examples or use the biased estimator")
    if n < 2:
        raise SimilarityError(f"CKA needs at least 2 examples, got {n}; compare more examples")


def _stats(a, b, la, lb, paired, device, kernel, rbf_threshold, gram_dtype, rows) -> GramStats:
    if gram_dtype not in DTYPES:
        raise SimilarityError(f"gram_dtype={gram_dtype!r} is invalid; use one of {list(DTYPES)}")
    if kernel == "linear":
        return linear_stats(a, b, la, lb, paired, device, gram_dtype, rows)
    if kernel == "rbf":
        dtype = DTYPES[gram_dtype]
        src_a = rbf_grams(a, la, device, dtype, rbf_threshold, rows)
        src_b = src_a if (b is a and la == lb) else rbf_grams(b, lb, device, dtype, rbf_threshold, rows)
        return gram_stats(src_a, src_b, paired)
    raise SimilarityError(f"kernel={kernel!r} is invalid; use 'linear' or 'rbf'")
