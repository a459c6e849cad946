"""Report figures, drawn with matplotlib's object API (no pyplot, Agg canvas).

Every function returns a :class:`matplotlib.figure.Figure` (or ``None`` when its data
is absent) and draws the fitted section boundaries on every layer axis. Sizes grow
with the number of tasks and layers so that 60+ tasks and 33 layers stay legible.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from .sections import SectionFit
from .views import across_tasks, finite

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
MODEL_COLORS = {"base": "#1f77b4", "tuned": "#d62728", "sft": "#2ca02c", "instruct": "#d62728"}
SECTION_COLORS = {"shared": "#4c72b0", "transition": "#dd8452", "refinement": "#55a868", "late": "#8172b3"}
BOUNDARY_COLOR = "#333333"
MAX_BANDS = 5  # more overlapping CI bands than this are unreadable: draw lines only
MIN_BAND_TASKS = 3  # a t-interval over 1-2 tasks spans the plot: no band there


def save(fig: Figure, stem: str, folder: Path, fmt: str, dpi: int) -> dict[str, Path]:
    """Write ``stem.png`` (always: the HTML embeds it) and ``stem.<fmt>``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ext in dict.fromkeys(["png", fmt]):
        paths[ext] = folder / f"{stem}.{ext}"
        fig.savefig(paths[ext], dpi=dpi, bbox_inches="tight", pad_inches=0.08)
    return paths


# ---------------------------------------------------------------------------- shared pieces


def model_color(model: str, models: Sequence[str]) -> str:
    if model in MODEL_COLORS:
        return MODEL_COLORS[model]
    palette = mpl.colormaps["tab10"].colors
    return mpl.colors.to_hex(palette[(list(models).index(model) + 4) % len(palette)])


def cluster_colors(clusters: Sequence[str]) -> dict[str, str]:
    """Distinct colours dark enough for thin lines and coloured titles on white."""
    palette = [mpl.colors.to_hex(c) for c in mpl.colormaps["tab10"].colors] + ["#1b1b7a", "#7a4a12"]
    if len(clusters) > len(palette):
        palette = [mpl.colors.to_hex(mpl.colormaps["turbo"](0.05 + 0.9 * i / max(1, len(clusters) - 1))) for i in range(len(clusters))]
    return {c: palette[i % len(palette)] for i, c in enumerate(clusters)}


def set_layer_ticks(ax, layers: Sequence[int], axis: str = "x", most: int = 17) -> None:
    """Integer layer ticks at a round step giving at most ``most`` ticks (0 always shown)."""
    if not len(layers):
        return
    lo, hi = min(layers), max(layers)
    step = next(s for s in (1, 2, 4, 5, 8, 10, 16, 20, 25, 50, 100, 10**9) if (hi - lo) // s + 1 <= most)
    ticks = [t for t in range(lo - lo % step, hi + 1, step) if t >= lo]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo - 0.5, hi + 0.5)


def draw_sections(ax, fit: SectionFit | None, axis: str = "x", labels: bool = False, ci: bool = True) -> None:
    """Dashed boundary lines (between layers), shaded boundary CIs, optional section names."""
    if fit is None or not fit.found:  # no supported sections: no boundaries to draw
        return
    line = ax.axvline if axis == "x" else ax.axhline
    span = ax.axvspan if axis == "x" else ax.axhspan
    for name, start in fit.boundaries.items():
        line(start - 0.5, color=BOUNDARY_COLOR, lw=1.1, ls="--", zorder=4)
        if ci and name in fit.ci:
            lo, hi = fit.ci[name]
            if hi > lo:
                span(lo - 0.5, hi - 0.5, color=BOUNDARY_COLOR, alpha=0.10, lw=0, zorder=0)
    if labels and axis == "x":
        lo_x, hi_x = ax.get_xlim()
        centres = [((lo + hi) / 2 - lo_x) / (hi_x - lo_x) for lo, hi in fit.sections.values()]
        width_in = ax.get_position().width * ax.figure.get_figwidth()
        for (name, (lo, hi)), x in zip(fit.sections.items(), _spread(centres, 0.7 / max(width_in, 0.1))):
            ax.annotate(f"{name}\n{lo}–{hi}", xy=(x, 1.0), xycoords="axes fraction", xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7.5, color=SECTION_COLORS[name], fontweight="bold", linespacing=1.0)


