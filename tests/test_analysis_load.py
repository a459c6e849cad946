"""Finding, merging and aggregating train.py outputs (hand-written fixtures, hand-computed means)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from layerprobe.analysis import AnalysisConfig, AnalysisError, ConfigError, NoResultsError, find_latest_run, load_runs
from layerprobe.analysis.load import aggregate_probes, t_quantile
from layerprobe.analysis.views import Views

PROBE_HEADER = ["task", "model", "layer", "split", "metric", "value", "seed", "probe"]
SIM_HEADER = ["task", "model_a", "model_b", "layer_a", "layer_b", "measure", "value", "ci_low", "ci_high", "null_mean"]
# Student t 0.975 quantiles from printed tables
T975 = {1: 12.706205, 2: 4.302653, 5: 2.570582, 30: 2.042272}


def write_job(job: Path, overrides: list[str], probes: list[tuple] | None, similarity: list[tuple] = (), seed: int = 0, tasks=None) -> Path:
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed, "probe": {"name": "linear"}}), job / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if probes is not None:
        pd.DataFrame(probes, columns=PROBE_HEADER).to_csv(job / "probes.csv", index=False)
    if similarity:
        pd.DataFrame(list(similarity), columns=SIM_HEADER).to_csv(job / "similarity.csv", index=False)
    if tasks is not None:
        pd.DataFrame(tasks, columns=["task", "cluster", "seen"]).to_csv(job / "tasks.csv", index=False)
    return job


def write_sweep(root: Path, overrides: list[str]) -> Path:
    root.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": overrides}}}), root / "multirun.yaml")
    return root


def acc(task, model, layer, value, seed):
    return (task, model, layer, "test", "accuracy", value, seed, "linear")


@pytest.fixture
def seed_sweep(tmp_path):
    """``-m task.name=rte,cola seed=0,1,2``: rte in jobs 0-2 and cola in jobs 3-5."""
    root = write_sweep(tmp_path / "multirun" / "2024-05-01" / "12-00-00", ["task.name=rte,cola", "seed=0,1,2"])
    rte = {0: (0.60, 0.50), 1: (0.70, 0.55), 2: (0.80, 0.60)}  # seed -> (tuned layer 1, base layer 1)
    for seed, (tuned, base) in rte.items():
        write_job(root / str(seed), [f"task.name=rte", f"seed={seed}"],
                  [acc("rte", "tuned", 1, tuned, seed), acc("rte", "base", 1, base, seed), acc("rte", "base", 0, 0.5, seed)],
                  # orientation differs between jobs: the merge must align (tuned, base) with (base, tuned)
                  [("rte", "base", "tuned", 0, 1, "linear_cka", 0.2 + 0.1 * seed, None, None, None)] if seed != 1 else
                  [("rte", "tuned", "base", 1, 0, "linear_cka", 0.3, None, None, None)],
                  seed=seed, tasks=[("rte", "nli", True)])
    for seed in (0, 1, 2):
        write_job(root / str(3 + seed), ["task.name=cola", f"seed={seed}"],
                  [(t, m, layer, s, metric, v, None, p) for t, m, layer, s, metric, v, _, p in [acc("cola", "base", 1, 0.9, seed)]],
                  seed=seed, tasks=[("cola", "misc", False)])
    return root


def test_merging_a_multirun_with_seeds_gives_hand_computed_means_and_cis(seed_sweep):
    data = load_runs([seed_sweep])
    assert len(data.result_dirs) == 6 and data.missing == []
    agg = aggregate_probes(data.probes, 0.95).set_index(["task", "model", "layer"])
    row = agg.loc[("rte", "tuned", 1)]
    # values 0.6, 0.7, 0.8: mean 0.7, sd 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3)
    assert row["mean"] == pytest.approx(0.7) and row["n"] == 3
    assert row["ci_low"] == pytest.approx(0.7 - 4.302653 * 0.1 / 3**0.5, abs=1e-5)
    assert row["ci_high"] == pytest.approx(0.7 + 4.302653 * 0.1 / 3**0.5, abs=1e-5)
    assert agg.loc[("rte", "base", 1), "mean"] == pytest.approx(0.55)
    # the seed missing from cola's probes.csv comes from .hydra/config.yaml
    assert sorted(data.probes[data.probes["task"] == "cola"]["seed"]) == [0, 1, 2]
    assert agg.loc[("cola", "base", 1), "sd"] == pytest.approx(0.0)
    # tasks.csv files are merged
    assert dict(zip(data.tasks["task"], data.tasks["cluster"])) == {"rte": "nli", "cola": "misc"}
    assert dict(zip(data.tasks["task"], data.tasks["seen"])) == {"rte": True, "cola": False}


def test_similarity_is_merged_across_file_orientations(seed_sweep):
    views = Views.build(load_runs([seed_sweep]), AnalysisConfig())
    rows = views.similarity_long("base", "tuned", diagonal=False)
    cell = rows[(rows["layer_a"] == 0) & (rows["layer_b"] == 1)]
    assert len(cell) == 1
    assert cell["mean"].iloc[0] == pytest.approx((0.2 + 0.3 + 0.4) / 3)
    assert cell["n"].iloc[0] == 3


def test_asymmetric_pwcca_rows_are_never_merged_across_argument_order():
    from layerprobe.analysis.load import ASYMMETRIC_MEASURES, aggregate_similarity
    from layerprobe.similarity.config import ASYMMETRIC_MEASURES as ENGINE_ASYMMETRIC

    assert tuple(ASYMMETRIC_MEASURES) == tuple(ENGINE_ASYMMETRIC)  # the analysis mirrors the engine's list
    rows = []
    for measure, forward, backward in (("pwcca", 0.827, 0.922), ("debiased_cka", 0.5, 0.7)):
        rows.append(dict(task="t", model_a="base", model_b="tuned", layer_a=1, layer_b=2, measure=measure, value=forward))
        rows.append(dict(task="t", model_a="tuned", model_b="base", layer_a=2, layer_b=1, measure=measure, value=backward))
    frame = pd.DataFrame(rows).assign(ci_low=float("nan"), ci_high=float("nan"), null_mean=float("nan"))
    agg = aggregate_similarity(frame, 0.95)
    pw = agg[agg["measure"] == "pwcca"].set_index(["model_a", "model_b"])
    assert len(pw) == 2 and pw.loc[("base", "tuned"), "mean"] == pytest.approx(0.827) and pw.loc[("tuned", "base"), "mean"] == pytest.approx(0.922)
    assert pw.loc[("tuned", "base"), "layer_a"] == 2
    ck = agg[agg["measure"] == "debiased_cka"]
    assert len(ck) == 1 and ck["mean"].iloc[0] == pytest.approx(0.6) and ck["n"].iloc[0] == 2  # symmetric: one comparison, two repeats


@pytest.mark.parametrize("dof", sorted(T975))
def test_t_quantile_matches_tables(dof):
    assert t_quantile(0.975, dof) == pytest.approx(T975[dof], abs=1e-5)


def test_partial_sweep_lists_crashed_and_never_started_jobs(tmp_path):
    root = write_sweep(tmp_path / "sweep", ["task.name=a,b", "seed=0,1"])  # 4 jobs planned
    write_job(root / "0", ["task.name=a", "seed=0"], [acc("a", "base", 0, 0.5, 0)])
    write_job(root / "1", ["task.name=a", "seed=1"], None)  # crashed: .hydra only
    (root / "2").mkdir()
    write_job(root / "2" / "nested", [], None)  # not a job of the sweep, still a run without results
    data = load_runs([root])
    by_name = {m.path.name: m for m in data.missing}
    assert by_name["1"].overrides == ["task.name=a", "seed=1"] and "crashed" in by_name["1"].reason
    assert by_name["3"].overrides == ["task.name=b", "seed=1"] and "never started" in by_name["3"].reason
    assert "nested" in by_name
    assert len(data.result_dirs) == 1


def test_sweep_with_named_job_dirs_is_not_counted_by_number(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    config = {"hydra": {"sweep": {"subdir": "${hydra.job.override_dirname}"}, "overrides": {"task": ["seed=0,1"]}}}
    OmegaConf.save(OmegaConf.create(config), root / "multirun.yaml")
    write_job(root / "seed=0", ["seed=0"], [acc("a", "base", 0, 0.5, 0)])
    write_job(root / "seed=1", ["seed=1"], [acc("a", "base", 0, 0.6, 1)])
    assert load_runs([root]).missing == []


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoResultsError, match="no probes.csv or similarity.csv found"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(AnalysisError, match="is not a directory"):
        load_runs([tmp_path / "missing"])
    write_job(tmp_path / "crashed", [], None)
    with pytest.raises(NoResultsError, match="1 job dir"):
        load_runs([tmp_path / "crashed"])


def test_empty_or_broken_files(tmp_path):
    job = write_job(tmp_path / "run", [], None)
    (job / "probes.csv").write_text("")  # died while writing
    with pytest.raises(NoResultsError):
        load_runs([job])
    (job / "probes.csv").write_text("task,model,layer\nrte,base,0\n")
    with pytest.raises(AnalysisError, match="lacks column"):
        load_runs([job])


def test_latest_run_is_the_newest_and_a_sweep_stands_for_its_jobs(tmp_path):
    old = write_job(tmp_path / "outputs" / "2024-01-01" / "10-00-00", [], [acc("a", "base", 0, 0.5, 0)])
    sweep = write_sweep(tmp_path / "multirun" / "2024-01-02" / "10-00-00", ["seed=0,1"])
    write_job(sweep / "0", ["seed=0"], [acc("a", "base", 0, 0.5, 0)])
    report = tmp_path / "outputs" / "analyze"  # an analysis output without probes.csv is never picked
    report.mkdir(parents=True)
    (report / "report.html").write_text("x")
    os.utime(old / "probes.csv", (1_000, 1_000))
    os.utime(sweep / "0" / "probes.csv", (2_000, 2_000))
    roots = [tmp_path / "outputs", tmp_path / "multirun"]
    assert find_latest_run(roots) == sweep
    os.utime(old / "probes.csv", (3_000, 3_000))
    assert find_latest_run(roots) == old
    with pytest.raises(NoResultsError, match="run train.py first"):
        find_latest_run([tmp_path / "nothing"])


def test_an_analysis_dir_inside_the_tree_is_not_a_missing_job(tmp_path):
    run = write_job(tmp_path / "run", [], [acc("a", "base", 0, 0.5, 0)])
    analysis = tmp_path / "run" / "analysis"
    (analysis / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"name": "analyze"}}}), analysis / ".hydra" / "hydra.yaml")
    assert load_runs([run]).missing == []


def test_options_are_checked_against_the_data(seed_sweep):
    data = load_runs([seed_sweep])
    with pytest.raises(ConfigError, match="metric='f1'.*available: accuracy"):
        Views.build(data, AnalysisConfig(metric="f1"))
    with pytest.raises(ConfigError, match="measure='cka'"):
        Views.build(data, AnalysisConfig(measure="cka"))
    views = Views.build(data, AnalysisConfig(pair=["base", "sft"]))
    assert not views.has_pair and "sft" in views.notes[0]


@pytest.mark.parametrize(
    "bad, field",
    [({"signal": "entropy"}, "signal"), ({"pair": ["base"]}, "pair"), ({"ci": 1.5}, "ci"), ({"bootstrap": -1}, "bootstrap"),
     ({"figure_format": "jpg"}, "figure_format"), ({"min_section_layers": 1}, "min_section_layers"), ({"colour": 1}, "colour")],
)
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field) as info:
        AnalysisConfig.from_mapping(bad)
    assert "\n" not in str(info.value)


def test_config_accepts_a_single_run_string():
    assert AnalysisConfig(runs="outputs/x").runs == ["outputs/x"]
    assert AnalysisConfig(segment_model="constant", min_section_layers=1).min_section_layers == 1
