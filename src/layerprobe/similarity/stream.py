"""Streaming similarity for n too large for n x n Grams; memory does not grow with n.

Two estimators, both reading a few examples at a time from memory-mapped stores and both
summable across ranks (pass `all_reduce`, or let torch.distributed do it when initialised):

- `streaming_cka`: EXACT linear CKA, biased and debiased, for matched layers, from raw
  feature moments (sums of x, x x', x y', |x|^2, |x|^4, |x|^2 x, ...) accumulated in float64
  about a fixed shift (the first batch's mean), which keeps the moments small so the final
  centring cancels little. Memory: three d x d matrices for the layer being read.
- `minibatch_cka`: the layer x layer matrix as in Nguyen, Raghu & Kornblith (2021):
  average the unbiased HSIC (U-statistic) of each minibatch, then
  CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) mean HSIC(L, L)). Each batch's HSIC is
  unbiased, so the average is too, and the ratio converges to the population CKA that
  debiased CKA estimates; at finite n it is a different (noisier) estimate than
  full-sample debiased CKA. Memory: one batch's Grams.
"""

import math
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ._arrays import SimilarityWarning, as_output, check_pair, device_of, joint_rows, num_examples, read_layer, resolve_layers
from .config import NAN_POLICIES, SimilarityError
from .estimators import DTYPES, _warn_undefined, check_sample_size, gram_stats, linear_grams, zero_variance

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def default_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks when torch.distributed is initialised; identity otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def local_only(t: torch.Tensor) -> torch.Tensor:
    """No reduction: similarity_rows gives every rank all the rows it compares."""
    return t


def _batches(rows: Optional[np.ndarray], n_store: int, batch_size: int):
    """Consecutive store rows (all, or the kept ones) in batches."""
    total = n_store if rows is None else len(rows)
    for start in range(0, total, batch_size):
        yield np.arange(start, min(start + batch_size, total)) if rows is None else rows[start : start + batch_size]


# ----------------------------------------------------------------------------------------
# Exact moments for matched layers


