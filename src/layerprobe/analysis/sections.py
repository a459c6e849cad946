"""Shared / transition / refinement sections by an optimal 3-segment least-squares fit.

The per-layer signal of every task is averaged over tasks into one curve. Dynamic
programming over the two boundaries finds the split of the layers into three
contiguous sections that minimises the total squared error of a per-section model
(``segment_model``; see docs/analysis.md for the reasoning):

* ``ramp`` (default): shared is a flat level (the models agree), transition a line
  (the change), refinement a line (the new regime, which may still drift). Neighbours
  share their boundary layer (a knot), approximating a continuous fit. This is the
  shape the study describes: flat, rising, then high.
* ``linear``: a line per section, joined at knots; the shared section may slope too.
* ``constant``: a level per section (a step function), disjoint. Suited to signals
  that jump; on a gradual ramp it splits the ramp at about its thirds.

Segment costs come from prefix sums in O(1) each, so the exact optimum over all
boundary pairs costs O(n^2) and a 1000-fold bootstrap over tasks (resampling tasks
with replacement, refitting) takes well under a second. Sections are named by
position: the first is ``shared``, the middle ``transition``, the last ``refinement``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .config import AnalysisConfig
from .views import Views

SECTION_NAMES = ("shared", "transition", "refinement")
SIGNAL_TEXT = {
    "cka_distance": "1 - {measure}({a}, {b})",
    "accuracy_delta": "{metric}({b}) - {metric}({a}) ({probe} probe)",
    "control_cka": "{measure}({b}, control:<task>)",
}


def segment_costs(x: np.ndarray, y: np.ndarray, model: str) -> np.ndarray:
    """``C[i, j]``: squared error of one ``model`` segment fitted to points ``i..j``.

    Entries with ``j < i`` are ``inf``. ``model`` is ``linear`` or ``constant``.
    """
    x = np.asarray(x, dtype=float) - np.mean(x)
    y = np.asarray(y, dtype=float)
    sums = [np.concatenate([[0.0], np.cumsum(v)]) for v in (np.ones_like(y), x, y, x * x, x * y, y * y)]
    i, j = np.triu_indices(len(y))
    n, sx, sy, sxx, sxy, syy = (s[j + 1] - s[i] for s in sums)
    cost = syy - sy * sy / n
    if model == "linear":
        var_x = sxx - sx * sx / n
        cov = sxy - sx * sy / n
        with np.errstate(divide="ignore", invalid="ignore"):
            cost = cost - np.where(var_x > 1e-12, cov * cov / var_x, 0.0)
    elif model != "constant":
        raise ValueError(f"unknown segment model {model!r}")
    out = np.full((len(y), len(y)), np.inf)
    out[i, j] = np.maximum(cost, 0.0)
    return out


def _dp_three(first: np.ndarray, middle: np.ndarray, last: np.ndarray, overlap: int) -> tuple[list[int], float]:
    """Least total cost of three consecutive segments covering points ``0..n-1``.

    ``first[j]``: cost of segment 1 on ``0..j``; ``middle[i, j]`` and ``last[i, j]``: cost
    of segment 2 / 3 on ``i..j``. Dynamic programming: ``best2[j] = min_i first[i - 1 +
    overlap] + middle[i, j]``, then ``min_i best2[i - 1 + overlap] + last[i, n-1]``.
    With ``overlap=1`` neighbouring segments share their boundary point (a knot).
    Returns the start indices of segments 2 and 3 and the total cost.
    """
    n = len(first)
    shift = (lambda b: b) if overlap else (lambda b: np.concatenate([[np.inf], b[:-1]]))
    two = shift(first)[:, None] + middle
    best2, arg2 = two.min(axis=0), two.argmin(axis=0)
    three = shift(best2) + last[:, n - 1]
    start3 = int(three.argmin())
    return [int(arg2[start3 - 1 + overlap]), start3], float(three[start3])


SEGMENT_TEXT = {
    "ramp": "a flat level for shared, then a line through the transition and one through refinement, joined at the boundary layers",
    "linear": "a line per section, joined at the boundary layers",
    "constant": "a level per section",
}
SEGMENT_KINDS = {
    "ramp": ("constant", "linear", "linear"),
    "linear": ("linear", "linear", "linear"),
    "constant": ("constant", "constant", "constant"),
}


def fit_sections(x: np.ndarray, y: np.ndarray, model: str = "ramp", min_len: int = 2) -> tuple[int, int, float]:
    """Indices of the first transition and the first refinement point, and the fit's error.

    Exact least squares over all boundary pairs, by dynamic programming (:func:`_dp_three`).

    ``ramp`` / ``linear``: the three pieces (see ``SEGMENT_KINDS``) meet at two knot
    points ``k1 < k2``; piece 1 is fitted to points ``0..k1``, piece 2 to ``k1..k2``,
    piece 3 to ``k2..n-1``. Sharing the knot keeps segment costs separable (so DP
    applies) while pulling neighbouring pieces together like a continuous fit. A knot
    is where the rise starts or ends, so it belongs to the flat side: shared is
    ``0..k1``, transition ``k1+1..k2-1``, refinement ``k2..n-1``.

    ``constant``: three disjoint levels; the sections are the segments.

    Every section gets at least ``min_len`` points.
    """
    n = len(y)
    if n < 3 * min_len:
        raise ValueError(f"{n} points cannot hold 3 sections of >= {min_len}")
    kinds = SEGMENT_KINDS[model]
    costs = {kind: segment_costs(x, y, kind) for kind in set(kinds)}
    lengths = np.arange(n)[None, :] - np.arange(n)[:, None] + 1
    knots = model != "constant"
    extra = 2 if knots else 0  # the transition's piece also holds both knots
    first = np.where(lengths[0] >= min_len, costs[kinds[0]][0], np.inf)
    middle = np.where(lengths >= min_len + extra, costs[kinds[1]], np.inf)
    last = np.where(lengths >= min_len, costs[kinds[2]], np.inf)
    (start2, start3), sse = _dp_three(first, middle, last, overlap=int(knots))
    return (start2 + 1 if knots else start2), start3, sse


def segments(x: np.ndarray, y: np.ndarray, transition_start: int, refinement_start: int, model: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fitted pieces as (x, fitted y), one per section, for drawing."""
    if model != "constant":
        spans = [(0, transition_start), (transition_start - 1, refinement_start + 1), (refinement_start, len(y))]
    else:
        spans = [(0, transition_start), (transition_start, refinement_start), (refinement_start, len(y))]
    pieces = []
    for (lo, hi), kind in zip(spans, SEGMENT_KINDS[model]):
        xs, ys = np.asarray(x[lo:hi], float), np.asarray(y[lo:hi], float)
        if kind == "linear" and hi - lo > 1:
            slope, intercept = np.polyfit(xs, ys, 1)
            pieces.append((xs, slope * xs + intercept))
        else:
            pieces.append((xs, np.full(len(xs), ys.mean())))
    return pieces


