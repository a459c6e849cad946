"""What the pipeline writes: `similarity_rows` -> similarity.csv.

One call compares every requested pair of models of one task on the same examples:

1. validate the inputs (roles, shapes, example counts and ids, layers) and mask NaN/inf
   jointly across all models of the task, so every row of a task describes the same examples;
2. walk the layers in groups (one layer at a time for matched layers, all layers at once
   for the layer x layer matrix), so memory holds one group's Grams, not the whole store;
3. per group, prepare each model once per measure family and evaluate every pair, then the
   subsampling intervals and the permutation null by re-indexing what was prepared.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ._arrays import SimilarityWarning, check_same_examples, check_same_ids, check_stack, joint_rows, resolve_layers
from .estimators import check_sample_size, feature_space_is_cheaper
from .config import DISTANCE_MEASURES, SimilarityConfig, SimilarityError
from .families import Knn, Layers, LinearCKA, RbfCKA, Spectral

ROW_KEYS = ("task", "model_a", "model_b", "layer_a", "layer_b", "measure", "value", "ci_low", "ci_high", "null_mean", "p_value",
            "p_adjusted", "n")
# Distances: smaller = more similar, so the permutation p-value counts nulls at or below the value.
SMALLER_IS_CLOSER = set(DISTANCE_MEASURES)


@dataclass
class Run:
    """Validated inputs of one task: who is compared with whom, on which layers and rows."""

    features: dict
    pairs: list
    layers: dict  # role -> store layer indices
    rows: Optional[np.ndarray]  # store rows compared: the selection minus NaN/inf examples (None = all)
    n: int
    ids: Optional[list]  # ids of the compared rows
    device: torch.device
    paired: bool

    def groups(self):
        """Layer positions handled together: each matched layer alone, or all layers for the matrix."""
        if self.paired:
            return [[p] for p in range(len(next(iter(self.layers.values()))))]
        return [None]

    def model(self, role: str, group) -> Layers:
        layers = self.layers[role] if group is None else [self.layers[role][p] for p in group]
        return Layers(self.features[role], layers, self.rows, self.device)


def as_config(cfg) -> SimilarityConfig:
    """Accept the dataclass, a plain mapping or an OmegaConf node (Hydra)."""
    if isinstance(cfg, SimilarityConfig):
        return cfg
    if cfg is None:
        return SimilarityConfig()
    return SimilarityConfig(**{str(k): v for k, v in dict(cfg).items()})


def prepare_run(features: dict, pairs, cfg: SimilarityConfig, ids=None, layers=None, rows=None) -> Run:
    pairs, roles = _pairs(features, pairs, cfg.within_model)
    for role in roles:
        check_stack(features[role], f"model '{role}'", 3)
    for role in roles[1:]:
        check_same_examples(features[roles[0]], features[role], f"model '{roles[0]}'", f"model '{role}'")
    n_store = int(features[roles[0]].shape[0])
    select = None if rows is None else _selection(rows, n_store)
    compared_ids = _check_ids(ids, roles, n_store if select is None else len(select))
    layer_map = {role: resolve_layers(features[role], layers, f"model '{role}'") for role in roles}
    paired = not cfg.cross_layer
    for a, b in pairs if paired else []:
        if len(layer_map[a]) != len(layer_map[b]):
            raise SimilarityError(
                f"model '{a}' has {len(layer_map[a])} layers and '{b}' has {len(layer_map[b])}; "
                "matched layers need equal depth: set similarity.cross_layer=true or choose layers present in both"
            )
    kept = joint_rows({r: features[r] for r in roles}, layer_map, cfg.nan_policy, compared_ids, select)
    store_rows = select
    if kept is not None:
        store_rows = kept if select is None else select[kept]
        compared_ids = None if compared_ids is None else [compared_ids[i] for i in kept]
    n = n_store if store_rows is None else len(store_rows)
    check_sample_size(n, any(m in ("debiased_cka", "minibatch_cka") for m in cfg.measures))
    smallest = n // 2 if cfg.bootstrap else n  # bootstrap resamples are half-samples
    if "mutual_knn" in cfg.measures and cfg.knn_k >= smallest:
        raise SimilarityError(f"mutual_knn with similarity.knn_k={cfg.knn_k} needs more than {cfg.knn_k} examples per "
                              f"{'bootstrap half-sample' if cfg.bootstrap else 'comparison'} but has {smallest}; "
                              "lower similarity.knn_k or add examples")
    return Run(features, pairs, layer_map, store_rows, n, compared_ids, torch.device(cfg.device), paired)


def _pairs(features: dict, pairs, within_model: bool):
    """The (model_a, model_b) pairs to compare (plus (m, m) with within_model) and the roles in them."""
    pairs = [tuple(p) for p in pairs]
    for p in pairs:
        if len(p) != 2:
            raise SimilarityError(f"pair {p!r} is not (model_a, model_b); pass pairs like [('base', 'tuned')]")
        for role in p:
            if role not in features:
                raise SimilarityError(f"pair {p} names model '{role}' but features only has {sorted(features)}; extract its features or fix the pair")
    roles = list(dict.fromkeys(r for p in pairs for r in p))
    if not roles:
        raise SimilarityError("no model pairs to compare; pass pairs like [('base', 'tuned')]")
    if within_model:
        pairs += [(r, r) for r in roles if (r, r) not in pairs]
    return pairs, roles


def _selection(rows, n_store: int) -> np.ndarray:
    sel = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(sel) and (sel.min() < 0 or sel.max() >= n_store):
        raise SimilarityError(f"rows must index the store's {n_store} examples, got {int(sel.min())}..{int(sel.max())}; pass row numbers of the store")
    if len(np.unique(sel)) != len(sel):
        raise SimilarityError("rows repeats store rows; pass each example once (a duplicated example looks perfectly similar to itself)")
    return sel


def _check_ids(ids, roles: list, n_compared: int) -> Optional[list]:
    """One id per compared row, equal across models; returns the first model's ids (or None)."""
    role_ids = _ids_by_role(ids, roles)
    for role in roles:
        if role_ids[role] is not None and len(role_ids[role]) != n_compared:
            raise SimilarityError(f"model '{role}' compares {n_compared} examples but has {len(role_ids[role])} ids; pass one id per compared row, in order")
    for role in roles[1:]:
        if role_ids[role] is not None and role_ids[roles[0]] is not None:
            check_same_ids(role_ids[roles[0]], role_ids[role], f"model '{roles[0]}'", f"model '{role}'")
    return role_ids[roles[0]]