def _spread(centres: list[float], gap: float) -> list[float]:
    """Move label centres (axes fractions, ascending) apart to at least ``gap``, keeping them in [0, 1]."""
    out = list(centres)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + gap)
    out[-1] = min(out[-1], 1.0 - gap / 3)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1] - gap)
    return out


def _band(ax, x, mean, low, high, color: str, label: str | None, lw: float = 1.6) -> list[np.ndarray]:
    """A mean line with its CI band; returns the arrays drawn (for :func:`_fit_ylim`)."""
    ax.plot(x, mean, color=color, lw=lw, label=label, zorder=3)
    drawn = [np.asarray(mean, float)]
    if low is not None and np.isfinite(np.asarray(low, float)).any():
        ax.fill_between(x, np.asarray(low, float), np.asarray(high, float), color=color, alpha=0.18, lw=0, zorder=2)
        drawn += [np.asarray(low, float), np.asarray(high, float)]
    return drawn


def _task_mean(ax, matrix: pd.DataFrame, level: float, color: str, label: str | None, lw: float = 1.6, band: bool = True) -> list[np.ndarray]:
    """Mean over the matrix's tasks per layer, with the CI band where >= MIN_BAND_TASKS tasks."""
    agg = across_tasks(matrix.dropna(how="all"), level)
    wide = agg["n"] >= MIN_BAND_TASKS
    low, high = (agg["ci_low"].where(wide), agg["ci_high"].where(wide)) if band else (None, None)
    return _band(ax, agg["layer"], agg["mean"], low, high, color, label, lw)


def _fit_ylim(ax, drawn: list[list[np.ndarray]]) -> None:
    """Y range from the mean lines (first array of each entry), widened for the other arrays
    (bands, nulls) by at most a third of that range: a CI over few tasks can be huge and
    would otherwise squash every line flat."""
    means = finite(np.concatenate([d[0] for d in drawn])) if drawn else np.array([])
    if not means.size:
        return
    extra = finite(np.concatenate([a for d in drawn for a in d[1:]] or [means]))
    extra = extra if extra.size else means
    lo, hi = float(means.min()), float(means.max())
    reach = max(hi - lo, 0.02) / 3
    lo, hi = max(min(lo, float(extra.min())), lo - reach), min(max(hi, float(extra.max())), hi + reach)
    pad = 0.04 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, math.ceil(math.sqrt(n * 1.5)), n))
    return math.ceil(n / cols), cols