@dataclass
class SectionFit:
    """Fitted sections with their bootstrap uncertainty; layer numbers throughout."""

    signal: str
    description: str
    segment_model: str
    layers: list[int]
    curve: list[float]  # mean signal over tasks per layer
    curve_low: list[float]
    curve_high: list[float]
    pieces: list[dict]  # per section: the fitted line's {"layer": [...], "value": [...]}
    transition_start: int
    refinement_start: int
    n_tasks: int
    level: float
    bootstrap: int
    ci: dict[str, list[int]] = field(default_factory=dict)  # boundary -> [low, high]
    agreement: float | None = None  # share of resamples with both boundaries within 1 layer
    boot_starts: list[list[int]] = field(default_factory=list)  # per resample [transition, refinement]
    undefined_layers: list[int] = field(default_factory=list)  # layers where the signal is NaN for every task

    @property
    def sections(self) -> dict[str, list[int]]:
        first, last = self.layers[0], self.layers[-1]
        return {
            "shared": [first, self.transition_start - 1],
            "transition": [self.transition_start, self.refinement_start - 1],
            "refinement": [self.refinement_start, last],
        }

    def to_json(self) -> dict:
        return {
            **self.sections,
            "signal": self.signal,
            "signal_description": self.description,
            "segment_model": self.segment_model,
            "boundaries": {"transition_start": self.transition_start, "refinement_start": self.refinement_start},
            "ci": {"level": self.level, "bootstrap": self.bootstrap, "resample": "tasks", **self.ci},
            "bootstrap_agreement_within_1_layer": self.agreement,
            "n_tasks": self.n_tasks,
            "layers": [self.layers[0], self.layers[-1]],
            "undefined_layers": self.undefined_layers,
            "curve": {"layer": self.layers, "mean": self.curve, "ci_low": self.curve_low, "ci_high": self.curve_high},
            "fit": dict(zip(SECTION_NAMES, self.pieces)),
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


def detect_sections(views: Views, cfg: AnalysisConfig) -> tuple[SectionFit | None, str]:
    """Fit the sections to ``cfg.signal``; ``(None, reason)`` when the data cannot say."""
    matrix, description = signal_matrix(views, cfg.signal)
    if not cfg.include_embedding:
        matrix = matrix.drop(columns=[0], errors="ignore")
    undefined = [int(c) for c in matrix.columns if matrix[c].isna().all()]
    matrix = matrix.dropna(axis=1, how="all").dropna(axis=0, how="all")
    if matrix.empty:
        return None, _missing_signal(views, cfg.signal, description)
    values = matrix.to_numpy(dtype=float)
    layers = np.asarray(matrix.columns, dtype=int)
    if len(layers) < 3 * cfg.min_section_layers:
        return None, f"{len(layers)} layer(s) cannot hold 3 sections of >= {cfg.min_section_layers} layers (min_section_layers)"
    curve = np.nanmean(values, axis=0)
    start2, start3, _ = fit_sections(layers, curve, cfg.segment_model, cfg.min_section_layers)
    pieces = segments(layers, curve, start2, start3, cfg.segment_model)
    fit = SectionFit(
        signal=cfg.signal,
        description=f"{description}, mean over {len(values)} task(s)",
        segment_model=cfg.segment_model,
        layers=[int(v) for v in layers],
        curve=_floats(curve),
        curve_low=_floats(np.full_like(curve, np.nan)),
        curve_high=_floats(np.full_like(curve, np.nan)),
        pieces=[{"layer": [int(v) for v in xs], "value": _floats(ys)} for xs, ys in pieces],
        transition_start=int(layers[start2]),
        refinement_start=int(layers[start3]),
        n_tasks=len(values),
        level=cfg.ci,
        bootstrap=cfg.bootstrap,
        undefined_layers=undefined,
    )
    if cfg.bootstrap > 0 and len(values) > 1:
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


def _bootstrap(fit: SectionFit, values: np.ndarray, layers: np.ndarray, cfg: AnalysisConfig) -> None:
    """Resample tasks with replacement, refit, and take percentile CIs of the boundaries."""
    rng = np.random.default_rng(cfg.seed)
    starts, curves = [], []
    for _ in range(cfg.bootstrap):
        sample = values[rng.integers(0, len(values), len(values))]
        with np.errstate(all="ignore"):
            curve = np.nanmean(sample, axis=0)
        if not np.isfinite(curve).all():  # a layer only the left-out tasks covered
            continue
        start2, start3, _ = fit_sections(layers, curve, cfg.segment_model, cfg.min_section_layers)
        starts.append([int(layers[start2]), int(layers[start3])])
        curves.append(curve)
    if not starts:
        return
    tail = (1 - cfg.ci) / 2
    arr = np.asarray(starts)
    for col, name in enumerate(("transition_start", "refinement_start")):
        fit.ci[name] = [int(np.quantile(arr[:, col], tail, method="lower")), int(np.quantile(arr[:, col], 1 - tail, method="higher"))]
    point = np.array([fit.transition_start, fit.refinement_start])
    fit.agreement = float(np.mean(np.all(np.abs(arr - point) <= 1, axis=1)))
    fit.curve_low = _floats(np.quantile(np.asarray(curves), tail, axis=0))
    fit.curve_high = _floats(np.quantile(np.asarray(curves), 1 - tail, axis=0))
    fit.boot_starts = arr.tolist()


def _floats(values) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 6) for v in values]