class PairMoments:
    """Raw moments of one layer pair (x from model a, y from model b), all float64."""

    NAMES = ("n", "sx", "sy", "sxx", "syy", "sxy", "sa", "sb", "saa", "sbb", "sab", "sax", "say", "sbx", "sby")

    def __init__(self, da: int, db: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)
        self.n = z(())
        self.sx, self.sy = z(da), z(db)
        self.sxx, self.syy, self.sxy = z(da, da), z(db, db), z(da, db)
        self.sa, self.sb, self.saa, self.sbb, self.sab = z(()), z(()), z(()), z(()), z(())
        self.sax, self.say, self.sbx, self.sby = z(da), z(db), z(da), z(db)
        self.shift_a2 = self.shift_b2 = 0.0  # |shift|^2 of each side, for the zero-variance scale
        self.zero = (False, False)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of shifted examples x [m, da], y [m, db]."""
        a, b = (x * x).sum(1), (y * y).sum(1)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.syy += y.T @ y
        self.sxy += x.T @ y
        self.sa += a.sum()
        self.sb += b.sum()
        self.saa += (a * a).sum()
        self.sbb += (b * b).sum()
        self.sab += (a * b).sum()
        self.sax += a @ x
        self.say += a @ y
        self.sbx += b @ x
        self.sby += b @ y

    def all_reduce(self, reduce: AllReduce) -> None:
        flat = torch.cat([getattr(self, k).reshape(-1) for k in self.NAMES])
        flat = reduce(flat)
        at = 0
        for k in self.NAMES:
            t = getattr(self, k)
            t.copy_(flat[at : at + t.numel()].reshape(t.shape))
            at += t.numel()

    def result(self) -> dict:
        """Biased and debiased linear CKA and the biased null mean, from the moments alone.

        With k_i = |x_i - mu_x|^2 and l_i = |y_i - mu_y|^2 (the Gram diagonals of centred data):
        tr(KL) = |Cxy|_F^2 and debiased T = tr(KL) - n/(n-2) k.l + (sum k)(sum l)/((n-1)(n-2)).
        """
        n = float(self.n)
        mx, my = self.sx / n, self.sy / n
        cxx = self.sxx - n * torch.outer(mx, mx)
        cyy = self.syy - n * torch.outer(my, my)
        cxy = self.sxy - n * torch.outer(mx, my)
        kx = self.sa - n * mx.dot(mx)  # sum_i k_i
        ky = self.sb - n * my.dot(my)
        kk = self._sum_kk(self.saa, self.sax, self.sax, self.sxx, self.sa, self.sa, self.sx, self.sx, mx, mx, n)
        ll = self._sum_kk(self.sbb, self.sby, self.sby, self.syy, self.sb, self.sb, self.sy, self.sy, my, my, n)
        kl = self._sum_kk(self.sab, self.say, self.sbx, self.sxy, self.sa, self.sb, self.sx, self.sy, mx, my, n)
        txy, txx, tyy = cxy.square().sum(), cxx.square().sum(), cyy.square().sum()
        c1, c2 = n / (n - 2), 1.0 / ((n - 1) * (n - 2))
        deb = [txy - c1 * kl + c2 * kx * ky, txx - c1 * kk + c2 * kx * kx, tyy - c1 * ll + c2 * ky * ky]
        norm = torch.sqrt(txx * tyy)
        # zero variance relative to the raw (unshifted) scale, as on the batch path
        self.zero = (bool(zero_variance(kx, self.sa + n * self.shift_a2, int(n))), bool(zero_variance(ky, self.sb + n * self.shift_b2, int(n))))
        zero = any(self.zero)
        out = {
            "linear_cka": float(txy / norm),
            "debiased_cka": float(deb[0] / torch.sqrt(deb[1] * deb[2])) if deb[1] > 0 and deb[2] > 0 else math.nan,
            "null_linear_cka": float(kx * ky / ((n - 1) * norm)),
            "null_debiased_cka": 0.0,
        }
        if zero:
            out = {k: math.nan for k in out}
        return out

    @staticmethod
    def _sum_kk(sab, say, sbx, sxy, sa, sb, sx, sy, mx, my, n):
        """sum_i (a_i - 2 x_i.mx + |mx|^2)(b_i - 2 y_i.my + |my|^2), expanded into raw moments."""
        qx, qy = mx.dot(mx), my.dot(my)
        return (
            sab - 2 * my.dot(say) + qy * sa - 2 * mx.dot(sbx) + 4 * mx @ sxy @ my
            - 2 * qy * mx.dot(sx) + qx * sb - 2 * qx * my.dot(sy) + n * qx * qy
        )


def _check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in NAN_POLICIES:
        raise SimilarityError(f"nan_policy={nan_policy!r} is invalid; use one of {list(NAN_POLICIES)}")


def streaming_cka(a, b, batch_size: int = 1024, layers: Optional[Sequence[int]] = None, all_reduce: Optional[AllReduce] = None,
                  device=None, nan_policy: str = "error") -> dict:
    """Exact biased and debiased linear CKA of matched layers, reading `batch_size` rows at a time.

    a, b: [n, L+1, d] (memmaps welcome), this rank's share of the examples. Returns
    {"linear_cka": [L], "debiased_cka": [L], "null_linear_cka": [L], "null_debiased_cka": [L],
    "layers": [...], "n": n summed over ranks}. nan_policy as in `cka_matrix`: ``error`` names
    the first NaN/inf's layer and example, ``mask`` drops those examples from both models
    (one chunked pass over the stores). A constant layer gives NaN with a SimilarityWarning.
    """
    check_pair(a, b, 3)
    _check_nan_policy(nan_policy)
    la, lb = resolve_layers(a, layers, "a"), resolve_layers(b, layers, "b")
    rows = joint_rows({"a": a, "b": b}, {"a": la, "b": lb}, nan_policy)
    out = exact_layers(a, b, la, lb, batch_size, rows, device_of(a, device), all_reduce or default_all_reduce)
    out["layers"] = la
    return out


def exact_layers(xa, xb, la, lb, batch_size, rows, device, reduce) -> dict:
    """One pass per matched layer pair over the (kept) rows; memory is that layer's moments."""
    out = {"linear_cka": [], "debiased_cka": [], "null_linear_cka": [], "null_debiased_cka": [], "n": 0}
    zero_a, zero_b = [], []
    for layer_a, layer_b in zip(la, lb):
        shift_a, shift_b = _common_shift(xa, xb, layer_a, layer_b, rows, batch_size, device, reduce)
        mom = PairMoments(shift_a.numel(), shift_b.numel(), device)
        mom.shift_a2, mom.shift_b2 = float(shift_a.dot(shift_a)), float(shift_b.dot(shift_b))
        for idx in _batches(rows, num_examples(xa), batch_size):
            mom.update(read_layer(xa, layer_a, device, idx) - shift_a, read_layer(xb, layer_b, device, idx) - shift_b)
        mom.all_reduce(reduce)
        out["n"] = int(mom.n)
        check_sample_size(out["n"], True)
        for k, v in mom.result().items():
            out[k].append(v)
        zero_a.append(mom.zero[0])
        zero_b.append(mom.zero[1])
    _warn_undefined(torch.tensor(zero_a, dtype=torch.bool), torch.tensor(zero_b, dtype=torch.bool), False)
    return out


