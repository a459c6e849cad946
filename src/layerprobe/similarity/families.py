"""Measure families: how each group of measures is prepared once per model and re-evaluated cheaply.

A family turns one model's layers into a prepared object once, then evaluates any pair of
prepared objects on the full sample, on a half-sample (bootstrap) or with model b's rows
permuted (null) without re-reading features where the maths allows:

- `LinearCKA` (linear_cka, debiased_cka): Gram path keeps float32 centred features and,
  when resampling, the n x n Grams, so a resample is an index gather into those Grams; the
  feature path (n >> d) keeps centred features and recomputes d x d moments (matched
  layers: a chunk of resamples per batched product).
- `RbfCKA` (rbf_cka): stored RBF Grams; the bandwidth stays the full-sample one.
- `Spectral` (svcca, pwcca, procrustes): thin SVD per layer; a permutation reorders U's rows.
- `Knn` (mutual_knn): neighbour lists per layer; a permutation relabels them.

`evaluate` returns ({measure: values}, {measure: exact null means}); values are [La, Lb]
for a layer x layer group or [L] for matched layers (paired).
"""

from dataclasses import dataclass, field
from typing import Optional

import torch

from ._arrays import read_layer
from .estimators import (DTYPES, GramStats, StoredGrams, centred_with_scale, feature_stats, feature_stats_batched, gram_stats,
                         linear_grams, rbf_grams)
from .measures import PROCRUSTES_FORMS, Spectrum, knn_indices, mutual_knn_value, permuted_knn, procrustes_value, pwcca_value, spectrum, svcca_value


@dataclass
class Layers:
    """One model's layers of a group, read for the run's kept rows."""

    x: object  # the feature array [n_store, L+1, d]
    layers: list
    rows: Optional[object]  # store rows kept after NaN masking (None = all)
    device: torch.device
    cache: dict = field(default_factory=dict)

    def centred(self) -> list:
        """[(centred float64 [n, d], raw sum of squares)] per layer, read once."""
        if "centred" not in self.cache:
            self.cache["centred"] = [centred_with_scale(self.x, l, self.device, self.rows) for l in self.layers]
        return self.cache["centred"]


def _recentre(parts, sub):
    """Centred features of the examples `sub` (a half-sample must be centred on its own mean)."""
    out = []
    for c, _ in parts:
        s = c[sub]
        out.append((s - s.mean(0, keepdim=True), (s * s).sum()))
    return out


def _cka_values(st: GramStats, measures) -> dict:
    return {m: st.cka(m == "debiased_cka") for m in measures}


def _stats_values(st: GramStats, measures):
    """(CKA values, exact null means); resamples need only the values (`_cka_values`)."""
    return _cka_values(st, measures), {m: st.null_mean(m == "debiased_cka") for m in measures}


class Family:
    """Base of the measure families; resamples are evaluated one by one unless a family batches them."""

    active: list

    def evaluate_many(self, pa, pb, subs, perms):
        """({measure: [B, ...]} over half-samples, {measure: [P, ...]} over permutations)."""
        boots = [self.evaluate(pa, pb, sub=s)[0] for s in subs]
        nulls = [self.evaluate(pa, pb, perm=p)[0] for p in perms]
        return _stack(boots), _stack(nulls)


def _stack(values: list) -> dict:
    return {m: torch.stack([v[m] for v in values]) for m in values[0]} if values else {}


