"""Shared / transition / refinement sections: piecewise fits, a test against smooth curves, bootstrap CIs.

The per-layer signal of every task is averaged over tasks into one curve. A segmentation
method always finds segments, so sections are treated as a claim that must beat simpler
explanations of the same curve (docs/analysis.md gives the reasoning and the measured
error rates):

1. **Fits.** For k = 2, 3, 4 sections, dynamic programming finds the k contiguous pieces
   of a per-piece model (``segment_model``) with the least total squared error, exactly.
   ``ramp`` (default): the first piece is a flat level (the models agree), every later
   one a line; neighbouring pieces share their boundary layer (a knot), approximating
   a continuous fit. ``linear``: a line per piece, joined at knots. ``constant``: a
   level per piece (a step function), disjoint.
2. **Smooth null.** "No sections" is a smooth curve: a polynomial of degree
   ``section_null_degree`` (default 5; at most (L - 1) // 4 for L layers) in the layer index, which covers flat, linear and
   gently curved monotone signals (saturating, logistic-like).
3. **Test.** The test family is the smooth polynomial plus j kinks (j + 1 sections), so
   every richer model nests the simpler ones. The statistic F = (SSE_simple - SSE_rich) /
   SSE_rich is compared with its distribution under a task-level sign-flip
   randomization: tasks are the unit of replication, and flipping whole tasks'
   deviations from the fitted simple curve keeps the correlation across layers. Against
   the smooth null the test is exact for independent tasks symmetric about a smooth mean
   (all 2^(T-1) distinct sign vectors when that is at most ``section_test_resamples`` + 1,
   else random ones, their number rounded so that alpha * (B + 1) is whole: see
   :func:`flip_count`). Sections
   are ``found`` when the 3-section model beats the smooth null at level
   ``section_alpha``; the number of sections is then chosen by the nested tests 3 vs 2
   and 4 vs 3 (each at ``section_alpha``). The boundaries come from the piecewise fit of
   step 1.
4. **Boundary CIs.** Tasks are resampled with replacement, the chosen k-section model is
   refitted, and percentile intervals of each boundary are reported.

Segment costs come from prefix sums in O(1) each, vectorised over a batch of curves, so
one bootstrap of 1000 curves of 33 layers costs milliseconds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .config import AnalysisConfig
from .views import Views

SECTION_NAMES = ("shared", "transition", "refinement")
# Names of the sections of a k-section fit, by position.
NAMES_BY_COUNT = {2: ("shared", "refinement"), 3: SECTION_NAMES, 4: ("shared", "transition", "refinement", "late")}
MAX_SECTIONS = 4
SIGNAL_TEXT = {
    "cka_distance": "1 - {measure}({a}, {b})",
    "accuracy_delta": "{metric}({b}) - {metric}({a}) ({probe} probe)",
    "control_cka": "{measure}({b}, control:<task>)",
}
SEGMENT_TEXT = {
    "ramp": "a flat level for shared, then a line per later section, joined at the boundary layers",
    "linear": "a line per section, joined at the boundary layers",
    "constant": "a level per section",
}


def piece_kinds(model: str, k: int) -> tuple[str, ...]:
    if model == "ramp":
        return ("constant",) + ("linear",) * (k - 1)
    if model in ("linear", "constant"):
        return (model,) * k
    raise ValueError(f"unknown segment model {model!r}")


def segment_costs(x: np.ndarray, y: np.ndarray, model: str) -> np.ndarray:
    """``C[..., i, j]``: squared error of one ``model`` segment fitted to points ``i..j``.

    ``y`` is one curve ``[n]`` or a batch ``[B, n]``. Entries with ``j < i`` are ``inf``.
    ``model`` is ``linear`` or ``constant``.
    """
    x = np.asarray(x, dtype=float) - np.mean(x)
    y = np.asarray(y, dtype=float)
    n = y.shape[-1]
    zero = np.zeros(y.shape[:-1] + (1,))

    def prefix(v):
        return np.concatenate([zero, np.cumsum(np.broadcast_to(v, y.shape), axis=-1)], axis=-1)

    i, j = np.triu_indices(n)
    sums = [prefix(v) for v in (np.ones(n), x, y, x * x, x * y, y * y)]
    cnt, sx, sy, sxx, sxy, syy = (s[..., j + 1] - s[..., i] for s in sums)
    cost = syy - sy * sy / cnt
    if model == "linear":
        var_x = sxx - sx * sx / cnt
        cov = sxy - sx * sy / cnt
        with np.errstate(divide="ignore", invalid="ignore"):
            cost = cost - np.where(var_x > 1e-12, cov * cov / var_x, 0.0)
    elif model != "constant":
        raise ValueError(f"unknown segment model {model!r}")
    out = np.full(y.shape[:-1] + (n, n), np.inf)
    out[..., i, j] = np.maximum(cost, 0.0)
    return out


def _min_piece_lengths(k: int, min_len: int, knots: bool) -> list[int]:
    """Fewest points per piece so that every *section* has ``min_len`` layers.

    With knots, piece p spans knots k_{p-1}..k_p; the first knot belongs to the first
    section, every later knot to the section after it (see :func:`section_starts`).
    """
    if not knots:
        return [min_len] * k
    if k == 2:
        return [min_len, min_len + 1]
    return [min_len, min_len + 2] + [min_len + 1] * (k - 3) + [min_len]


def min_layers(k: int, min_len: int, model: str) -> int:
    """Fewest layers that can hold ``k`` sections of ``min_len`` layers."""
    knots = model != "constant"
    return sum(_min_piece_lengths(k, min_len, knots)) - (k - 1 if knots else 0)


def fit_pieces(x: np.ndarray, y: np.ndarray, model: str, k: int, min_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact least-squares k-piece fit of one curve ``[n]`` or a batch ``[B, n]``.

    Returns the start index of pieces 2..k (``[..., k-1]``; with knots, piece p starts at
    the knot it shares with piece p-1) and the total squared error (``[...]``).
    Dynamic programming: ``best_p[j] = min_i best_{p-1}[i - 1 + overlap] + C_p[i, j]``.
    """
    y = np.asarray(y, dtype=float)
    single = y.ndim == 1
    y2 = y[None] if single else y
    b, n = y2.shape
    knots = model != "constant"
    kinds = piece_kinds(model, k)
    lengths = np.arange(n)[None, :] - np.arange(n)[:, None] + 1
    costs = {kind: segment_costs(x, y2, kind) for kind in set(kinds)}
    mins = _min_piece_lengths(k, min_len, knots)
    if n < min_layers(k, min_len, model):
        raise ValueError(f"{n} points cannot hold {k} sections of >= {min_len}")
    best = np.where(lengths[0] >= mins[0], costs[kinds[0]][:, 0, :], np.inf)  # [B, n]: piece 1 on 0..j
    args = []
    for kind, m in zip(kinds[1:], mins[1:]):
        prev = best if knots else np.concatenate([np.full((b, 1), np.inf), best[:, :-1]], axis=1)
        total = prev[:, :, None] + np.where(lengths >= m, costs[kind], np.inf)  # [B, i, j]
        args.append(total.argmin(axis=1))
        best = total.min(axis=1)
    starts = np.zeros((b, k - 1), dtype=int)
    end = np.full(b, n - 1)
    rows = np.arange(b)
    for p in range(k - 2, -1, -1):
        start = args[p][rows, end]
        starts[:, p] = start
        end = start if knots else start - 1
    sse = best[:, n - 1]
    return (starts[0], sse[0]) if single else (starts, sse)


