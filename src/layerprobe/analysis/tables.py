"""Per-task and per-group summary tables.

``summary.csv`` has one row per task: each model's best layer and its score, the layer
where pair[1] overtakes pair[0], and the mean CKA and score delta within each section.
The best layer is chosen on val accuracy and its score is reported on the shown split
(test by default), with a CI over seeds where there are several. Group summaries
(clusters, seen/unseen) average those rows over tasks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .sections import NAMES_BY_COUNT, SectionFit
from .views import Views


def overtake_layer(delta: pd.Series, margin: float = 0.0) -> float:
    """First layer from which ``delta`` (indexed by layer) stays above ``margin``; NaN if never.

    Requiring every later layer to stay above keeps a noisy early blip from counting.
    """
    delta = delta.dropna().sort_index()
    if delta.empty or delta.iloc[-1] <= margin:
        return np.nan
    below = np.flatnonzero(delta.to_numpy() <= margin)
    return float(delta.index[below[-1] + 1] if len(below) else delta.index[0])


def _best(matrix: pd.DataFrame, selection: pd.DataFrame | None = None) -> tuple[pd.Series, pd.Series]:
    """Per task: the layer chosen on ``selection`` (highest value, earliest on ties) and ``matrix`` there.

    ``selection`` is the val accuracy: choosing the best layer on the split that is reported
    (test) would bias the reported value upwards. Tasks without selection values choose on
    ``matrix`` itself (old runs without val rows); :func:`task_summary` says which.
    """
    chooser = matrix if selection is None else selection.reindex(index=matrix.index, columns=matrix.columns)
    chooser = chooser.where(matrix.notna())  # only layers that have a reported value
    filled = chooser.dropna(axis=0, how="all")
    layer = filled.idxmax(axis=1).astype(float).reindex(matrix.index)
    missing = layer.isna() & matrix.notna().any(axis=1)
    if missing.any():  # no val value for this task: fall back to the reported split
        layer[missing] = matrix[missing].dropna(axis=0, how="all").idxmax(axis=1).astype(float)
    value = pd.Series({t: matrix.at[t, int(l)] if pd.notna(l) else np.nan for t, l in layer.items()}, dtype=float)
    return layer, value.reindex(matrix.index)


def _at_layer(long: pd.DataFrame, layer: pd.Series, column: str) -> pd.Series:
    """``long[column]`` at each task's chosen layer (NaN where absent)."""
    keyed = long.set_index(["task", "layer"])[column]
    return pd.Series({t: keyed.get((t, int(l)), np.nan) if pd.notna(l) else np.nan for t, l in layer.items()}, dtype=float)


def _section_means(matrix: pd.DataFrame, fit: SectionFit | None) -> dict[str, pd.Series]:
    if fit is None or matrix.empty:
        return {}
    out = {}
    for name, (lo, hi) in fit.sections.items():
        cols = [c for c in matrix.columns if lo <= c <= hi]
        out[name] = matrix[cols].mean(axis=1)
    return out


def task_summary(views: Views, fit: SectionFit | None, margin: float = 0.0) -> pd.DataFrame:
    """One row per task; see the module docstring for the columns."""
    table = views.tasks[["task", "cluster", "seen"]].set_index("task")
    metric = views.metric
    if metric is not None:
        for model in views.models:
            if views.has_metric(model):
                selection = views.selection_matrix(model)
                has_val = not selection.dropna(how="all").empty
                layer, value = _best(views.metric_matrix(model), selection if has_val else None)
                table[f"best_layer_{model}"] = layer
                table[f"best_{metric}_{model}"] = value
                long = views.metric_long(model)
                if long["n"].max() > 1:  # several seeds: the CI of the reported value
                    table[f"best_{metric}_{model}_ci_low"] = _at_layer(long, layer, "ci_low")
                    table[f"best_{metric}_{model}_ci_high"] = _at_layer(long, layer, "ci_high")
                table[f"best_layer_{model}_chosen_on"] = "val accuracy" if has_val else f"{views.split} {metric}"
        if views.has_metric(views.models[0] if views.models else "", "majority_baseline"):
            table["majority_baseline"] = views.metric_matrix(views.models[0], "majority_baseline").mean(axis=1)
    if views.has_pair and metric is not None:
        delta = views.delta_matrix()
        if not delta.dropna(how="all").empty:
            table["overtake_layer"] = pd.Series({task: overtake_layer(row, margin) for task, row in delta.iterrows()}, dtype=float)
            for name, values in _section_means(delta, fit).items():
                table[f"delta_{metric}_{name}"] = values
    if views.has_pair and views.measure is not None:
        for name, values in _section_means(views.cka_matrix(), fit).items():
            table[f"cka_{name}"] = values
    table = table.reindex(views.task_order(table.index))
    return table.reset_index()


def group_summary(summary: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean of every numeric column of ``summary`` per value of ``by`` (plus task counts)."""
    data = summary.copy()
    if by == "seen":
        data = data[data["seen"].notna()]
        data["seen"] = data["seen"].map({True: "seen", False: "unseen"})
    numeric = [c for c in data.columns if c not in ("task", "cluster", "seen") and pd.api.types.is_numeric_dtype(data[c])]
    grouped = data.groupby(by, sort=False)
    out = grouped[numeric].mean()
    out.insert(0, "n_tasks", grouped.size())
    if by != "seen":
        out.insert(1, "n_seen", grouped["seen"].apply(lambda s: int((s == True).sum())))  # noqa: E712 (object column)
    return out.reset_index()


# every section name in layer order: the 4-section fit's names hold the 2- and 3-section ones
ORDERED_SECTIONS = NAMES_BY_COUNT[max(NAMES_BY_COUNT)]


def section_columns(summary: pd.DataFrame) -> list[str]:
    """The per-section columns of a summary (``cka_shared``, ``delta_accuracy_late``...), in section
    order, each section's columns in their order in ``summary``."""
    return [c for name in ORDERED_SECTIONS for c in summary.columns if c.endswith(f"_{name}")]
