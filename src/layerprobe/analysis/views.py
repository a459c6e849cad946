"""Task x layer views of the merged results, with the report's choices applied.

:class:`Views` resolves which probe, split, metric and similarity measure the report
shows (``auto`` picks a sensible one; an explicit name absent from the data is a
one-line error listing what is there) and serves the matrices and long tables that
sections, tables and figures are drawn from. Seeds are already averaged here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .config import AnalysisConfig
from .errors import ConfigError
from .load import RunData, aggregate, aggregate_probes, aggregate_similarity

CONTROL_PREFIX = "control"
MEASURE_PREFERENCE = ("debiased_cka", "linear_cka", "rbf_cka")  # debiased first: biased CKA has an n/d floor


def is_control(model: str) -> bool:
    return model == CONTROL_PREFIX or model.startswith(CONTROL_PREFIX + ":")


def _resolve(name: str, option: str, available: list[str], preferred: tuple[str, ...], source: str) -> str | None:
    """The value of a data-dependent option: ``auto`` picks from ``preferred``, then the first."""
    if not available:
        return None
    if option == "auto":
        for candidate in preferred:
            if candidate in available:
                return candidate
        return available[0]
    if option not in available:
        raise ConfigError(f"{name}={option!r} is not in {source}; available: {', '.join(available)}; set {name}=<one of them>")
    return option


@dataclass
class Views:
    """Aggregated results plus the resolved report options."""

    probes: pd.DataFrame  # aggregated, filtered to the chosen probe and split
    similarity: pd.DataFrame  # aggregated, all measures and pairs
    tasks: pd.DataFrame
    pair: tuple[str, str]
    metric: str | None
    probe: str | None
    split: str | None
    measure: str | None
    level: float
    models: list[str] = field(default_factory=list)  # non-control roles, pair first
    has_pair: bool = True  # both roles of the pair are in the results
    notes: list[str] = field(default_factory=list)
    # val accuracy of the same probe (aggregated over seeds): what best-layer choices are made on
    selection: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def build(cls, data: RunData, cfg: AnalysisConfig) -> "Views":
        raw = data.probes
        split = _resolve("split", cfg.split, sorted(raw["split"].unique()), ("test",), "probes.csv")
        raw = raw[raw["split"] == split]
        probe = _resolve("probe", cfg.probe, sorted(raw["probe"].unique()), ("linear",), f"probes.csv (split {split})")
        raw = raw[raw["probe"] == probe]
        metrics = sorted(raw["metric"].unique())
        metric = _resolve("metric", cfg.metric, metrics, ("accuracy",), f"probes.csv (probe {probe})")
        measures = sorted(data.similarity["measure"].unique())
        preferred = MEASURE_PREFERENCE + tuple(m for m in measures if "cka" in m)
        measure = _resolve("measure", cfg.measure, measures, preferred, "similarity.csv")
        probes = aggregate_probes(raw, cfg.ci)
        similarity = aggregate_similarity(data.similarity, cfg.ci)
        present = set(probes["model"]) | set(similarity["model_a"]) | set(similarity["model_b"])
        roles = sorted(m for m in present if not is_control(m))
        models = [m for m in cfg.pair if m in roles] + [m for m in roles if m not in cfg.pair]
        missing = [m for m in cfg.pair if m not in present]
        views = cls(probes, similarity, data.tasks, (cfg.pair[0], cfg.pair[1]), metric, probe, split, measure, cfg.ci, models, not missing)
        raw_all = data.probes
        val = raw_all[(raw_all["split"] == "val") & (raw_all["probe"] == probe) & (raw_all["metric"] == "accuracy")]
        views.selection = aggregate_probes(val, cfg.ci) if not val.empty else pd.DataFrame()
        if missing:
            views.notes.append(
                f"model role(s) {', '.join(missing)} of pair={list(cfg.pair)} not in the results "
                f"(roles present: {', '.join(roles) or 'none'}); comparisons between models are skipped — set pair=[a,b] to choose two roles"
            )
        return views

    # ------------------------------------------------------------------ structure

    def task_order(self, tasks: "list[str] | pd.Index | None" = None) -> list[str]:
        """Tasks sorted by cluster, then name (the order of every task axis)."""
        order = list(self.tasks["task"])
        if tasks is None:
            return order
        wanted = set(tasks)
        return [t for t in order if t in wanted]

    def cluster_of(self) -> dict[str, str]:
        return dict(zip(self.tasks["task"], self.tasks["cluster"]))

    def seen_of(self) -> dict[str, object]:
        return dict(zip(self.tasks["task"], self.tasks["seen"]))

    def clusters(self) -> list[str]:
        return list(dict.fromkeys(self.tasks["cluster"]))

    def layers(self) -> list[int]:
        found = set(self.probes["layer"]) | set(self.similarity["layer_a"]) | set(self.similarity["layer_b"])
        return list(range(min(found), max(found) + 1)) if found else []

    # ------------------------------------------------------------------ probe views

    def metric_long(self, model: str, metric: str | None = None) -> pd.DataFrame:
        """task, layer, mean, ci_low, ci_high, n of one model's probe metric."""
        metric = metric or self.metric
        rows = self.probes[(self.probes["model"] == model) & (self.probes["metric"] == metric)]
        return rows[["task", "layer", "mean", "ci_low", "ci_high", "n"]].reset_index(drop=True)

    def metric_matrix(self, model: str, metric: str | None = None) -> pd.DataFrame:
        """task x layer matrix (rows in task order, all layers as columns)."""
        return self._matrix(self.metric_long(model, metric))

    def selection_matrix(self, model: str) -> pd.DataFrame:
        """task x layer val accuracy of one model (the basis of every best-layer choice); empty if absent."""
        if self.selection.empty:
            return self._matrix(pd.DataFrame())
        rows = self.selection[self.selection["model"] == model]
        return self._matrix(rows[["task", "layer", "mean"]])

    def has_metric(self, model: str, metric: str | None = None) -> bool:
        return not self.metric_long(model, metric).empty

    def delta_matrix(self, metric: str | None = None) -> pd.DataFrame:
        """pair[1] - pair[0] per task and layer (seed means)."""
        a, b = self.pair
        return self.metric_matrix(b, metric) - self.metric_matrix(a, metric)

    # ------------------------------------------------------------------ similarity views

    def similarity_long(self, model_a: str, model_b: str, measure: str | None = None, diagonal: bool = True) -> pd.DataFrame:
        """Rows comparing ``model_a`` with ``model_b``, oriented a -> b whatever the stored order."""
        measure = measure or self.measure
        sim = self.similarity[self.similarity["measure"] == measure]
        forward = sim[(sim["model_a"] == model_a) & (sim["model_b"] == model_b)]
        backward = sim[(sim["model_a"] == model_b) & (sim["model_b"] == model_a)]
        backward = backward.rename(columns={"layer_a": "layer_b", "layer_b": "layer_a"})
        rows = pd.concat([forward, backward], ignore_index=True)  # aggregation kept one orientation only
        if diagonal:
            rows = rows[rows["layer_a"] == rows["layer_b"]].assign(layer=lambda d: d["layer_a"])
        return rows.reset_index(drop=True)

    def cka_long(self) -> pd.DataFrame:
        """Diagonal similarity of the pair: task, layer, mean, ci_low, ci_high, null_mean."""
        return self.similarity_long(*self.pair)

    def cka_matrix(self) -> pd.DataFrame:
        return self._matrix(self.cka_long())

    def has_controls(self) -> bool:
        return any(is_control(m) for m in {*self.similarity["model_a"], *self.similarity["model_b"]})

    def control_cka_matrix(self, model: str | None = None) -> pd.DataFrame:
        """CKA(model, control for the row's task), task x layer; model defaults to pair[1] (MOSSA)."""
        tuned = model or self.pair[1]
        frames = []
        for model in sorted({*self.similarity["model_a"], *self.similarity["model_b"]}):
            if not is_control(model):
                continue
            rows = self.similarity_long(tuned, model)
            if model != CONTROL_PREFIX:
                rows = rows[rows["task"] == model.split(":", 1)[1]]
            frames.append(rows)
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["task", "layer", "mean"])
        return self._matrix(rows)

    def cross_layer(self) -> dict[str, pd.DataFrame]:
        """Per task, the full layer_a x layer_b matrix of the pair (only complete ones)."""
        rows = self.similarity_long(*self.pair, diagonal=False)
        out = {}
        for task in self.task_order(rows["task"].unique()):
            sub = rows[rows["task"] == task]
            if sub["layer_a"].nunique() > 1 and (sub["layer_a"] != sub["layer_b"]).any():
                out[task] = sub.pivot_table(index="layer_a", columns="layer_b", values="mean")
        return out

    # ------------------------------------------------------------------ helpers

    def _matrix(self, rows: pd.DataFrame) -> pd.DataFrame:
        if rows.empty:
            return pd.DataFrame(index=pd.Index([], name="task"), columns=pd.Index(self.layers(), name="layer"), dtype=float)
        wide = rows.pivot_table(index="task", columns="layer", values="mean")
        return wide.reindex(index=self.task_order(wide.index), columns=self.layers()).astype(float)


def across_tasks(matrix: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per layer: mean over the matrix's tasks with a Student-t CI (tasks as repeats)."""
    long = matrix.reset_index().melt(id_vars="task", var_name="layer", value_name="value")
    long["layer"] = long["layer"].astype(int)
    return aggregate(long, ["layer"], level)


def finite(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]