def section_starts(piece_starts, model: str) -> list[int]:
    """First index of sections 2..k from the piece starts (knots: the first knot stays in shared)."""
    starts = [int(s) for s in piece_starts]
    if model == "constant":
        return starts
    return [starts[0] + 1] + starts[1:]


def fit_sections(x: np.ndarray, y: np.ndarray, model: str = "ramp", min_len: int = 2) -> tuple[int, int, float]:
    """Indices of the first transition and the first refinement point of the 3-section fit, and its error.

    ``ramp`` / ``linear``: the three pieces meet at two knot points ``k1 < k2``; piece 1
    is fitted to points ``0..k1``, piece 2 to ``k1..k2``, piece 3 to ``k2..n-1``. Sharing
    the knot keeps segment costs separable (so DP applies) while pulling neighbouring
    pieces together like a continuous fit. A knot is where the rise starts or ends, so
    it belongs to the flat side: shared is ``0..k1``, transition ``k1+1..k2-1``,
    refinement ``k2..n-1``. ``constant``: three disjoint levels.

    Every section gets at least ``min_len`` points.
    """
    n = len(y)
    if n < min_layers(3, min_len, model):
        raise ValueError(f"{n} points cannot hold 3 sections of >= {min_len}")
    starts, sse = fit_pieces(x, y, model, 3, min_len)
    s2, s3 = section_starts(starts, model)
    return s2, s3, float(sse)


def piece_spans(piece_starts, n: int, model: str) -> list[tuple[int, int]]:
    """Index ranges [lo, hi) of every fitted piece (knots shared)."""
    starts = [int(s) for s in piece_starts]
    if model == "constant":
        bounds = [0] + starts + [n]
        return [(bounds[p], bounds[p + 1]) for p in range(len(bounds) - 1)]
    bounds = [0] + starts
    return [(bounds[p], (starts[p] + 1) if p < len(starts) else n) for p in range(len(bounds))]


