"""``write_report``: read runs, fit sections, draw figures, write tables and the report.

Everything is written into a hidden staging folder inside ``out_dir`` first and moved
into place only when all of it succeeded, ``report.md`` and ``report.html`` last: an
error never leaves a report that looks complete.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib as mpl
import pandas as pd

from . import figures as F
from .config import AnalysisConfig
from .errors import AnalysisError
from .load import RunData, load_runs
from .render import Block, FigureBlock, Heading, Note, Paragraph, Preformatted, TableBlock, to_html, to_markdown
from .sections import SECTION_NAMES, SEGMENT_TEXT, SectionFit, detect_sections, signal_matrix
from .tables import group_summary, task_summary
from .views import Views, across_tasks, is_control

MAX_LISTED = 30
REPORT_FILES = ("report.md", "report.html")  # published last


def write_report(run_dirs: Sequence[Path], out_dir: Path, cfg: AnalysisConfig | None = None) -> dict:
    """Analyze ``run_dirs`` (run dirs, multirun roots or any tree holding them) into ``out_dir``.

    Returns the written paths (``report_html``, ``report_md``, ``sections_json``,
    ``tables``, ``figures``), the ``sections`` dict as in ``sections.json``, the
    ``missing_jobs`` and ``warnings``. Raises :class:`AnalysisError` (one line) when the
    inputs hold no results or an option does not match the data.
    """
    cfg = cfg or AnalysisConfig()
    if not run_dirs:
        raise AnalysisError("no run directories given; pass runs=DIR (a train.py run or multirun dir)")
    out_dir = Path(out_dir).resolve()
    data = load_runs([Path(p) for p in run_dirs], exclude=[out_dir])
    views = Views.build(data, cfg)
    if cfg.signal == "auto":  # the study's signal when control models exist, else the pair's CKA distance
        cfg = dataclasses.replace(cfg, signal="control_cka" if views.has_controls() else "cka_distance")
    fit, reason = detect_sections(views, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-staging-", dir=out_dir))
    try:
        result = _build(data, views, fit, reason, cfg, staging)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _relocate(result, staging, out_dir)


# ---------------------------------------------------------------------------- publishing


def _publish(staging: Path, out_dir: Path) -> None:
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in REPORT_FILES)  # the report itself last
    for path in files:
        target = out_dir / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def _relocate(value, staging: Path, out_dir: Path):
    if isinstance(value, Path):
        return out_dir / value.relative_to(staging) if value.is_relative_to(staging) else value
    if isinstance(value, dict):
        return {k: _relocate(v, staging, out_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, staging, out_dir) for v in value]
    return value


# ---------------------------------------------------------------------------- building


def _png_width(path: Path) -> int:
    """Pixel width from the PNG header (the saved figure is cropped to its content)."""
    return int.from_bytes(path.read_bytes()[16:20], "big")


class _Document:
    """Collects blocks; saves figures into ``figures/`` and numbers them."""

    def __init__(self, staging: Path, cfg: AnalysisConfig):
        self.staging, self.cfg = staging, cfg
        self.blocks: list[Block] = []
        self.figures: dict[str, dict[str, Path]] = {}

    def add(self, block: Block) -> None:
        self.blocks.append(block)

    def figure(self, key: str, title: str, caption: str, fig) -> None:
        if fig is None:
            return
        files = F.save(fig, key, self.staging / "figures", self.cfg.figure_format, self.cfg.dpi)
        self.figures[key] = files
        number = len(self.figures)
        self.add(FigureBlock(key, f"Figure {number}: {title}", caption, files["png"], _png_width(files["png"]) / self.cfg.dpi, files))

    def table(self, name: str, title: str, caption: str, frame: pd.DataFrame) -> Path:
        path = self.staging / name
        frame.to_csv(path, index=False)
        self.add(TableBlock(title, caption, frame, name))
        return path


def _sections_json(views: Views, fit: SectionFit | None, reason: str, cfg: AnalysisConfig, data: RunData) -> dict:
    context = {
        "pair": list(views.pair), "measure": views.measure, "metric": views.metric, "probe": views.probe,
        "split": views.split, "include_embedding": cfg.include_embedding, "min_section_layers": cfg.min_section_layers,
        "inputs": [str(p) for p in data.inputs],
    }
    if fit is None:
        return {**{name: None for name in SECTION_NAMES}, "found": False, "n_sections": None, "p_value": None,
                "signal": cfg.signal, "reason": reason, **context}
    return {**fit.to_json(), **context}


def _compact_json(value) -> str:
    """Indented JSON with lists of plain values kept on one line (``"shared": [0, 9]``)."""
    text = json.dumps(value, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def _seen_groups(views: Views) -> tuple[dict[str, str], str]:
    seen = {t: ("seen" if s else "unseen") for t, s in views.seen_of().items() if s is not None}
    kinds = set(seen.values())
    if not seen:
        return {}, "tasks.csv marks no task as seen or unseen (column `seen`); the seen vs unseen comparison is skipped"
    if len(kinds) < 2:
        return {}, f"every task with a `seen` flag is {kinds.pop()}; the seen vs unseen comparison needs both"
    return seen, ""


def _meta(data: RunData, views: Views, cfg: AnalysisConfig) -> list[str]:
    layers = views.layers()
    n_rep = views.probes["n"] if not views.probes.empty else views.similarity["n"]
    reps = f"{int(n_rep.min())}" if n_rep.min() == n_rep.max() else f"{int(n_rep.min())}–{int(n_rep.max())}"
    span = f"layers {layers[0]}–{layers[-1]} (0 = embeddings)" if layers else "no layers"
    return [
        f"{len(views.tasks)} task(s) in {len(views.clusters())} cluster(s) · {span} · models: {', '.join(views.models) or 'none'}",
        f"pair: {views.pair[0]} vs {views.pair[1]} · probe: {views.probe} · split: {views.split} · metric: {views.metric} · "
        f"similarity: {views.measure} · repeats (seeds) per cell: {reps}",
        f"inputs: {', '.join(str(p) for p in data.inputs)} · {len(data.result_dirs)} result dir(s)"
        + (f", {len(data.missing)} missing job(s)" if data.missing else "")
        + f" · generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]


def _notes(data: RunData, views: Views, fit: SectionFit | None, reason: str, seen_note: str) -> list[str]:
    """Everything the reader should know that is not a missing job, one line each."""
    notes = views.notes + data.warnings + ([f"sections not fitted: {reason}"] if reason else []) + ([seen_note] if seen_note else [])
    if fit is not None and not fit.found:
        notes.append(f"no section structure: {fit.reason}; no boundaries are drawn")
    if fit is not None and fit.found and fit.at_minimum:
        notes.append(f"section(s) {', '.join(fit.at_minimum)} sit at min_section_layers={fit.min_section_layers}")
    if fit is not None and fit.undefined_layers:
        notes.append(f"the section signal is undefined (NaN) at layer(s) {', '.join(map(str, fit.undefined_layers))} for every task; "
                     f"sections are fitted over layers {fit.layers[0]}–{fit.layers[-1]}")
    return notes


def _note_blocks(data: RunData, notes: list[str]) -> list[Block]:
    blocks: list[Block] = []
    if data.missing:
        items = [m.describe() for m in data.missing[:MAX_LISTED]]
        if len(data.missing) > MAX_LISTED:
            items.append(f"… and {len(data.missing) - MAX_LISTED} more")
        blocks.append(Note(f"Partial results: {len(data.missing)} job(s) left no results and are not in this report", items))
    if notes:
        blocks.append(Note("Notes", notes))
    return blocks


def _test_rows(fit: SectionFit) -> pd.DataFrame:
    rows = [{"simpler fit": t.simple, "richer fit": t.rich, "F": f"{t.statistic:.4g}", "p_value": f"{t.p_value:.3g}",
             "sign flips": t.resamples, f"significant at {fit.alpha}": "yes" if t.p_value < fit.alpha else "no"} for t in fit.tests]
    return pd.DataFrame(rows)


def _sections_blocks(doc: _Document, views: Views, fit: SectionFit | None, reason: str, cfg: AnalysisConfig) -> None:
    doc.add(Heading("Sections"))
    if fit is None:
        doc.add(Paragraph(f"No sections were fitted: {reason}."))
        return
    level = round(cfg.ci * 100)
    test_text = (
        f"Sections are tested before they are drawn: a smooth curve (polynomial of degree {fit.null_degree} in the layer "
        f"index) plus 0-3 kinks is fitted, and each added kink must reduce the squared error more than under a task-level "
        f"sign-flip randomization of the simpler fit (level {fit.alpha})."
    )
    matrix, _ = signal_matrix(views, cfg.signal)
    if not fit.found:
        doc.add(Paragraph(
            f"Signal: {fit.description}. No section structure: the 3-section fit does not improve significantly on a "
            f"smooth curve (p = {fit.p_value:.3g}), so no section boundaries are drawn and no per-section summaries are given. "
            f"{test_text}"
        ))
        doc.add(TableBlock("Section tests", "Each richer fit against the simpler one (F = relative reduction of the squared error).",
                           _test_rows(fit), "sections.json"))
        doc.figure("sections_signal", "Section signal", (
            f"Grey: each task's signal; black: mean over tasks with its {level}% bootstrap band. No section structure was "
            "found, so no fit or boundary is drawn."
        ), F.sections_figure(fit, matrix))
        return
    rows = []
    for name, (lo, hi) in fit.sections.items():
        ci = fit.ci.get(f"{name}_start")
        rows.append({"section": name, "first_layer": lo, "last_layer": hi, "n_layers": hi - lo + 1,
                     f"first_layer_{level}%_ci": f"{ci[0]}–{ci[1]}" if ci else "–",
                     "at min_section_layers": "yes" if name in fit.at_minimum else ""})
    agreement = f" {fit.agreement:.0%} of resamples put every boundary within one layer of these." if fit.agreement is not None else ""
    ci_text = (f"{level}% CIs: percentile bootstrap over tasks ({cfg.bootstrap} resamples).{agreement}"
               if fit.ci else "No CIs: the bootstrap needs two or more tasks and bootstrap > 0.")
    pinned = (f" The {', '.join(fit.at_minimum)} section(s) sit at min_section_layers={fit.min_section_layers}: the fit "
              "may want them shorter still, so read those boundaries as 'at most'." if fit.at_minimum else "")
    doc.add(Paragraph(
        f"Signal: {fit.description}. {fit.n_sections} sections are supported (p = {fit.p_value:.3g} against a smooth curve). "
        f"{test_text} The boundaries come from the least-squares {fit.n_sections}-section fit '{fit.segment_model}' "
        f"({SEGMENT_TEXT[fit.segment_model]}), exact by dynamic programming; sections are named by position. "
        f"{ci_text}{pinned} Boundaries are drawn as dashed lines on every per-layer figure."
    ))
    doc.add(TableBlock("Fitted sections", "Layers of each section (inclusive); the CI is for the section's first layer.", pd.DataFrame(rows), "sections.json"))
    doc.add(TableBlock("Section tests", "Each richer fit against the simpler one (F = relative reduction of the squared error).",
                       _test_rows(fit), "sections.json"))
    doc.figure("sections_signal", "Section signal and fit", (
        f"Grey: each task's signal; black: mean over tasks with its {level}% bootstrap band; coloured: the fitted "
        "segments; dashed: boundaries, grey shading: their CIs. Bottom: how often each layer "
        "was chosen as the first layer of each section across bootstrap resamples."
    ), F.sections_figure(fit, matrix))


def _probe_blocks(doc: _Document, views: Views, fit: SectionFit | None, cfg: AnalysisConfig) -> None:
    metric, models = views.metric, [m for m in views.models if views.has_metric(m)]
    if metric is None or not models:
        return
    clusters, level = views.cluster_of(), round(cfg.ci * 100)
    a, b = views.pair
    doc.add(Heading("Probes"))
    where = f"{views.probe} probe, {views.split} split, mean over seeds"
    doc.figure(f"{metric}_heatmap", f"Probe {metric} per task and layer", (
        f"{metric.replace('_', ' ').capitalize()} ({where}) of each model; rows are tasks grouped by cluster (named on the right), "
        "columns layers. Grey cells were not measured. Dashed lines: section boundaries."
    ), F.task_layer_heatmap([(m, views.metric_matrix(m)) for m in models], clusters, metric, fit))
    if metric != "selectivity" and any(views.has_metric(m, "selectivity") for m in models):
        doc.figure("selectivity_heatmap", "Probe selectivity per task and layer", (
            f"Selectivity = {metric} minus the same probe's accuracy on a control task ({where}; one random label per "
            "recurring input type, Hewitt & Liang 2019, docs/probing.md): "
            "high where the representation, not the probe's capacity, carries the task."
        ), F.task_layer_heatmap([(m, views.metric_matrix(m, "selectivity")) for m in models], clusters, "selectivity", fit))
    if views.has_pair and a in models and b in models:
        doc.figure(f"{metric}_delta_heatmap", f"{b} − {a} probe {metric}", (
            f"Difference of the seed means per task and layer; red: {b} decodes the task better, blue: {a} does. "
            "The colour scale is symmetric about zero."
        ), F.task_layer_heatmap([(f"{b} − {a}", views.delta_matrix())], clusters, f"Δ {metric} ({b} − {a})", fit, diverging=True))
    baseline = views.metric_matrix(models[0], "majority_baseline") if views.has_metric(models[0], "majority_baseline") else None
    doc.figure(f"{metric}_by_cluster", f"Probe {metric} per layer, by cluster", (
        f"Mean over the tasks of each cluster; bands: {level}% Student-t CI over tasks (where {F.MIN_BAND_TASKS}+ tasks); "
        "dotted: majority-class baseline."
    ), F.model_curves_by_cluster({m: views.metric_matrix(m) for m in models}, baseline, clusters, cfg.ci, metric, fit))


MDL_METRIC = "compression"  # probes.csv: uniform codelength / online (prequential) codelength, train split


def _mdl_matrices(data: RunData, views: Views, split: str, level: float) -> dict[str, pd.DataFrame]:
    """task x layer compression (seed means) per role on ``split``; the controls pooled as one
    role ``control`` (each task's control model on its own task)."""
    from .load import aggregate_probes

    raw = data.probes
    rows = aggregate_probes(raw[(raw["metric"] == MDL_METRIC) & (raw["probe"] == views.probe) & (raw["split"] == split)], level)
    rows = rows.assign(role=rows["model"].map(lambda m: "control" if is_control(m) else m))
    order = [m for m in views.models if m in set(rows["role"])] + sorted(set(rows["role"]) - set(views.models))
    return {role: views._matrix(rows[rows["role"] == role]) for role in order}  # the views' task order and layers


def _mdl_summary(shown: dict[str, pd.DataFrame], chooser: dict[str, pd.DataFrame], chosen_on: str, level: float) -> pd.DataFrame:
    """Per role: the layer of highest mean compression over tasks (chosen on ``chooser``), the mean and CI over tasks there."""
    rows = []
    for role, matrix in shown.items():
        curve = across_tasks(matrix.dropna(how="all"), level).set_index("layer")
        pick = across_tasks(chooser[role].dropna(how="all"), level).set_index("layer") if role in chooser else curve
        pick = pick["mean"].reindex(curve.index).dropna()
        if pick.empty:
            continue
        best = int(pick.idxmax())  # earliest layer on ties
        rows.append({"model": role, "n_tasks": int(curve.at[best, "n"]), "best_layer": best, "compression": curve.at[best, "mean"],
                     "ci_low": curve.at[best, "ci_low"], "ci_high": curve.at[best, "ci_high"], "chosen_on": chosen_on})
    return pd.DataFrame(rows, columns=["model", "n_tasks", "best_layer", "compression", "ci_low", "ci_high", "chosen_on"])


def _mdl_blocks(doc: _Document, data: RunData, views: Views, fit: SectionFit | None, cfg: AnalysisConfig) -> Path | None:
    """Per-layer MDL compression of every role (mean over tasks, CI over tasks) and each role's best layer."""
    splits = sorted(data.probes.loc[data.probes["metric"] == MDL_METRIC, "split"].unique())
    if views.probe is None or not splits:
        return None
    split = views.split if views.split in splits else "train" if "train" in splits else splits[0]
    shown = _mdl_matrices(data, views, split, cfg.ci)
    if not shown:
        return None
    if "val" in splits and split != "val":
        chooser, chosen_on = _mdl_matrices(data, views, "val", cfg.ci), "val compression"
    else:
        chooser, chosen_on = shown, f"{split} compression (no val split for this metric)"
    level = round(cfg.ci * 100)
    doc.add(Heading("Probe compression (MDL)"))
    doc.figure("mdl_compression", "MDL compression per layer", (
        f"Compression = uniform codelength / online (prequential) codelength of the {views.probe} probe on the {split} split "
        f"(Voita & Titov 2020; docs/probing.md): each block of examples is coded by a probe trained on the blocks before it, "
        f"so higher = the task is decodable from fewer examples; 1 = no better than the uniform code (dotted). Mean over tasks "
        f"(n per model in the legend, mean over seeds first); bands: {level}% Student-t CI over tasks (where "
        f"{F.MIN_BAND_TASKS}+ tasks); control = each task's control model on its own task."
    ), F.model_curves(shown, cfg.ci, "compression (uniform / MDL)", fit, f"MDL compression, {views.probe} probe",
                      reference=(1.0, "uniform code")))
    return doc.table("mdl_summary.csv", "Best compression per model", (
        f"The layer with the highest mean compression over tasks, chosen on {chosen_on}; compression there: mean and "
        f"{level}% Student-t CI over tasks ({split} split). The online code scores every example before the probe trains on "
        "it, so the train split is not an in-sample fit here."
    ), _mdl_summary(shown, chooser, chosen_on, cfg.ci))


def _similarity_blocks(doc: _Document, views: Views, fit: SectionFit | None, cfg: AnalysisConfig) -> None:
    if not views.has_pair or views.measure is None:
        return
    long = views.cka_long()
    if long.empty:
        return
    a, b = views.pair
    measure, clusters, level = views.measure, views.cluster_of(), round(cfg.ci * 100)
    matrix = views.cka_matrix()
    doc.add(Heading("Similarity"))
    doc.figure("cka_heatmap", f"{measure}({a}, {b}) per task and layer", (
        f"Similarity of the two models' representations at the same layer. Rows: tasks by cluster."
    ), F.task_layer_heatmap([(f"{measure}({a}, {b})", matrix)], clusters, measure, fit))
    doc.figure("cka_per_task", f"{measure}({a}, {b}) per layer, each task", (
        "Bands: the CI from similarity.csv for a single repeat (the pipeline's bootstrap over examples) or a Student-t CI "
        "over seeds; dotted: the permutation-null mean where computed (biased CKA has a floor above zero)."
    ), F.task_curves_grid(long, views.task_order(), clusters, f"{measure}({a}, {b})", fit))
    doc.figure("cka_by_cluster", f"{measure}({a}, {b}) per layer, cluster means", (
        f"Mean over the tasks of each cluster; bands (for up to {F.MAX_BANDS} clusters, where {F.MIN_BAND_TASKS}+ tasks): "
        f"{level}% Student-t CI over tasks; black: all tasks."
    ), F.grouped_curves(matrix, clusters, cfg.ci, measure, fit, f"{measure}({a}, {b})"))
    mean_fig, grid_fig = F.cross_layer_figure(views.cross_layer(), views.pair, measure, fit)
    doc.figure("cka_layer_matrix", f"Layer × layer {measure}, mean over tasks", (
        f"Similarity between every layer of {a} (rows, bottom = layer 0) and every layer of {b} (columns). "
        "Mass along the diagonal means corresponding layers match; dashed lines: section boundaries."
    ), mean_fig)
    doc.figure("cka_layer_matrix_tasks", f"Layer × layer {measure} per task", "One shared colour scale for all tasks.", grid_fig)


def _seen_blocks(doc: _Document, views: Views, fit: SectionFit | None, cfg: AnalysisConfig, seen: dict[str, str], summary: pd.DataFrame) -> Path | None:
    if not seen or not views.has_pair:
        return None
    a, b = views.pair
    doc.add(Heading("Seen vs unseen tasks"))
    panels = []
    if views.metric is not None and views.has_metric(a) and views.has_metric(b):
        panels.append((f"{b} − {a} probe {views.metric}", views.delta_matrix(), f"Δ {views.metric}"))
    if views.measure is not None and not views.cka_long().empty:
        panels.append((f"{views.measure}({a}, {b})", views.cka_matrix(), views.measure))
    doc.figure("seen_vs_unseen", "Seen vs unseen tasks", (
        f"Tasks in {b}'s instruction-tuning mix (seen) against held-out tasks (unseen); bands: {round(cfg.ci * 100)}% "
        f"Student-t CI over tasks (where {F.MIN_BAND_TASKS}+ tasks)."
    ), F.comparison_panels(panels, seen, cfg.ci, fit, f"Does {b} change seen tasks more than unseen ones?"))
    return doc.table("seen_unseen.csv", "Seen vs unseen summary", "Means over the tasks of each group of the per-task summary columns.", group_summary(summary, "seen"))


def _control_blocks(doc: _Document, views: Views, fit: SectionFit | None, cfg: AnalysisConfig, seen: dict[str, str]) -> Path | None:
    """MOSSA: every experimental model against each task's control model, task by task and layer by layer."""
    if views.measure is None or not views.has_controls():
        return None
    measure, clusters, level = views.measure, views.cluster_of(), round(cfg.ci * 100)
    matrices = {m: views.control_cka_matrix(m) for m in views.models}
    matrices = {m: x for m, x in matrices.items() if not x.dropna(how="all").empty}
    if not matrices:
        return None
    a, b = views.pair
    doc.add(Heading("Control models (MOSSA)"))
    doc.add(Paragraph(
        f"Each task's control model is fine-tuned on that task alone; high {measure}(model, control_t) at a layer means "
        f"the model already represents task t there the way a specialist does. Each comparison is on task t's own "
        f"{views.split or 'test'} examples."))
    doc.figure("control_cka_heatmaps", f"{measure}(model, control of the task) per task and layer", (
        "Rows: tasks by cluster; one colour scale for all panels."
    ), F.task_layer_heatmap([(f"{measure}({m}, control_t)", x) for m, x in matrices.items()], clusters, measure, fit))
    if a in matrices and b in matrices:
        doc.figure("control_cka_difference", f"{measure}({b}, control_t) − {measure}({a}, control_t)", (
            f"Red: {b} is closer to the task's control than {a} is at that layer; blue: further."
        ), F.task_layer_heatmap([(f"{b} − {a}", matrices[b] - matrices[a])], clusters, f"Δ {measure}", fit, diverging=True))
    groups = seen or clusters
    panels = [(f"{measure}({m}, control_t)", x, measure) for m, x in matrices.items()]
    if a in matrices and b in matrices:
        panels.append((f"{b} − {a}", matrices[b] - matrices[a], f"Δ {measure}"))
    doc.figure("control_cka_curves", "Control similarity per layer, " + ("seen vs unseen tasks" if seen else "by cluster"), (
        f"Mean over the tasks of each group; bands: {level}% Student-t CI over tasks (where {F.MIN_BAND_TASKS}+ tasks)."
    ), F.comparison_panels(panels, groups, cfg.ci, fit, "How close is each model to the task's specialist?"))
    for m, x in matrices.items():
        doc.figure(f"control_cka_by_cluster_{m}", f"{measure}({m}, control_t) per layer, cluster means", (
            f"Mean over the tasks of each cluster; bands (up to {F.MAX_BANDS} clusters, where {F.MIN_BAND_TASKS}+ tasks): "
            f"{level}% Student-t CI over tasks; black: all tasks."
        ), F.grouped_curves(x, clusters, cfg.ci, measure, fit, f"{measure}({m}, control:<task>)"))
    return doc.table("control_summary.csv", "Control similarity summary", (
        f"Mean over layers 1..L of {measure}(model, control_t) per task, then mean and {level}% Student-t CI over the tasks "
        "of each group (seen / unseen, and each cluster)."
    ), _control_summary(matrices, seen, clusters, cfg.ci))


def _control_summary(matrices: dict, seen: dict[str, str], clusters: dict[str, str], level: float) -> pd.DataFrame:
    from .load import aggregate

    rows = []
    for model, matrix in matrices.items():
        per_task = matrix[[c for c in matrix.columns if int(c) > 0] or list(matrix.columns)].mean(axis=1, skipna=True)
        for task, value in per_task.dropna().items():
            rows.append({"model": model, "task": task, "seen": seen.get(task, "all"), "cluster": clusters.get(task, ""),
                         "value": float(value)})
    long = pd.DataFrame(rows, columns=["model", "task", "seen", "cluster", "value"])
    if long.empty:
        return long
    parts = []
    for key in ("seen", "cluster"):
        agg = aggregate(long, ["model", key], level).rename(columns={key: "group"})
        parts.append(agg.assign(group_by=key))
    out = pd.concat(parts, ignore_index=True)
    return out[["model", "group_by", "group", "n", "mean", "sd", "ci_low", "ci_high"]]


def _table_blocks(doc: _Document, views: Views, cfg: AnalysisConfig, summary: pd.DataFrame, staging: Path) -> dict[str, Path]:
    a, b = views.pair
    doc.add(Heading("Tables"))
    tables = {
        "cluster_summary": doc.table("cluster_summary.csv", "Cluster summary", "Means over the tasks of each cluster of the per-task summary below.", group_summary(summary, "cluster")),
        "summary": doc.table("summary.csv", "Per-task summary", (
            f"best_layer_<model>: the layer with the highest val accuracy (selection on val, never on the reported split); "
            f"best_{views.metric}_<model>: the {views.split} {views.metric} at that layer (with _ci_low/_ci_high over seeds "
            "where there are several); "
            f"overtake_layer: first layer from which {b} − {a} stays above {cfg.overtake_margin} at every later layer; "
            f"cka_<section>: mean {views.measure}({a}, {b}) within the section; delta_*: mean {b} − {a} within the section."
        ), summary),
    }
    for name, frame in (("probes_aggregated", views.probes), ("similarity_aggregated", views.similarity)):
        tables[name] = staging / f"{name}.csv"
        frame.to_csv(tables[name], index=False)
    return tables


def _input_blocks(doc: _Document, data: RunData, cfg: AnalysisConfig) -> None:
    doc.add(Heading("Inputs"))
    dirs = [str(p) for p in data.result_dirs]
    more = f", … and {len(dirs) - MAX_LISTED} more" if len(dirs) > MAX_LISTED else ""
    doc.add(Paragraph(f"{len(dirs)} result dir(s): {', '.join(dirs[:MAX_LISTED])}{more}."))
    doc.add(Preformatted("options: " + _compact_json(cfg.to_dict())))


def _build(data: RunData, views: Views, fit: SectionFit | None, reason: str, cfg: AnalysisConfig, staging: Path) -> dict:
    doc = _Document(staging, cfg)
    seen, seen_note = _seen_groups(views)
    notes = _notes(data, views, fit, reason, seen_note)
    for block in _note_blocks(data, notes):
        doc.add(block)
    shown = fit if fit is not None and fit.found else None  # boundaries are drawn only where sections are supported
    summary = task_summary(views, shown, cfg.overtake_margin)
    sections = _sections_json(views, fit, reason, cfg, data)
    (staging / "sections.json").write_text(_compact_json(sections))
    with mpl.rc_context(F.STYLE):
        _sections_blocks(doc, views, fit, reason, cfg)
        _probe_blocks(doc, views, shown, cfg)
        mdl_path = _mdl_blocks(doc, data, views, shown, cfg)
        _similarity_blocks(doc, views, shown, cfg)
        seen_path = _seen_blocks(doc, views, shown, cfg, seen, summary)
        control_path = _control_blocks(doc, views, shown, cfg, seen)
    tables = _table_blocks(doc, views, cfg, summary, staging)
    if mdl_path is not None:
        tables["mdl_summary"] = mdl_path
    if control_path is not None:
        tables["control_summary"] = control_path
    if seen_path is not None:
        tables["seen_unseen"] = seen_path
    _input_blocks(doc, data, cfg)
    a, b = views.pair
    title = cfg.title or f"layerprobe report: {a} vs {b}"
    meta = _meta(data, views, cfg)
    (staging / "report.md").write_text(to_markdown(title, meta, doc.blocks, staging))
    (staging / "report.html").write_text(to_html(title, meta, doc.blocks, staging))
    return {
        "report_html": staging / "report.html",
        "report_md": staging / "report.md",
        "sections_json": staging / "sections.json",
        "tables": tables,
        "figures": doc.figures,
        "sections": sections,
        "missing_jobs": [m.describe() for m in data.missing],
        "warnings": notes,
    }