def _common_shift(a, b, layer_a, layer_b, rows, batch_size, dev, reduce):
    """The mean of the first batch, averaged over ranks, so every rank sums moments about one point."""
    first = next(_batches(rows, num_examples(a), batch_size), np.arange(0))
    xa = read_layer(a, layer_a, dev, first)
    xb = read_layer(b, layer_b, dev, first)
    packed = reduce(torch.cat([xa.sum(0), xb.sum(0), torch.tensor([float(len(first))], dtype=torch.float64, device=dev)]))
    count = packed[-1].clamp_min(1.0)
    return packed[: xa.shape[1]] / count, packed[xa.shape[1] : -1] / count


# ----------------------------------------------------------------------------------------
# Minibatch HSIC (Nguyen, Raghu & Kornblith 2021) for the layer x layer matrix


class MinibatchHSIC:
    """Per-batch unbiased HSIC of every (layer_a, layer_b) pair, summed (and kept for the bootstrap)."""

    def __init__(self, keep_batches: bool, gram_dtype: str = "float32"):
        # float32 Gram products carry ~1e-7 relative error per entry: a debiased self term below
        # this share of the biased one is rounding noise, not variance
        self.tol = 1e-5 if gram_dtype == "float32" else 1e-10
        self.sum = None
        self.batches = [] if keep_batches else None
        self.zero_a = self.zero_b = None

    def add(self, st) -> None:
        # A layer constant within one batch has a zero Gram there: its U-statistics are exactly 0,
        # an unbiased draw like any other, so the batch counts with zeros (never NaN). Only a layer
        # constant in every batch is undefined.
        za, zb = st.zero_a.clone(), st.zero_b.clone()
        self.zero_a = za if self.zero_a is None else self.zero_a & za
        self.zero_b = zb if self.zero_b is None else self.zero_b & zb
        m = st.n
        num, den_a, den_b = st.hsic(debiased=True)
        scale = 1.0 / (m * (m - 3))  # the U-statistic's own normaliser: batches may differ in size
        # the biased self terms |K|_F^2, |L|_F^2 give the scale below which a debiased self term is rounding noise
        mag_a = st.self_a + (st.diag_a**2).sum(-1)
        mag_b = st.self_b + (st.diag_b**2).sum(-1)
        vals = torch.cat([num.flatten(), den_a, den_b, mag_a, mag_b]) * scale
        self.sum = vals.clone() if self.sum is None else self.sum + vals
        if self.batches is not None:
            self.batches.append(vals)

    def cka(self, la: int, lb: int, total: torch.Tensor) -> torch.Tensor:
        at = la * lb
        den_a, den_b = total[at : at + la], total[at + la : at + la + lb]
        mag_a, mag_b = total[at + la + lb : at + 2 * la + lb], total[at + 2 * la + lb :]
        bad_a = self.zero_a | (den_a <= self.tol * mag_a)
        bad_b = self.zero_b | (den_b <= self.tol * mag_b)
        _warn_undefined(bad_a, bad_b, True)
        return _ratio(total, la, lb).masked_fill(bad_a[:, None] | bad_b[None, :], math.nan)

    def bootstrap(self, la, lb, resamples: int, level: float, seed: int):
        """Percentile interval from resampling whole batches with replacement (batches are independent)."""
        per = torch.stack(self.batches)
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randint(len(per), (resamples, len(per)), generator=gen).to(per.device)
        stats = torch.stack([_ratio(per[d].sum(0), la, lb) for d in draws])
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=stats.dtype, device=stats.device)
        lo, hi = torch.nanquantile(stats, q, dim=0)
        return lo, hi


def _ratio(total: torch.Tensor, la: int, lb: int) -> torch.Tensor:
    num = total[: la * lb].reshape(la, lb)
    den_a, den_b = total[la * lb : la * lb + la], total[la * lb + la : la * lb + la + lb]
    bad = (den_a <= 0)[:, None] | (den_b <= 0)[None, :]
    return (num / torch.sqrt(den_a.clamp_min(1e-300)[:, None] * den_b.clamp_min(1e-300)[None, :])).masked_fill(bad, math.nan)