def fitted_curve(x: np.ndarray, y: np.ndarray, piece_starts, model: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fitted pieces as (x, fitted y), one per piece, for drawing."""
    pieces = []
    for (lo, hi), kind in zip(piece_spans(piece_starts, len(y), model), piece_kinds(model, len(piece_starts) + 1)):
        xs, ys = np.asarray(x[lo:hi], float), np.asarray(y[lo:hi], float)
        if kind == "linear" and hi - lo > 1:
            slope, intercept = np.polyfit(xs - xs.mean(), ys, 1)
            pieces.append((xs, slope * (xs - xs.mean()) + intercept))
        else:
            pieces.append((xs, np.full(len(xs), ys.mean())))
    return pieces


def smooth_design(x: np.ndarray, degree: int) -> np.ndarray:
    """Orthonormal basis of polynomials of ``degree`` in x (the smooth null)."""
    t = np.asarray(x, float)
    t = (t - t.mean()) / max(np.ptp(t), 1.0)
    q, _ = np.linalg.qr(np.vander(t, degree + 1, increasing=True))
    return q


# ---------------------------------------------------------------------------- resampling


def _task_resampler(values: np.ndarray, rng: np.random.Generator, count: int):
    """Per-layer means over tasks resampled with replacement: [count, layers], NaN cells skipped.

    A layer that only the left-out tasks covered is NaN in that resample.
    """
    t = len(values)
    filled = np.nan_to_num(values, nan=0.0)
    present = np.isfinite(values).astype(float)
    weights = rng.multinomial(t, np.full(t, 1.0 / t), size=count).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ filled) / (weights @ present)


def sign_flips(t: int, rng: np.random.Generator, count: int) -> tuple[np.ndarray, bool]:
    """Sign vectors [B, t] for a task-level randomization test, and whether they are all 2^t of them.

    With 2^t <= count + 1 every sign vector is used (an exact test); otherwise ``count``
    random ones (plus the observed, all +1, counted in the p-value).
    """
    if 2**t <= count + 1:
        grid = ((np.arange(2**t)[:, None] >> np.arange(t)[None, :]) & 1) * 2.0 - 1.0
        return grid, True
    return rng.choice([-1.0, 1.0], size=(count, t)), False


def distinct_flips(t: int, rng: np.random.Generator, count: int) -> tuple[np.ndarray, bool]:
    """The sign vectors the smooth test uses: [B, t] with the first task's sign fixed at +1, and whether all are used.

    F(-y) = F(y), so s and -s give the same statistic and only the 2^(t-1) vectors with
    s_1 = +1 differ. All of them are used (an exact test, p = hits / 2^(t-1), the observed
    all-+1 vector among them) when 2^(t-1) <= count + 1; otherwise ``count`` uniform draws
    from them, p = (1 + hits) / (1 + count).
    """
    if 2 ** (t - 1) <= count + 1:
        signs, _ = sign_flips(t - 1, rng, 2 ** (t - 1))
        return np.concatenate([np.ones((len(signs), 1)), signs], axis=1), True
    signs = rng.choice([-1.0, 1.0], size=(count, t))
    signs[:, 0] = 1.0
    return signs, False


def flip_p_value(stats: np.ndarray, observed, exact: bool) -> np.ndarray:
    """Randomization p-value(s) from the flipped statistics ``[..., B]`` and the observed one(s) ``[...]``.

    Exact (all distinct flips, the observed among them): hits / B. Random flips:
    (1 + hits) / (1 + B), which is valid (P(p <= a) <= a) for any number B of draws.
    Ties count as hits (relative tolerance 1e-9 for round-off).
    """
    observed = np.asarray(observed, float)[..., None]
    hits = np.sum(stats >= observed * (1 - 1e-9), axis=-1).astype(float)
    b = stats.shape[-1]
    return hits / b if exact else (1.0 + hits) / (1.0 + b)


def _filled(values: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Tasks x layers with a missing cell set to the mean curve (a deviation of 0)."""
    return np.where(np.isfinite(values), values, curve[None, :])


def improvement(sse_simple, sse_rich):
    """F = (SSE_simple - SSE_rich) / SSE_rich, the relative error reduction of the richer fit."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(sse_simple) - np.asarray(sse_rich)) / np.maximum(np.asarray(sse_rich), 1e-300)


@dataclass
class Comparison:
    """One test of a richer fit against a simpler one."""

    simple: str
    rich: str
    statistic: float
    p_value: float
    resamples: int

    def to_json(self) -> dict:
        return {"simple": self.simple, "rich": self.rich, "statistic": _round(self.statistic), "p_value": _round(self.p_value), "resamples": self.resamples}


class KinkModels:
    """The test family: a smooth polynomial plus j kinks (``ramp``/``linear``) or steps (``constant``).

    "j kinks" stands for j + 1 sections. The smooth polynomial is in every model, so each
    richer model nests the simpler ones and the statistic F of a smooth-vs-sections test
    does not change when any polynomial of the null degree is added to the curve: the
    parametric bootstrap then only has to get the noise right. A kink at layer index k
    adds max(0, x - x_k) (a change of slope); a step adds 1[x >= x_k]. Kink positions obey
    the same minimum section lengths as the fits, and the best positions are found by
    exhaustive search (the projections are data-independent and computed once).
    """

    def __init__(self, x: np.ndarray, segment_model: str, min_len: int, degree: int):
        self.x = np.asarray(x, float)
        n = len(self.x)
        self.model, self.min_len, self.degree = segment_model, min_len, degree
        self.q = smooth_design(self.x, degree)
        idx = np.arange(n)
        if segment_model == "constant":
            basis = (idx[None, :] >= idx[:, None]).astype(float)  # step starting at k
        else:
            basis = np.maximum(0.0, self.x[None, :] - self.x[:, None])  # kink at k
        self.h = basis - (basis @ self.q) @ self.q.T  # [n (knot), n (point)], smooth part removed
        full, _ = np.linalg.qr(np.concatenate([self.q, np.eye(n)], axis=1))
        self.perp = full[:, self.q.shape[1] : n]  # [n, m]: orthonormal basis of the curves with no polynomial part
        self.h_perp = self.perp.T @ self.h.T  # [m, n (knot)]: inner products of a curve's coordinates with each basis function
        self.ks = [k for k in range(2, MAX_SECTIONS + 1) if n >= min_layers(k, min_len, segment_model)]
        self._tuples: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _knot_sets(self, kinks: int) -> tuple[np.ndarray, np.ndarray]:
        """Valid knot tuples [N, kinks] and the inverse Gram of their projected bases [N, kinks, kinks]."""
        if kinks not in self._tuples:
            n, m = len(self.x), self.min_len
            k = kinks + 1
            if self.model == "constant":  # section starts s_1 < ... : every section >= m
                lo, gaps = m, [m] * kinks
                last = n - m
            else:  # knots: shared 0..k1, transition k1+1..k2-1, later sections start at their knot
                lo = m - 1
                gaps = ([m + 1] if k >= 3 else []) + [m] * max(0, kinks - 2)
                last = n - m - 1 if k == 2 else n - m
            cands = [t for t in itertools.combinations(range(n), kinks)
                     if t[0] >= lo and t[-1] <= last and all(b - a >= g for a, b, g in zip(t, t[1:], gaps))]
            tuples = np.asarray(cands, dtype=int).reshape(-1, kinks)
            basis = self.h[tuples]  # [N, kinks, n]
            gram = basis @ basis.transpose(0, 2, 1)
            self._tuples[kinks] = (tuples, np.linalg.pinv(gram))
        return self._tuples[kinks]

    def _gain(self, hr: np.ndarray, kinks: int) -> np.ndarray:
        """Largest SSE reduction over knot tuples, for inner products ``hr`` [c, n] with every projected basis function.

        The reduction of a tuple is b^T G^-1 b with b the inner products at its knots. Two
        kinks (the smooth-vs-3-sections test) are written out over layer-major chunks of
        about 1e5 numbers, which stay in cache (about 3x faster than the einsum).
        """
        tuples, ginv = self._knot_sets(kinks)
        best = np.empty(len(hr))
        if kinks == 2:
            g00, g01, g11 = ginv[:, 0, 0, None], 2 * ginv[:, 0, 1, None], ginv[:, 1, 1, None]
            ht = np.ascontiguousarray(hr.T)
            chunk = max(1, int(1e5 // len(tuples)))
            for s in range(0, len(hr), chunk):
                b0, b1 = ht[tuples[:, 0], s : s + chunk], ht[tuples[:, 1], s : s + chunk]  # [N, c]
                gain = b0 * b0 * g00
                gain += b0 * b1 * g01
                gain += b1 * b1 * g11
                best[s : s + chunk] = gain.max(axis=0)
            return best
        chunk = max(1, int(4e6 // max(1, len(tuples) * kinks)))
        for s in range(0, len(hr), chunk):
            b = hr[s : s + chunk][:, tuples]  # [c, N, kinks]
            best[s : s + chunk] = np.einsum("cni,nij,cnj->cn", b, ginv, b).max(axis=1)
        return best

    def smooth_test_stats(self, values: np.ndarray, signs: np.ndarray, rich) -> tuple[np.ndarray, np.ndarray]:
        """F of the smooth null vs ``rich`` sections for data sets ``values`` [D, T, n] and their sign flips.

        ``signs`` is [B, T] (shared) or [D, B, T] (one set per data set). Only the non-smooth
        part of each task matters (F ignores any polynomial of the null degree and any scale),
        so a flipped curve is sum_t s_t P y_t with P the projection off the polynomials; the
        observed curve is the all-+1 flip. Returns (observed F [D], flipped F [D, B]).
        """
        values = np.asarray(values, float)
        coords = values @ self.perp  # [D, T, m]
        observed = self._stat_coords(coords.sum(axis=1), rich)
        flipped = np.asarray(signs, float) @ coords  # [D, B, m]
        stats = self._stat_coords(flipped.reshape(-1, flipped.shape[-1]), rich).reshape(flipped.shape[:-1])
        return observed, stats

    def _stat_coords(self, coords: np.ndarray, rich) -> np.ndarray:
        """F = (SSE_smooth - SSE_rich) / SSE_rich of curves given by their coordinates [c, m] off the polynomials."""
        low = (coords**2).sum(-1)
        high = np.maximum(low - self._gain(coords @ self.h_perp, int(rich) - 1), 0.0)
        return improvement(low, np.minimum(low, high))

    def sse(self, name, curves: np.ndarray) -> np.ndarray:
        """Residual sum of squares of the best model with ``name`` sections ("smooth" = none)."""
        y = np.asarray(curves, float)
        resid = y - (y @ self.q) @ self.q.T
        base = (resid**2).sum(-1)
        if name == "smooth":
            return base
        tuples, ginv = self._knot_sets(int(name) - 1)
        hr = resid @ self.h.T  # [..., n]: inner products with every projected basis function
        best = self._gain(hr.reshape(-1, hr.shape[-1]), int(name) - 1)
        return np.maximum(base - best.reshape(hr.shape[:-1]), 0.0)

    def fitted(self, name, curve: np.ndarray) -> np.ndarray:
        """The best fit of one curve under the model with ``name`` sections."""
        y = np.asarray(curve, float)
        smooth = (y @ self.q) @ self.q.T
        if name == "smooth":
            return smooth
        tuples, ginv = self._knot_sets(int(name) - 1)
        resid = y - smooth
        b = (resid @ self.h.T)[tuples]  # [N, kinks]
        gain = np.einsum("ni,nij,nj->n", b, ginv, b)
        best = int(gain.argmax())
        coef = ginv[best] @ b[best]
        return smooth + coef @ self.h[tuples[best]]

    def compare(self, simple, rich, curve, values, rng, resamples: int) -> Comparison:
        """Task-level sign-flip test of F = (SSE_simple - SSE_rich) / SSE_rich under the fitted ``simple`` model.

        Deviations of each task from the fitted simple curve, z_t = y_t - f_simple, have mean
        zero under the null; flipping the sign of whole tasks gives pseudo mean curves
        f_simple + mean_t(s_t z_t). Against the smooth null F only sees the non-smooth part
        of the curve, so this is an exact randomization test for tasks that are independent
        and symmetric about a smooth mean (and asymptotically valid otherwise); against a
        fitted k-section null the knot positions are estimated, so it is approximate.
        """
        def stat(curves):  # the richer family contains the simpler fit's knots wherever the length rules allow
            low = self.sse(simple, curves)
            return improvement(low, np.minimum(low, self.sse(rich, curves)))

        filled = _filled(values, curve)
        if simple == "smooth":  # exact: the distinct flips of the tasks' non-smooth parts
            signs, exact = distinct_flips(len(values), rng, resamples)
            observed, stats = self.smooth_test_stats(filled[None], signs, rich)
            observed, stats = float(observed[0]), stats[0]
        else:
            observed = float(stat(curve))
            null_curve = self.fitted(simple, curve)
            z = filled - null_curve[None, :]
            signs, exact = sign_flips(len(values), rng, resamples)
            stats = stat(null_curve + signs @ z / len(values))
        p = float(flip_p_value(stats, observed, exact))
        return Comparison(_label(simple), _label(rich), observed, p, len(signs))


def _label(name) -> str:
    return "smooth (polynomial)" if name == "smooth" else f"{name} sections"


# ---------------------------------------------------------------------------- the result


@dataclass
class SectionFit:
    """The tested section fit with its bootstrap uncertainty; layer numbers throughout.

    ``found`` is False when no section fit beats the smooth null: then ``starts`` is empty,
    ``sections`` is {} and nothing is drawn; ``tests`` and ``fits`` still say what was compared.
    """

    signal: str
    description: str
    segment_model: str
    layers: list[int]
    curve: list[float]  # mean signal over tasks per layer
    curve_low: list[float]
    curve_high: list[float]
    n_tasks: int
    level: float
    bootstrap: int
    found: bool = True
    n_sections: int = 3
    names: tuple[str, ...] = SECTION_NAMES
    starts: list[int] = field(default_factory=list)  # first layer of sections 2..k
    pieces: list[dict] = field(default_factory=list)  # per section: the fitted line's {"layer": [...], "value": [...]}
    alpha: float = 0.05
    null_degree: int = 5
    min_section_layers: int = 2
    tests: list[Comparison] = field(default_factory=list)
    fits: dict = field(default_factory=dict)  # candidate -> {"sse": ..., "boundaries": [...]}
    reason: str = ""  # why found is False, in one sentence
    ci: dict[str, list[int]] = field(default_factory=dict)  # boundary -> [low, high]
    agreement: float | None = None  # share of resamples with every boundary within 1 layer
    boot_starts: list[list[int]] = field(default_factory=list)  # per resample: the boundaries
    undefined_layers: list[int] = field(default_factory=list)  # layers where the signal is NaN for every task

    @property
    def boundaries(self) -> dict[str, int]:
        """``<section>_start`` -> first layer, for every section after the first."""
        return {f"{name}_start": start for name, start in zip(self.names[1:], self.starts)}

    @property
    def transition_start(self) -> int | None:
        return self.boundaries.get("transition_start")

    @property
    def refinement_start(self) -> int | None:
        return self.boundaries.get("refinement_start")

    @property
    def sections(self) -> dict[str, list[int]]:
        if not self.found:
            return {}
        bounds = [self.layers[0]] + list(self.starts) + [self.layers[-1] + 1]
        return {name: [bounds[p], bounds[p + 1] - 1] for p, name in enumerate(self.names)}

    @property
    def at_minimum(self) -> list[str]:
        """Sections pinned at ``min_section_layers``: the fit may want them shorter still."""
        return [name for name, (lo, hi) in self.sections.items() if hi - lo + 1 <= self.min_section_layers]

    @property
    def p_value(self) -> float | None:
        return self.tests[0].p_value if self.tests else None

    def to_json(self) -> dict:
        sections = self.sections
        out = {name: sections.get(name) for name in SECTION_NAMES}
        out.update({name: span for name, span in sections.items() if name not in SECTION_NAMES})
        return {
            **out,
            "found": self.found,
            "n_sections": self.n_sections if self.found else 1,
            "p_value": _round(self.p_value),
            "test": {
                "alpha": self.alpha, "null": f"polynomial of degree {self.null_degree} in the layer index",
                "statistic": "(SSE_simple - SSE_rich) / SSE_rich", "method": "task-level sign-flip randomization",
                "comparisons": [t.to_json() for t in self.tests],
            },
            "fits": self.fits,
            "reason": self.reason or None,
            "at_min_section_layers": self.at_minimum,
            "signal": self.signal,
            "signal_description": self.description,
            "segment_model": self.segment_model,
            "boundaries": self.boundaries,
            "ci": {"level": self.level, "bootstrap": self.bootstrap, "resample": "tasks", **self.ci},
            "bootstrap_agreement_within_1_layer": self.agreement,
            "n_tasks": self.n_tasks,
            "layers": [self.layers[0], self.layers[-1]],
            "undefined_layers": self.undefined_layers,
            "curve": {"layer": self.layers, "mean": self.curve, "ci_low": self.curve_low, "ci_high": self.curve_high},
            "fit": dict(zip(self.names, self.pieces)) if self.found else {},
        }


def signal_matrix(views: Views, signal: str) -> tuple[pd.DataFrame, str]:
    """task x layer matrix of the chosen signal, and its description."""
    a, b = views.pair
    text = SIGNAL_TEXT[signal].format(measure=views.measure, metric=views.metric, probe=views.probe, a=a, b=b)
    if not views.has_pair:
        return pd.DataFrame(), text
    if signal == "cka_distance":
        return 1.0 - views.cka_matrix(), text
    if signal == "accuracy_delta":
        return views.delta_matrix(), text
    return views.control_cka_matrix(), text


def count_sections(layers, values: np.ndarray, segment_model: str = "ramp", min_len: int = 2, degree: int = 5,
                  alpha: float = 0.05, resamples: int = 1000, seed: int = 0) -> tuple[int, list[Comparison], dict]:
    """How many sections a task x layer matrix supports: (k, comparisons, candidate fits).

    k = 1 means none (the smooth null is not beaten). Needs at least 2 tasks.
    """
    values = np.asarray(values, float)
    layers = np.asarray(layers, float)
    curve = np.nanmean(values, axis=0)
    degree = null_degree(len(layers), degree)
    models = KinkModels(layers, segment_model, min_len, degree)
    rng = np.random.default_rng(seed)
    resamples = flip_count(resamples, alpha)
    fits = {"smooth": {"sse": _round(float(models.sse("smooth", curve)))}}
    for k in models.ks:
        starts, sse = fit_pieces(layers, curve, segment_model, k, min_len)
        fits[f"{k}_sections"] = {"sse_test": _round(float(models.sse(k, curve[None])[0])), "sse_piecewise": _round(float(sse)),
                                 "boundaries": [int(layers[s]) for s in section_starts(starts, segment_model)]}
    tests = [models.compare("smooth", 3, curve, values, rng, resamples)]
    if tests[0].p_value >= alpha:
        return 1, tests, fits
    tests.append(models.compare(2, 3, curve, values, rng, resamples))
    if tests[-1].p_value >= alpha:
        return 2, tests, fits
    k = 3
    if 4 in models.ks:
        tests.append(models.compare(3, 4, curve, values, rng, resamples))
        if tests[-1].p_value < alpha:
            k = 4
    return k, tests, fits


def flip_count(resamples: int, alpha: float) -> int:
    """Random flips per test: the largest B <= ``resamples`` with alpha * (B + 1) a whole number (999 for 1000 at 0.05).

    With random flips p = (1 + hits) / (1 + B) takes the values j / (B + 1), so the size of
    the rule p < alpha is (ceil(alpha (B + 1)) - 1) / (B + 1): exactly alpha - 1 / (B + 1)
    when alpha (B + 1) is whole (Davison & Hinkley 1997, sec. 4.2, choose B so), and up to
    alpha - 1e-6 otherwise (50/1001 for B = 1000). Keeps ``resamples`` when no such B is
    above half of it. Exact enumeration (few tasks) is unaffected.
    """
    for b in range(int(resamples), int(resamples) // 2, -1):
        m = alpha * (b + 1)
        if abs(m - round(m)) < 1e-9:
            return b
    return int(resamples)


def null_degree(n_layers: int, degree: int) -> int:
    """The smooth null's degree: ``degree``, but at most (L - 1) // 4 so a few layers are not interpolated."""
    return max(1, min(degree, (n_layers - 1) // 4))


def min_tasks(alpha: float) -> int:
    """Fewest tasks whose sign-flip test can reach p < alpha: F(-y) = F(y), so 2^(T-1) distinct flips."""
    t = 2
    while 2.0 ** -(t - 1) >= alpha:
        t += 1
    return t


def detect_sections(views: Views, cfg: AnalysisConfig) -> tuple[SectionFit | None, str]:
    """Fit and test the sections of ``cfg.signal``; ``(None, reason)`` when the data cannot say.

    A returned fit with ``found=False`` means the test ran and no section structure beats
    the smooth null; its ``reason`` says so.
    """
    if cfg.signal == "auto":  # as write_report resolves it: the study's MOSSA signal when controls exist
        import dataclasses

        has_controls = getattr(views, "has_controls", lambda: False)()
        cfg = dataclasses.replace(cfg, signal="control_cka" if has_controls else "cka_distance")
    matrix, description = signal_matrix(views, cfg.signal)
    if not cfg.include_embedding:
        matrix = matrix.drop(columns=[0], errors="ignore")
    undefined = [int(c) for c in matrix.columns if matrix[c].isna().all()]
    matrix = matrix.dropna(axis=1, how="all").dropna(axis=0, how="all")
    if matrix.empty:
        return None, _missing_signal(views, cfg.signal, description)
    values = matrix.to_numpy(dtype=float)
    layers = np.asarray(matrix.columns, dtype=int)
    need = min_layers(3, cfg.min_section_layers, cfg.segment_model)
    if len(layers) < need:
        return None, f"{len(layers)} layer(s) cannot hold 3 sections of >= {cfg.min_section_layers} layers (min_section_layers)"
    if len(values) < min_tasks(cfg.section_alpha):
        return None, (f"{len(values)} task(s): the section test flips the signs of whole tasks, and with fewer than "
                      f"{min_tasks(cfg.section_alpha)} tasks no p-value can fall below section_alpha={cfg.section_alpha} "
                      "(sections are a claim about the mean over tasks; add tasks)")
    curve = np.nanmean(values, axis=0)
    k, tests, fits = count_sections(layers, values, cfg.segment_model, cfg.min_section_layers, cfg.section_null_degree,
                                   cfg.section_alpha, cfg.section_test_resamples, cfg.seed)
    fit = SectionFit(
        signal=cfg.signal,
        description=f"{description}, mean over {len(values)} task(s)",
        segment_model=cfg.segment_model,
        layers=[int(v) for v in layers],
        curve=_floats(curve),
        curve_low=_floats(np.full_like(curve, np.nan)),
        curve_high=_floats(np.full_like(curve, np.nan)),
        n_tasks=len(values),
        level=cfg.ci,
        bootstrap=cfg.bootstrap,
        found=k > 1,
        n_sections=k,
        names=NAMES_BY_COUNT.get(k, SECTION_NAMES),
        alpha=cfg.section_alpha,
        null_degree=null_degree(len(layers), cfg.section_null_degree),
        min_section_layers=cfg.min_section_layers,
        tests=tests,
        fits=fits,
        undefined_layers=undefined,
    )
    if not fit.found:
        fit.reason = (f"no section structure: the 3-section fit does not improve significantly on a smooth curve "
                      f"(polynomial of degree {fit.null_degree}; p = {tests[0].p_value:.3g} >= alpha = {cfg.section_alpha})")
        if cfg.bootstrap > 0:
            _curve_band(fit, values, cfg)
        return fit, ""
    starts, _ = fit_pieces(layers, curve, cfg.segment_model, k, cfg.min_section_layers)
    fit.starts = [int(layers[s]) for s in section_starts(starts, cfg.segment_model)]
    fit.pieces = [{"layer": [int(v) for v in xs], "value": _floats(ys)} for xs, ys in fitted_curve(layers, curve, starts, cfg.segment_model)]
    if cfg.bootstrap > 0:
        _bootstrap(fit, values, layers, cfg)
    return fit, ""


def _missing_signal(views: Views, signal: str, description: str) -> str:
    """Why the signal has no data, and what to do."""
    if not views.has_pair:
        return f"signal={signal} compares pair={list(views.pair)}, which is not in the results"
    if signal == "accuracy_delta":
        return f"signal=accuracy_delta needs {views.metric or 'probe'} results for both models in probes.csv"
    if views.measure is None:
        return f"signal={signal} needs similarity.csv results and there are none; try signal=accuracy_delta"
    if signal == "control_cka":
        return "signal=control_cka needs control:<task> models in similarity.csv; try signal=cka_distance"
    return f"no data for the section signal {description}; check pair and measure"


def boundary_bootstrap(layers, values: np.ndarray, segment_model: str, k: int, min_len: int, resamples: int, seed: int):
    """Boundaries (layer numbers) of the k-section fit of task-resampled mean curves, and those curves."""
    layers = np.asarray(layers)
    curves = _task_resampler(np.asarray(values, float), np.random.default_rng(seed), resamples)
    curves = curves[np.isfinite(curves).all(axis=1)]  # drop resamples missing a layer
    if not len(curves):
        return np.zeros((0, k - 1), dtype=int), curves
    starts, _ = fit_pieces(layers, curves, segment_model, k, min_len)
    if segment_model != "constant":
        starts[:, 0] += 1
    return layers[starts], curves


def _bootstrap(fit: SectionFit, values: np.ndarray, layers: np.ndarray, cfg: AnalysisConfig) -> None:
    """Resample tasks with replacement, refit, and take percentile CIs of the boundaries."""
    if len(values) < 2:
        return
    arr, curves = boundary_bootstrap(layers, values, cfg.segment_model, fit.n_sections, cfg.min_section_layers, cfg.bootstrap, cfg.seed + 1)
    if not len(arr):
        return
    tail = (1 - cfg.ci) / 2
    for col, name in enumerate(fit.boundaries):
        fit.ci[name] = [int(np.quantile(arr[:, col], tail, method="lower")), int(np.quantile(arr[:, col], 1 - tail, method="higher"))]
    point = np.array(fit.starts)
    fit.agreement = float(np.mean(np.all(np.abs(arr - point) <= 1, axis=1)))
    fit.curve_low = _floats(np.quantile(curves, tail, axis=0))
    fit.curve_high = _floats(np.quantile(curves, 1 - tail, axis=0))
    fit.boot_starts = arr.tolist()


def _curve_band(fit: SectionFit, values: np.ndarray, cfg: AnalysisConfig) -> None:
    curves = _task_resampler(values, np.random.default_rng(cfg.seed + 1), cfg.bootstrap)
    curves = curves[np.isfinite(curves).all(axis=1)]
    if len(curves):
        tail = (1 - cfg.ci) / 2
        fit.curve_low = _floats(np.quantile(curves, tail, axis=0))
        fit.curve_high = _floats(np.quantile(curves, 1 - tail, axis=0))


def _round(v):
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def _floats(values) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 6) for v in values]