def _ids_by_role(ids, roles) -> dict:
    if ids is None:
        return {r: None for r in roles}
    if isinstance(ids, dict):
        missing = [r for r in roles if r not in ids]
        if missing:
            raise SimilarityError(f"ids has no entry for model(s) {missing}; pass ids for every model or one shared list")
        return {r: list(ids[r]) for r in roles}
    return {r: list(ids) for r in roles}


class Resamples:
    """Index sets shared by every group, pair and family, drawn once from `cfg.seed`.

    Confidence intervals come from subsampling WITHOUT replacement at two sizes, m1 = n // 2
    and m2 = 3n // 4 (`bootstrap` subsamples each). Drawing with replacement would duplicate
    examples, and a duplicated pair (i, j) with x_i = x_j breaks the U-statistic behind
    debiased CKA (and inflates the d/(n+d) floor of biased CKA).

    For a U-statistic of order 2 the variance is a/n + b/n^2 (a: the linear part of its
    Hoeffding decomposition, b: the degenerate part, which is all there is when two
    representations are unrelated). The delete-(n-m) jackknife variance
    V(m) = m / (n - m) * Var(estimate_m) has expectation a/n + (1 + n/m) b/n^2, so the
    plain half-sample interval (m = n/2) counts the degenerate part three times (sqrt(3)
    too wide near CKA = 0). V is linear in t = n/m, so extrapolating the two sizes to t = 0
    gives a/n + b/n^2, the variance of the full-sample estimate, in both regimes:
    V = V(m2) - t2 (V(m1) - V(m2)) / (t1 - t2), clipped to [V(m2) / (1 + t2), V(m2)] (a, b >= 0).
    The interval is value + sqrt(V) * (quantiles of the m2-deviations divided by their SD):
    centred on the full-sample value, so it covers what the estimator estimates at this n
    (for debiased CKA the population CKA; for biased CKA its own expectation at this n, which
    sits above the population value by about the bias floor).
    """

    def __init__(self, n: int, cfg: SimilarityConfig, device: torch.device):
        gen = torch.Generator().manual_seed(cfg.seed)
        self.n, self.level = n, cfg.ci
        self.sizes = (n // 2, (3 * n) // 4)
        self.subs = ([], [])
        if cfg.bootstrap and self.sizes[0] < 4:
            warnings.warn(f"bootstrap needs at least 8 examples (half-samples of 4), got {n}; confidence intervals are NaN", SimilarityWarning, stacklevel=3)
        elif cfg.bootstrap:
            # nested: each m1-subsample is the start of an m2-subsample, so the two variance estimates
            # share most of their Monte Carlo noise and their difference (the extrapolation) is stable
            perms = [torch.randperm(n, generator=gen) for _ in range(cfg.bootstrap)]
            self.subs = tuple([p[:m].sort().values.to(device) for p in perms] for m in self.sizes)
        self.perms = [torch.randperm(n, generator=gen).to(device) for _ in range(cfg.permutations)]

    def run(self, family, pa, pb):
        """(({measure: [B, ...]} at m1, {measure: [B, ...]} at m2) or None, {measure: [P, ...]} permutation values)."""
        with warnings.catch_warnings():  # zero-variance warnings were already given on the full sample
            warnings.simplefilter("ignore", SimilarityWarning)
            first, perms = family.evaluate_many(pa, pb, self.subs[0], self.perms)
            second, _ = family.evaluate_many(pa, pb, self.subs[1], [])
        boots = {m: (first[m], second[m]) for m in first} if first else {}
        return boots, perms

    def variance(self, boots) -> tuple:
        """(extrapolated variance of the full-sample estimate, m2-deviations)."""
        (b1, b2), (m1, m2) = boots, self.sizes
        out = []
        for b, m in ((b1, m1), (b2, m2)):
            dev = b - b.nanmean(0)
            count = torch.isfinite(dev).sum(0).clamp_min(2)
            out.append((m / (self.n - m) * torch.nansum(dev * dev, 0) / (count - 1), dev))
        (v1, _), (v2, dev2) = out
        t1, t2 = self.n / m1, self.n / m2
        v = v2 - t2 * (v1 - v2) / (t1 - t2)
        return torch.minimum(torch.maximum(v, v2 / (1 + t2)), v2), dev2

    def interval(self, value: torch.Tensor, boots):
        v, dev = self.variance(boots)
        sd = torch.sqrt(torch.nansum(dev * dev, 0) / (torch.isfinite(dev).sum(0).clamp_min(2) - 1))
        z = dev / sd.clamp_min(1e-300)
        lo = torch.nanquantile(z, (1 - self.level) / 2, dim=0)
        hi = torch.nanquantile(z, (1 + self.level) / 2, dim=0)
        scale = torch.sqrt(v)
        lo, hi = value + scale * lo, value + scale * hi
        flat = sd <= 0  # no spread at all (e.g. identical representations): a zero-width interval
        return torch.where(flat, value, lo), torch.where(flat, value, hi)


def adjust_p_values(p, method: str = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values of one family; NaN entries are not part of the family.

    ``holm``: Holm (1979) step-down, controls the family-wise error rate under any dependence.
    ``bh``: Benjamini & Hochberg (1995) step-up, controls the false discovery rate (for
    independent or positively dependent tests). ``none``: unchanged.
    """
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if method == "none" or m == 0:
        return p.copy()
    if method not in ("holm", "bh"):
        raise SimilarityError(f"p_adjust={method!r} is invalid; use 'holm', 'bh' or 'none'")
    vals = p[ok]
    order = np.argsort(vals, kind="stable")
    ranked = vals[order]
    if method == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ranked)
    else:
        adj = np.minimum.accumulate((m / np.arange(1, m + 1) * ranked)[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


def adjust_rows(rows: list, method: str = "holm") -> list:
    """Fill ``p_adjusted`` of similarity rows: one family per (model_a, model_b, measure), across all tasks and cells."""
    families: dict = {}
    for i, row in enumerate(rows):
        families.setdefault((row["model_a"], row["model_b"], row["measure"]), []).append(i)
    for idx in families.values():
        adjusted = adjust_p_values([rows[i].get("p_value", math.nan) for i in idx], method)
        for i, v in zip(idx, adjusted):
            rows[i]["p_adjusted"] = float(v)
    return rows


def similarity_rows(task: str, features: dict, pairs, cfg, ids=None, layers=None, rows=None) -> list:
    """Rows of similarity.csv for one task.

    features: role -> [n, L+1, d] (numpy, memmap or torch; float16/32/64), rows aligned on
    the same examples. ids: one list for all roles, or role -> list (then checked equal),
    one id per compared row. pairs: (model_a, model_b) roles. layers: store layer indices
    (None = all). rows: store row numbers to compare (e.g. the test split) — with memmaps
    this reads only those rows, lazily; None = every row.
    Each row: task, model_a, model_b, layer_a, layer_b, measure, value, ci_low, ci_high,
    null_mean, p_value, n (NaN where not computed). Matched layers always; every
    (layer_a, layer_b) cell with cfg.cross_layer.
    """
    cfg = as_config(cfg)
    run = prepare_run(features, pairs, cfg, ids, layers, rows)
    if cfg.stream_batch_size is not None:
        from .stream import stream_rows

        return stream_rows(task, run, cfg)
    families = _families(run, cfg)
    resamples = Resamples(run.n, cfg, run.device)
    keep_centred = any(isinstance(f, Spectral) for f in families) and cfg.bootstrap > 0
    keep_centred |= any(isinstance(f, LinearCKA) and f.feature_space for f in families)
    out = []
    for group in run.groups():
        models = {}
        prepared = {}
        for role in dict.fromkeys(r for p in run.pairs for r in p):
            models[role] = run.model(role, group)
            for fi, fam in enumerate(families):
                prepared[role, fi] = fam.prepare(models[role])
            if not keep_centred:  # the float32 Gram copy (or the spectra) is all that is needed now
                models[role].cache.pop("centred", None)
        for a, b in run.pairs:
            for fi, fam in enumerate(families):
                pa, pb = prepared[a, fi], prepared[b, fi]
                values, nulls = fam.evaluate(pa, pb)
                boots, perms = resamples.run(fam, pa, pb)
                for measure, value in values.items():
                    out += _rows(task, run, a, b, group, measure, value, nulls.get(measure), boots.get(measure), perms.get(measure), resamples)
    return adjust_rows(out, cfg.p_adjust)  # this task's family; the pipeline re-adjusts across all tasks


def _families(run: Run, cfg: SimilarityConfig) -> list:
    fams = []
    if {"linear_cka", "debiased_cka"} & set(cfg.measures):
        dims = [int(run.features[r].shape[-1]) for r in run.layers]
        group_layers = 1 if run.paired else max(len(v) for v in run.layers.values())
        feature_space = feature_space_is_cheaper(run.n, max(dims), max(dims), group_layers, group_layers, run.paired, cfg.gram_dtype)
        fams.append(LinearCKA(cfg.measures, run.paired, feature_space, cfg.gram_dtype))
    if "rbf_cka" in cfg.measures:
        fams.append(RbfCKA(run.paired, cfg.gram_dtype, cfg.rbf_threshold))
    if set(Spectral.measures) & set(cfg.measures):
        fams.append(Spectral(cfg.measures, run.paired, cfg.svcca_variance))
    if "mutual_knn" in cfg.measures:
        fams.append(Knn(run.paired, cfg.knn_k))
    return fams


def _rows(task, run, a, b, group, measure, value, null, boots, perms, resamples) -> list:
    nan = torch.full_like(value, math.nan)
    lo, hi = resamples.interval(value, boots) if boots is not None else (nan, nan)
    if null is None:
        null = perms.nanmean(0) if perms is not None else nan
    if perms is not None:
        hits = (perms <= value) if measure in SMALLER_IS_CLOSER else (perms >= value)
        p_value = (1.0 + hits.sum(0).double()) / (1.0 + perms.shape[0])
        p_value = p_value.masked_fill(torch.isnan(value), math.nan)
    else:
        p_value = nan
    la = run.layers[a] if group is None else [run.layers[a][p] for p in group]
    lb = run.layers[b] if group is None else [run.layers[b][p] for p in group]
    cells = list(zip(la, lb)) if run.paired else [(x, y) for x in la for y in lb]
    cols = [t.detach().flatten().cpu().tolist() for t in (value, lo, hi, null, p_value)]
    return [
        dict(zip(ROW_KEYS, (task, a, b, int(x), int(y), measure, v, l, h, nm, p, math.nan, run.n)))
        for (x, y), v, l, h, nm, p in zip(cells, *cols)
    ]