def _short(text: str, limit: int) -> str:
    """Shorten in the middle: task names often differ only at their end."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def _hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def _title_pad(fit: SectionFit | None) -> float:
    """Room above an axes for the two-line section labels of :func:`draw_sections`."""
    return 25 if fit is not None and fit.found else 6


# ---------------------------------------------------------------------------- heatmaps


def task_layer_heatmap(
    panels: Sequence[tuple[str, pd.DataFrame]],
    clusters: Mapping[str, str],
    label: str,
    fit: SectionFit | None,
    diverging: bool = False,
    title: str | None = None,
) -> Figure | None:
    """Task x layer heatmaps side by side, one colour scale; clusters ruled and named."""
    panels = [(t, m) for t, m in panels if not m.dropna(how="all").empty]
    if not panels:
        return None
    tasks = list(dict.fromkeys(t for _, m in panels for t in m.index))
    layers = list(panels[0][1].columns)
    values = np.concatenate([finite(m.to_numpy()) for _, m in panels])
    if diverging:
        bound = max(float(np.max(np.abs(values))), 1e-6) if values.size else 1.0
        norm, cmap = TwoSlopeNorm(0.0, -bound, bound), mpl.colormaps["RdBu_r"]
    else:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        norm, cmap = Normalize(lo, hi if hi > lo else lo + 1e-6), mpl.colormaps["viridis"]
    cmap = cmap.with_extremes(bad="#d9d9d9")
    n = len(tasks)
    row_in = 0.19 if n > 30 else 0.24
    panel_w = float(np.clip(0.1 * len(layers) + 1.0, 2.6, 4.2))
    fig = Figure(figsize=(panel_w * len(panels) + 3.4, max(3.6, row_in * n + 2.2)), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    order = [c for c in dict.fromkeys(clusters.get(t, "") for t in tasks)]
    cluster_rows = {c: [i for i, t in enumerate(tasks) if clusters.get(t, "") == c] for c in order}
    for ax, (panel_title, matrix) in zip(axes, panels):
        data = matrix.reindex(index=tasks, columns=layers).to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest",
                          extent=(layers[0] - 0.5, layers[-1] + 0.5, n - 0.5, -0.5))
        for rows in list(cluster_rows.values())[1:]:
            ax.axhline(rows[0] - 0.5, color="white", lw=2.0)
        set_layer_ticks(ax, layers)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_title(panel_title, pad=_title_pad(fit))
        draw_sections(ax, fit, labels=True, ci=False)
        ax.tick_params(axis="y", length=0)
    axes[0].set_yticks(range(n), tasks, fontsize=7 if n > 30 else 8)
    if len(order) > 1:
        right = axes[-1].secondary_yaxis("right")
        right.set_yticks([float(np.mean(r)) for r in cluster_rows.values()], [c.replace("_", " ") for c in order], fontsize=8)
        right.tick_params(length=0)
        right.spines["right"].set_visible(False)
    bar = fig.colorbar(image, ax=list(axes), shrink=float(np.clip(6.0 / (row_in * n + 2.2), 0.35, 0.9)), aspect=25, pad=0.02)
    bar.set_label(label)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------- per-layer curves


def task_curves_grid(
    long: pd.DataFrame,
    tasks: Sequence[str],
    clusters: Mapping[str, str],
    ylabel: str,
    fit: SectionFit | None,
) -> Figure | None:
    """Small multiples: one panel per task, mean with CI band (and the null mean if known)."""
    tasks = [t for t in tasks if t in set(long["task"])]
    if not tasks:
        return None
    colors = cluster_colors(list(dict.fromkeys(clusters.get(t, "") for t in tasks)))
    nrows, ncols = _grid(len(tasks), 6)
    fig = Figure(figsize=(1.85 * ncols + 0.9, 1.5 * nrows + 1.2), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    layers = sorted(long["layer"].unique())
    drawn = []
    for ax, task in zip(axes.flat, tasks):
        rows = long[long["task"] == task].sort_values("layer")
        color = colors[clusters.get(task, "")]
        drawn.append(_band(ax, rows["layer"], rows["mean"], rows["ci_low"], rows["ci_high"], color, None, lw=1.3))
        if "null_mean" in rows and rows["null_mean"].notna().any():
            ax.plot(rows["layer"], rows["null_mean"], color="#888888", lw=0.9, ls=":", zorder=1)
            drawn[-1].append(rows["null_mean"].to_numpy(float))  # keep the null in view
        ax.set_title(_short(task, 30), fontsize=7.5, color=color, loc="left")
        draw_sections(ax, fit, ci=False)
        set_layer_ticks(ax, layers, most=5)
        ax.tick_params(labelsize=7)
    _hide_unused(axes, len(tasks))
    _fit_ylim(axes.flat[0], drawn)
    handles = [mpl.lines.Line2D([], [], color=c, lw=2, label=k.replace("_", " ")) for k, c in colors.items()]
    if "null_mean" in long and long["null_mean"].notna().any():
        handles.append(mpl.lines.Line2D([], [], color="#888888", ls=":", label="permutation null"))
    if fit is not None:
        handles.append(mpl.lines.Line2D([], [], color=BOUNDARY_COLOR, ls="--", label="section boundary"))
    fig.legend(handles=handles, loc="outside upper center", ncol=min(7, len(handles)), frameon=False)
    fig.supxlabel("layer (0 = embeddings)", fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    return fig


def grouped_curves(
    matrix: pd.DataFrame,
    groups: Mapping[str, str],
    level: float,
    ylabel: str,
    fit: SectionFit | None,
    title: str,
    overall: bool = True,
) -> Figure | None:
    """One line per group (mean over its tasks, Student-t CI band over tasks)."""
    matrix = matrix.dropna(how="all")
    if matrix.empty:
        return None
    names = list(dict.fromkeys(groups.get(t, "") for t in matrix.index))
    colors = cluster_colors(names)
    fig = Figure(figsize=(8.2, 4.2), layout="constrained")
    ax = fig.subplots()
    drawn = []
    for name in names:
        sub = matrix[[groups.get(t, "") == name for t in matrix.index]]
        drawn.append(_task_mean(ax, sub, level, colors[name], f"{name.replace('_', ' ')} (n={len(sub)})", 1.4, len(names) <= MAX_BANDS))
    if overall and len(names) > 1:
        drawn.append(_task_mean(ax, matrix, level, "black", f"all tasks (n={len(matrix)})", 2.6))
    _fit_ylim(ax, drawn)
    return _finish_layer_axes(fig, ax, list(matrix.columns), fit, ylabel, title)


def model_curves_by_cluster(
    matrices: Mapping[str, pd.DataFrame],
    baseline: pd.DataFrame | None,
    clusters: Mapping[str, str],
    level: float,
    ylabel: str,
    fit: SectionFit | None,
) -> Figure | None:
    """Panel per cluster (plus all tasks): each model's mean curve with CI band over tasks."""
    matrices = {m: x.dropna(how="all") for m, x in matrices.items() if not x.dropna(how="all").empty}
    if not matrices:
        return None
    tasks = list(dict.fromkeys(t for x in matrices.values() for t in x.index))
    names = list(dict.fromkeys(clusters.get(t, "") for t in tasks))
    panels = ([("all tasks", tasks)] if len(names) > 1 else []) + [(c, [t for t in tasks if clusters.get(t, "") == c]) for c in names]
    nrows, ncols = _grid(len(panels), 4)
    fig = Figure(figsize=(2.9 * ncols + 0.6, 2.4 * nrows + 1.1), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    models = list(matrices)
    drawn = []
    for ax, (name, members) in zip(axes.flat, panels):
        for model, matrix in matrices.items():
            drawn.append(_task_mean(ax, matrix.reindex(members), level, model_color(model, models), model))
        if baseline is not None and not baseline.empty:
            agg = across_tasks(baseline.reindex(members).dropna(how="all"), level)
            ax.plot(agg["layer"], agg["mean"], color="#777777", ls=":", lw=1.2, label="majority baseline")
        ax.set_title(f"{name.replace('_', ' ')} (n={len(members)})", fontsize=9)
        draw_sections(ax, fit)
        set_layer_ticks(ax, list(next(iter(matrices.values())).columns), most=9)
    _hide_unused(axes, len(panels))
    _fit_ylim(axes.flat[0], drawn)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if fit is not None:
        handles.append(mpl.lines.Line2D([], [], color=BOUNDARY_COLOR, ls="--"))
        labels.append("section boundary")
    fig.legend(handles, labels, loc="outside upper center", ncol=len(labels), frameon=False)
    fig.supxlabel("layer (0 = embeddings)", fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    return fig


def model_curves(
    matrices: Mapping[str, pd.DataFrame],
    level: float,
    ylabel: str,
    fit: SectionFit | None,
    title: str,
    reference: tuple[float, str] | None = None,
) -> Figure | None:
    """One axes: each model's mean over its tasks per layer, Student-t CI band over tasks
    (where >= MIN_BAND_TASKS tasks); ``reference`` = (y, label) draws a dotted level."""
    matrices = {m: x.dropna(how="all") for m, x in matrices.items() if not x.dropna(how="all").empty}
    if not matrices:
        return None
    fig = Figure(figsize=(7.4, 3.9), layout="constrained")
    ax = fig.subplots()
    models = list(matrices)
    drawn = [_task_mean(ax, x, level, model_color(m, models), f"{m} (n={len(x)})") for m, x in matrices.items()]
    _fit_ylim(ax, drawn)
    if reference is not None and ax.get_ylim()[0] <= reference[0] <= ax.get_ylim()[1]:
        ax.axhline(reference[0], color="#777777", ls=":", lw=1.2, label=reference[1], zorder=1)
    return _finish_layer_axes(fig, ax, list(next(iter(matrices.values())).columns), fit, ylabel, title)


def _finish_layer_axes(fig: Figure, ax, layers: list, fit: SectionFit | None, ylabel: str, title: str) -> Figure:
    """Layer ticks, section boundaries, labels, title and the legend beside the axes."""
    set_layer_ticks(ax, layers)
    draw_sections(ax, fit, labels=True)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, pad=_title_pad(fit))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def comparison_panels(
    panels: Sequence[tuple[str, pd.DataFrame, str]],
    groups: Mapping[str, str],
    level: float,
    fit: SectionFit | None,
    title: str,
) -> Figure | None:
    """Side-by-side per-layer panels (e.g. seen vs unseen), one line per group, CI over tasks."""
    panels = [(t, m.dropna(how="all"), y) for t, m, y in panels if not m.dropna(how="all").empty]
    if not panels:
        return None
    names = sorted(dict.fromkeys(groups.get(t) for _, m, _ in panels for t in m.index))
    palette = {"seen": "#c44e52", "unseen": "#4c72b0"}
    fig = Figure(figsize=(4.6 * len(panels) + 0.5, 3.9), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, matrix, ylabel) in zip(axes, panels):
        drawn = []
        for name in names:
            sub = matrix[[groups.get(t) == name for t in matrix.index]]
            if not sub.empty:
                drawn.append(_task_mean(ax, sub, level, palette.get(name, "#555555"), f"{name} (n={len(sub)})"))
        _fit_ylim(ax, drawn)
        set_layer_ticks(ax, list(matrix.columns))
        draw_sections(ax, fit, labels=True)
        ax.set_title(panel_title, pad=_title_pad(fit))
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(ylabel)
        ax.legend(frameon=False, loc="best")
    fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------- layer x layer


def _layer_matrix_axes(ax, matrix: pd.DataFrame, norm, fit: SectionFit | None, small: bool):
    layers_b, layers_a = list(matrix.columns), list(matrix.index)
    image = ax.imshow(np.ma.masked_invalid(matrix.to_numpy(float)), origin="lower", cmap=mpl.colormaps["magma"], norm=norm,
                      interpolation="nearest", extent=(layers_b[0] - 0.5, layers_b[-1] + 0.5, layers_a[0] - 0.5, layers_a[-1] + 0.5))
    if not small:
        set_layer_ticks(ax, layers_b, "x")
        set_layer_ticks(ax, layers_a, "y")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    for axis in ("x", "y"):
        draw_sections(ax, fit, axis=axis, ci=False)
    return image


def cross_layer_figure(
    matrices: Mapping[str, pd.DataFrame], pair: tuple[str, str], measure: str, fit: SectionFit | None
) -> tuple[Figure | None, Figure | None]:
    """The task-averaged layer x layer matrix (large) and every task's (small multiples)."""
    if not matrices:
        return None, None
    stack = pd.concat(list(matrices.values()))
    mean = stack.groupby(level=0).mean()
    values = finite(stack.to_numpy())
    norm = Normalize(float(values.min()), float(values.max()))
    big = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = big.subplots()
    image = _layer_matrix_axes(ax, mean, norm, fit, small=False)
    ax.plot([mean.columns[0], mean.columns[-1]], [mean.index[0], mean.index[-1]], color="white", lw=0.6, alpha=0.5)
    ax.set_xlabel(f"{pair[1]} layer")
    ax.set_ylabel(f"{pair[0]} layer")
    ax.spines[["top", "right"]].set_visible(True)
    ax.set_title(f"{measure}({pair[0]} layer, {pair[1]} layer), mean over {len(matrices)} task(s)")
    big.colorbar(image, ax=ax, label=measure, shrink=0.85)
    tasks = list(matrices)
    nrows, ncols = _grid(len(tasks), 8)
    grid = Figure(figsize=(1.35 * ncols + 1.2, 1.45 * nrows + 0.9), layout="constrained")
    axes = grid.subplots(nrows, ncols, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        image = _layer_matrix_axes(ax, matrices[task], norm, fit, small=True)
        ax.set_title(_short(task, 21), fontsize=6.5)
    _hide_unused(axes, len(tasks))
    grid.colorbar(image, ax=list(axes.flat), label=measure, shrink=0.6)
    grid.suptitle(f"{measure}({pair[0]}, {pair[1]}) per task: {pair[0]} layer up, {pair[1]} layer across, layer 0 bottom left", fontsize=10)
    return big, grid


# ---------------------------------------------------------------------------- sections


def sections_figure(fit: SectionFit, matrix: pd.DataFrame) -> Figure:
    """The section signal: tasks (faint), their mean with bootstrap band, the supported section fit,
    and below, how often each layer was chosen as a boundary across bootstrap resamples.

    Without supported sections (``fit.found`` False) only the signal and its band are drawn."""
    layers = np.asarray(fit.layers)
    with_boot = bool(fit.boot_starts)
    fig = Figure(figsize=(8.2, 5.2 if with_boot else 4.0), layout="constrained")
    axes = fig.subplots(2 if with_boot else 1, 1, sharex=True, squeeze=False, height_ratios=[3, 1.1] if with_boot else [1])[:, 0]
    ax = axes[0]
    if len(matrix) <= 120:
        for _, row in matrix.reindex(columns=layers).iterrows():
            ax.plot(layers, row.to_numpy(float), color="#b0b0b0", lw=0.6, alpha=0.6, zorder=1)
    curve = np.asarray(fit.curve, float)
    low = np.asarray([np.nan if v is None else v for v in fit.curve_low], float)
    high = np.asarray([np.nan if v is None else v for v in fit.curve_high], float)
    _band(ax, layers, curve, low, high, "black", f"mean over {fit.n_tasks} task(s)", lw=2.0)
    for name, piece in zip(fit.sections, fit.pieces):
        ax.plot(piece["layer"], piece["value"], color=SECTION_COLORS.get(name, "#8c8c8c"), lw=3, alpha=0.85, label=f"{name} fit", zorder=4)
    ax.plot([], [], color="#b0b0b0", lw=0.8, label="single tasks")
    set_layer_ticks(ax, list(layers))
    draw_sections(ax, fit, labels=True)
    ax.set_ylabel(fit.description.split(", mean")[0])
    title = (f"Section signal and {fit.n_sections}-section fit ({fit.segment_model})" if fit.found
             else f"Section signal: no section structure (p = {fit.p_value:.3g} against a smooth curve)")
    ax.set_title(title, pad=_title_pad(fit))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if with_boot:
        starts = np.asarray(fit.boot_starts)
        width = 0.8 / max(1, starts.shape[1])
        for col, name in enumerate(fit.names[1:]):
            counts = pd.Series(starts[:, col]).value_counts().reindex(layers, fill_value=0) / len(starts)
            offset = (col - (starts.shape[1] - 1) / 2) * width
            axes[1].bar(layers + offset, counts.to_numpy(), width=width, color=SECTION_COLORS.get(name, "#8c8c8c"), label=f"{name} start")
        axes[1].set_ylabel("share of\nresamples")
        axes[1].set_ylim(0, 1.05)
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title=f"bootstrap ({len(starts)})")
    set_layer_ticks(axes[-1], list(layers))
    axes[-1].set_xlabel("layer (0 = embeddings)")
    return fig