class GramFamily(Family):
    """Measures computed from Gram matrices: a resample is an index gather into stored Grams.

    For one matched layer, chunks of resamples go through `PairedResamples` at once.
    """

    paired: bool
    uses_grams = True
    CHUNK_BYTES = 64 << 20

    def stored(self, prepared) -> StoredGrams:
        raise NotImplementedError

    def evaluate_grams(self, sa, sb, sub=None, perm=None):
        if sub is not None or perm is not None:
            sa, sb = self.stored(sa), self.stored(sb)
            if sub is not None:
                sa, sb = sa.take(sub), sb.take(sub)
            if perm is not None:
                sb = sb.take(perm)
        return _stats_values(gram_stats(sa, sb, self.paired), self.active)

    def evaluate_many(self, pa, pb, subs, perms):
        if not (self.paired and self.uses_grams):
            return super().evaluate_many(pa, pb, subs, perms)
        res = PairedResamples(self.stored(pa), self.stored(pb))
        return self._chunks(res.half_samples, subs), self._chunks(res.permutations, perms)

    def _chunks(self, stats_of, index_sets) -> dict:
        if not index_sets:
            return {}
        m = len(index_sets[0])
        chunk = max(1, int(self.CHUNK_BYTES // (24 * m * m)))
        parts = [_cka_values(stats_of(torch.stack(index_sets[s : s + chunk])), self.active) for s in range(0, len(index_sets), chunk)]
        return {k: torch.cat([p[k] for p in parts])[:, None] for k in parts[0]}


class PairedResamples:
    """GramStats of one matched layer pair under many resamples, each row of the stack one resample.

    Works on float64 Grams with a zero diagonal: sampling without replacement and permuting
    both map the diagonal onto itself, so every gathered Gram keeps it zero. A permutation
    of model b only needs its Gram gathered and one dot product with model a's Gram; its
    row sums and diagonal are just permuted, and both self terms are unchanged.
    """

    def __init__(self, ga: StoredGrams, gb: StoredGrams):
        self.n = ga.n
        self.k, self.l = _zero_diag64(ga), _zero_diag64(gb)
        self.dk, self.dl = ga.diag[0], gb.diag[0]
        self.rk, self.rl = self.k.sum(1), self.l.sum(1)
        self.sk, self.sl = self.k.view(-1).dot(self.k.view(-1)), self.l.view(-1).dot(self.l.view(-1))
        self.zk, self.zl = ga.zero, gb.zero

    def _gather(self, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.take(g, idx[:, :, None] * self.n + idx[:, None, :])

    def half_samples(self, idx: torch.Tensor) -> GramStats:
        c, m = idx.shape
        ks, ls = self._gather(self.k, idx), self._gather(self.l, idx)
        kf, lf = ks.view(c, 1, -1), ls.view(c, -1, 1)
        dot = lambda u, v: torch.bmm(u, v).view(c)
        return GramStats(
            m, dot(kf, lf), dot(kf, kf.transpose(1, 2)), dot(lf.transpose(1, 2), lf),
            self.dk[idx], self.dl[idx], ks.sum(2), ls.sum(2), self.zk.expand(c), self.zl.expand(c), paired=True,
        )

    def permutations(self, perm: torch.Tensor) -> GramStats:
        c = perm.shape[0]
        ls = self._gather(self.l, perm).view(c, -1)
        return GramStats(
            self.n, ls @ self.k.view(-1), self.sk.expand(c), self.sl.expand(c),
            self.dk.expand(c, -1), self.dl[perm], self.rk.expand(c, -1), self.rl[perm], self.zk.expand(c), self.zl.expand(c), paired=True,
        )


def _zero_diag64(g: StoredGrams) -> torch.Tensor:
    k = g.grams[0].to(torch.float64, copy=True)
    k.fill_diagonal_(0.0)
    return k


class LinearCKA(GramFamily):
    measures = ("linear_cka", "debiased_cka")

    def __init__(self, measures, paired: bool, feature_space: bool, gram_dtype: str):
        self.active = [m for m in self.measures if m in measures]
        self.paired, self.feature_space, self.dtype = paired, feature_space, DTYPES[gram_dtype]
        self.uses_grams = not feature_space

    def prepare(self, model: Layers):
        if self.feature_space:
            return model
        if "grams" not in model.cache:
            model.cache["grams"] = linear_grams(model.x, model.layers, model.device, self.dtype, model.rows)
        return model.cache["grams"]

    def stored(self, prepared) -> StoredGrams:
        return prepared.stored()

    def evaluate_many(self, pa, pb, subs, perms):
        if not (self.paired and self.feature_space):
            return super().evaluate_many(pa, pb, subs, perms)
        # matched layers in feature space: chunks of resamples as batched products, the same
        # statistics as `evaluate` on each resample (feature_stats with leading batch dims)
        xa, xb = _stacked(pa), _stacked(pb)
        return self._feature_chunks(xa, xb, subs, half=True), self._feature_chunks(xa, xb, perms, half=False)

    def _feature_chunks(self, xa, xb, index_sets, half: bool) -> dict:
        if not index_sets:
            return {}
        (ca, raw_a), (cb, raw_b) = xa, xb
        layers, m, da, db = ca.shape[0], len(index_sets[0]), ca.shape[2], cb.shape[2]
        per_set = 8 * layers * (2 * m * (da + db) + da * da + db * db + da * db)  # float64 gathers and moments
        chunk = max(1, int(self.CHUNK_BYTES // per_set))
        parts = []
        for s in range(0, len(index_sets), chunk):
            idx = torch.stack(index_sets[s : s + chunk])  # [c, m]
            if half:  # a half-sample of both models, each centred on its own mean
                a, b = ca[:, idx], cb[:, idx]  # [L, c, m, d]
                ra, rb = (a * a).sum((2, 3)), (b * b).sum((2, 3))
                a, b = a - a.mean(2, keepdim=True), b - b.mean(2, keepdim=True)
            else:  # model b's examples permuted: both stay centred
                a, b = ca.unsqueeze(1), cb[:, idx]
                ra, rb = raw_a.unsqueeze(1), raw_b.unsqueeze(1).expand(-1, idx.shape[0])
            st = feature_stats_batched(a, b, ra, rb)
            parts.append({k: v.T for k, v in _cka_values(st, self.active).items()})  # [L, c] -> [c, L]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def evaluate(self, pa, pb, sub=None, perm=None):
        if not self.feature_space:
            return self.evaluate_grams(pa, pb, sub, perm)
        xa, xb = pa.centred(), pb.centred()
        if sub is not None:
            xa, xb = _recentre(xa, sub), _recentre(xb, sub)
        if perm is not None:
            xb = [(c[perm], s) for c, s in xb]
        st = feature_stats([c for c, _ in xa], [c for c, _ in xb], self.paired, _scales(xa), _scales(xb))
        return _stats_values(st, self.active)


def _scales(parts):
    return torch.stack([s for _, s in parts])


def _stacked(model: "Layers"):
    """(centred float64 features [L, n, d], raw sums of squares [L]) of a model's layers, stacked once."""
    if "stacked" not in model.cache:
        parts = model.centred()
        model.cache["stacked"] = (torch.stack([c for c, _ in parts]), _scales(parts))
    return model.cache["stacked"]


class RbfCKA(GramFamily):
    measures = ("rbf_cka",)

    def __init__(self, paired: bool, gram_dtype: str, threshold: float):
        self.active = ["rbf_cka"]
        self.paired, self.dtype, self.threshold = paired, DTYPES[gram_dtype], threshold

    def prepare(self, model: Layers):
        if "rbf" not in model.cache:
            model.cache["rbf"] = rbf_grams(model.x, model.layers, model.device, self.dtype, self.threshold, model.rows)
        return model.cache["rbf"]

    def stored(self, prepared) -> StoredGrams:
        return prepared

    def evaluate(self, pa, pb, sub=None, perm=None):
        return self.evaluate_grams(pa, pb, sub, perm)


class Spectral(Family):
    measures = ("svcca", "pwcca", "procrustes", "procrustes_sq", "procrustes_angular")

    def __init__(self, measures, paired: bool, svcca_variance: float):
        self.active = [m for m in self.measures if m in measures]
        self.paired, self.share = paired, svcca_variance

    def prepare(self, model: Layers):
        if "spectra" not in model.cache:
            model.cache["spectra"] = [spectrum(c, ss) for c, ss in model.centred()]
        return model

    def evaluate(self, pa, pb, sub=None, perm=None):
        if sub is None:
            sa, sb = pa.cache["spectra"], pb.cache["spectra"]
        else:  # a half-sample has its own mean and its own SVD
            sa = [spectrum(c, ss) for c, ss in _recentre(pa.centred(), sub)]
            sb = [spectrum(c, ss) for c, ss in _recentre(pb.centred(), sub)]
        if perm is not None:
            sb = [s.rows(perm) for s in sb]
        values = {m: _grid(self.paired, sa, sb, lambda a, b, m=m: self._one(m, a, b)) for m in self.active}
        return values, {}

    def _one(self, measure: str, a: Spectrum, b: Spectrum):
        if measure == "svcca":
            return svcca_value(a, b, self.share)
        if measure == "pwcca":
            return pwcca_value(a, b)
        return procrustes_value(a, b, PROCRUSTES_FORMS[measure])


class Knn(Family):
    measures = ("mutual_knn",)

    def __init__(self, paired: bool, k: int):
        self.active = ["mutual_knn"]
        self.paired, self.k = paired, k

    def prepare(self, model: Layers):
        if "knn" not in model.cache:
            model.cache["knn"] = [knn_indices(_raw(model, p), self.k) for p in range(len(model.layers))]
        return model

    def evaluate(self, pa, pb, sub=None, perm=None):
        if sub is None:
            na, nb = pa.cache["knn"], pb.cache["knn"]
        else:
            na = [knn_indices(_raw(pa, p)[sub], self.k) for p in range(len(pa.layers))]
            nb = [knn_indices(_raw(pb, p)[sub], self.k) for p in range(len(pb.layers))]
        if perm is not None:
            nb = [permuted_knn(n, perm) for n in nb]
        return {"mutual_knn": _grid(self.paired, na, nb, mutual_knn_value)}, {}


def _raw(model: Layers, position: int) -> torch.Tensor:
    # Huh et al. compare cosine neighbourhoods of the raw (uncentred) features.
    raw = model.cache.setdefault("raw", {})
    if position not in raw:
        raw[position] = read_layer(model.x, model.layers[position], model.device, model.rows)
    return raw[position]


def _grid(paired: bool, xs, ys, fn) -> torch.Tensor:
    if paired:
        return torch.stack([fn(a, b) for a, b in zip(xs, ys)])
    return torch.stack([torch.stack([fn(a, b) for b in ys]) for a in xs])