def minibatch_cka(
    a,
    b=None,
    batch_size: int = 512,
    layers_a: Optional[Sequence[int]] = None,
    layers_b: Optional[Sequence[int]] = None,
    seed: int = 0,
    all_reduce: Optional[AllReduce] = None,
    gram_dtype: str = "float32",
    device=None,
    nan_policy: str = "error",
):
    """Minibatch CKA matrix [La, Lb] (Nguyen et al. 2021), never forming more than batch x batch Grams.

    Batches are a seeded shuffle (numpy default_rng(seed).permutation) of the compared
    examples split by numpy.array_split into n // batch_size parts (each at least
    `batch_size` >= 4 examples). b=None gives the within-model matrix. nan_policy as in
    `cka_matrix` (``mask`` drops NaN/inf examples from both models before batching). A
    layer constant within some batches counts there with HSIC 0; one constant in every
    batch is NaN with a SimilarityWarning.
    """
    b = check_pair(a, b, 3)
    _check_nan_policy(nan_policy)
    if batch_size < 4:
        raise SimilarityError(f"batch_size={batch_size} is too small: an unbiased HSIC needs at least 4 examples per batch")
    la, lb = resolve_layers(a, layers_a, "a"), resolve_layers(b, layers_b, "b")
    dev = device_of(a, device)
    acc = MinibatchHSIC(keep_batches=False, gram_dtype=gram_dtype)
    roles = {"a": (a, la)} if (b is a and la == lb) else {"a": (a, la), "b": (b, lb)}
    rows = joint_rows({r: x for r, (x, _) in roles.items()}, {r: ls for r, (_, ls) in roles.items()}, nan_policy)
    n = num_examples(a) if rows is None else len(rows)
    for grams in _minibatch_grams(roles, rows, n, batch_size, seed, dev, DTYPES[gram_dtype]):
        acc.add(gram_stats(grams["a"], grams.get("b", grams["a"]), paired=False))
    total = (all_reduce or default_all_reduce)(acc.sum)
    return as_output(acc.cka(len(la), len(lb), total), a)


def _minibatch_grams(roles: dict, rows, n: int, batch_size: int, seed: int, dev, dtype):
    """Yield {role: LinearGrams of this batch} over a seeded shuffle of the (kept) rows."""
    if n < 4:
        raise SimilarityError(f"minibatch CKA needs at least 4 examples, got {n}; compare more examples")
    order = np.random.default_rng(seed).permutation(n)
    if rows is not None:
        order = rows[order]
    for part in np.array_split(order, max(1, n // batch_size)):
        idx = np.sort(part)  # sorted rows read a memmap front to back
        grams = {}
        for role, (x, layers) in roles.items():
            grams[role] = linear_grams(x, layers, dev, dtype, idx)
        yield grams


# ----------------------------------------------------------------------------------------
# similarity_rows on the streaming path


def stream_rows(task: str, run, cfg) -> list:
    """Rows for cfg.stream_batch_size: exact matched-layer CKA, and the minibatch_cka matrix.

    The pipeline hands every rank all the rows of the task, so nothing is all-reduced here
    (summing over ranks would count each example once per rank).
    """
    from .rows import ROW_KEYS

    out = []
    bs = cfg.stream_batch_size
    exact = [m for m in cfg.measures if m in ("linear_cka", "debiased_cka")]
    for a, b in run.pairs:
        xa, xb = run.features[a], run.features[b]
        la, lb = run.layers[a], run.layers[b]
        if exact and len(la) == len(lb):
            res = exact_layers(xa, xb, la, lb, bs, run.rows, run.device, local_only)
            for m in exact:
                for pos, (x, y) in enumerate(zip(la, lb)):
                    out.append(dict(zip(ROW_KEYS, (task, a, b, x, y, m, res[m][pos], math.nan, math.nan, res["null_" + m][pos], math.nan, math.nan, res["n"]))))
        if "minibatch_cka" in cfg.measures:
            out += _stream_minibatch(task, run, cfg, a, b)
    return out


def _stream_minibatch(task, run, cfg, a, b) -> list:
    from .rows import ROW_KEYS

    la, lb = run.layers[a], run.layers[b]
    keep = cfg.bootstrap > 0
    acc = MinibatchHSIC(keep_batches=keep, gram_dtype=cfg.gram_dtype)
    roles = {a: (run.features[a], la), b: (run.features[b], lb)}
    for grams in _minibatch_grams(roles, run.rows, run.n, cfg.stream_batch_size, cfg.seed, run.device, DTYPES[cfg.gram_dtype]):
        acc.add(gram_stats(grams[a], grams[b], paired=False))
    value = acc.cka(len(la), len(lb), acc.sum)
    nan = torch.full_like(value, math.nan)
    lo, hi = acc.bootstrap(len(la), len(lb), cfg.bootstrap, cfg.ci, cfg.seed) if keep and len(acc.batches) > 1 else (nan, nan)
    if keep and len(acc.batches) < 2:
        warnings.warn("minibatch_cka confidence intervals need at least 2 batches; they are NaN", SimilarityWarning, stacklevel=2)
    cells = [(i, j) for i in range(len(la)) for j in range(len(lb))]
    if run.paired:
        cells = [(i, i) for i in range(min(len(la), len(lb)))]
    return [
        dict(zip(ROW_KEYS, (task, a, b, la[i], lb[j], "minibatch_cka", float(value[i, j]), float(lo[i, j]), float(hi[i, j]), 0.0, math.nan, math.nan, run.n)))
        for i, j in cells
    ]
