"""The report: expected files, figures and tables; partial, empty and single-model inputs; the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from layerprobe.analysis import AnalysisConfig, AnalysisError, NoResultsError, write_report
from layerprobe.analysis import report as report_module
from layerprobe.analysis.synthetic import Planted, make_multirun, make_run, task_table

ROOT = Path(__file__).resolve().parents[1]
PLANT = Planted(num_layers=8, transition_start=3, refinement_start=6)
FAST = AnalysisConfig(bootstrap=30, dpi=40, measure="linear_cka")  # the synthetic run has cross-layer cells for linear_cka


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    run = make_run(base / "run", task_table(8, 2), PLANT, controls=True)  # >= 6 tasks: the section test flips tasks
    result = write_report([run], base / "report", FAST)
    return run, base / "report", result


def test_tiny_report_has_the_expected_files_and_figures(tiny):
    _, out, result = tiny
    for name in ("report.html", "report.md", "sections.json", "summary.csv", "cluster_summary.csv", "seen_unseen.csv"):
        assert (out / name).is_file(), name
    expected = {"sections_signal", "accuracy_heatmap", "selectivity_heatmap", "accuracy_delta_heatmap", "accuracy_by_cluster",
                "cka_heatmap", "cka_per_task", "cka_by_cluster", "cka_layer_matrix", "cka_layer_matrix_tasks",
                "seen_vs_unseen",
                # the MOSSA section: the synthetic run compares tuned with each task's control model
                "control_cka_heatmaps", "control_cka_curves", "control_cka_by_cluster_tuned"}
    assert set(result["figures"]) == expected
    for files in result["figures"].values():
        assert files["png"].is_file() and files["png"].parent == out / "figures"
    assert not list(out.glob(".report-staging-*"))


def test_html_is_self_contained(tiny):
    _, out, result = tiny
    html = (out / "report.html").read_text()
    sources = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(sources) == len(result["figures"])
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<table>" in html and "Cluster summary" in html and "Per-task summary" in html
    markdown = (out / "report.md").read_text()
    assert "](figures/sections_signal.png)" in markdown and "| task |" in markdown


def test_sections_json_recovers_the_plant(tiny):
    _, out, result = tiny
    sections = json.loads((out / "sections.json").read_text())
    assert sections == result["sections"]
    assert sections["shared"] == [0, 2] and sections["transition"] == [3, 5] and sections["refinement"] == [6, 8]
    assert sections["signal"] == "control_cka"  # signal=auto: the run has control models (the study's MOSSA signal)
    assert set(sections["ci"]) >= {"level", "transition_start", "refinement_start"}


def test_summary_matches_an_independent_computation(tiny):
    run, out, _ = tiny
    summary = pd.read_csv(out / "summary.csv").set_index("task")
    probes = pd.read_csv(run / "probes.csv")
    similarity = pd.read_csv(run / "similarity.csv")
    for task in summary.index:
        acc = probes[(probes.task == task) & (probes.metric == "accuracy")]
        tuned = acc[acc.model == "tuned"].set_index("layer")["value"]
        base = acc[acc.model == "base"].set_index("layer")["value"]
        assert summary.loc[task, "best_layer_tuned"] == tuned.idxmax()
        assert summary.loc[task, "best_accuracy_base"] == pytest.approx(base.max())
        diag = similarity[(similarity.task == task) & (similarity.model_a == "base") & (similarity.model_b == "tuned")
                          & (similarity.measure == "linear_cka") & (similarity.layer_a == similarity.layer_b)]
        shared = diag[diag.layer_a <= 2]["value"].mean()  # shared section is layers 0-2
        assert summary.loc[task, "cka_shared"] == pytest.approx(shared)
        delta = (tuned - base).sort_index()
        above = [layer for layer in delta.index if (delta.loc[layer:] > 0).all()]
        assert summary.loc[task, "overtake_layer"] == (above[0] if above else pytest.approx(float("nan"), nan_ok=True))
    clusters = pd.read_csv(out / "cluster_summary.csv").set_index("cluster")
    for cluster, group in summary.groupby("cluster"):
        assert clusters.loc[cluster, "n_tasks"] == len(group)
        assert clusters.loc[cluster, "cka_refinement"] == pytest.approx(group["cka_refinement"].mean())


def test_single_model_run_reports_without_sections_and_svg_option(tmp_path):
    run = make_run(tmp_path / "run", task_table(3, 1), PLANT, models=("base",))
    result = write_report([run], tmp_path / "out", AnalysisConfig(bootstrap=0, dpi=40, figure_format="svg"))
    assert result["sections"]["shared"] is None and result["sections"]["reason"]
    assert set(result["figures"]) == {"accuracy_heatmap", "selectivity_heatmap", "accuracy_by_cluster"}
    assert all(set(files) == {"png", "svg"} and files["svg"].is_file() for files in result["figures"].values())
    assert (tmp_path / "out" / "report.html").is_file()


def test_empty_input_and_failures_leave_no_report(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoResultsError):
        write_report([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()
    run = make_run(tmp_path / "run", task_table(8, 2), PLANT)  # enough tasks for the section test: the figure is drawn

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module.F, "sections_figure", broken)
    with pytest.raises(RuntimeError):
        write_report([run], tmp_path / "out", AnalysisConfig(bootstrap=0, dpi=40))
    assert not (tmp_path / "out" / "report.html").exists()
    assert not list((tmp_path / "out").glob(".report-staging-*"))
    with pytest.raises(AnalysisError, match="no run directories"):
        write_report([], tmp_path / "out")


def _analyze(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "analyze.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_reports_the_latest_partial_sweep_into_its_own_dir(tmp_path):
    make_run(tmp_path / "outputs" / "2024-01-01" / "10-00-00", task_table(2, 1), PLANT, cross_layer=False)
    sweep = tmp_path / "multirun" / "2024-01-02" / "10-00-00"  # newer: the one analysed
    make_multirun(sweep, task_table(8, 2), seeds=(0, 1), planted=PLANT, crashed=(1,), never_started=1)  # >= 6 tasks to test sections
    out = tmp_path / "reports" / "r1"
    done = _analyze(["bootstrap=0", "dpi=40", f"hydra.run.dir={out}"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"analyzed {sweep}" in done.stdout
    assert "sections: shared 0–2, transition 3–5" in done.stdout
    assert done.stdout.count("missing job:") == 2
    html = (out / "report.html").read_text()
    assert "Partial results: 2 job(s)" in html and "never started" in html and "crashed" in html


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    (tmp_path / "empty").mkdir()
    done = _analyze(["runs=empty", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert done.returncode == 2  # a user error, like train.py's
    assert done.stderr.strip().splitlines()[-1].startswith("error: no probes.csv")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r" / "report.html").exists()


def test_section_columns_follow_the_layers_for_four_sections():
    from layerprobe.analysis.tables import section_columns

    columns = ["task", "cka_late", "delta_accuracy_shared", "cka_refinement", "best_layer_base", "cka_shared",
               "delta_accuracy_late", "cka_transition", "overtake_layer"]
    assert section_columns(pd.DataFrame(columns=columns)) == [
        "delta_accuracy_shared", "cka_shared", "cka_transition", "cka_refinement", "cka_late", "delta_accuracy_late"]


def _add_compression(run: Path, peaks: dict[str, int], split: str = "train") -> pd.DataFrame:
    """Append probes.csv rows of MDL compression: each role's curve peaks at ``peaks[role]``, shifted per task;
    ``control`` rows go to each task's own control model, as the pipeline writes them."""
    probes = pd.read_csv(run / "probes.csv")
    tasks = sorted(probes["task"].unique())
    rows = []
    for i, task in enumerate(tasks):
        for role, peak in peaks.items():
            model = f"control:{task}" if role == "control" else role
            for layer in range(9):
                rows.append({"task": task, "model": model, "layer": layer, "split": split, "metric": "compression",
                             "value": 2.0 - 0.05 * (layer - peak) ** 2 + 0.1 * i, "seed": 0, "probe": "linear"})
    added = pd.DataFrame(rows)
    pd.concat([probes, added], ignore_index=True).to_csv(run / "probes.csv", index=False)
    return added


@pytest.mark.parametrize("with_val", [False, True])
def test_mdl_compression_figure_and_best_layer_per_model(tmp_path, with_val):
    from scipy import stats

    run = make_run(tmp_path / "run", task_table(4, 2), PLANT, controls=True)
    train = _add_compression(run, {"base": 5, "tuned": 7, "control": 2})
    if with_val:  # a val split for the metric: the best layer is chosen there, its train value reported
        _add_compression(run, {"base": 3, "tuned": 1, "control": 2}, split="val")
    result = write_report([run], tmp_path / "out", FAST)

    png = tmp_path / "out" / "figures" / "mdl_compression.png"
    assert png.is_file() and result["figures"]["mdl_compression"]["png"] == png
    assert "](figures/mdl_compression.png)" in (tmp_path / "out" / "report.md").read_text()
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="mdl_compression"' in html and "Best compression per model" in html

    summary = pd.read_csv(result["tables"]["mdl_summary"]).set_index("model")
    chosen = {"base": 3, "tuned": 1, "control": 2} if with_val else {"base": 5, "tuned": 7, "control": 2}
    assert list(summary.index) == ["base", "tuned", "control"]
    for role, layer in chosen.items():
        model = train["model"].str.startswith("control:") if role == "control" else train["model"] == role
        values = train[model & (train["layer"] == layer)]["value"].to_numpy()
        half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / len(values) ** 0.5
        row = summary.loc[role]
        assert row["best_layer"] == layer and row["n_tasks"] == 4
        assert row["compression"] == pytest.approx(values.mean())
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((values.mean() - half, values.mean() + half))
        assert row["chosen_on"] == ("val compression" if with_val else "train compression (no val split for this metric)")
