"""Hydra sweeps: a joblib sweep whose two concurrent jobs extract each feature set once and
whose run dirs analyze.py merges; a sweep that trains one control per job, which a later run
reuses; the sweep and launcher presets compose."""
import csv
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from _scaling import overrides, pair, run_train, stores_by_role  # noqa: F401 (fixture)
from conftest import ROOT
from layerprobe.analysis import load_runs
from layerprobe.config import TaskConfig, register_configs

register_configs()


def test_joblib_sweep_extracts_once_and_analyze_merges_the_runs(pair, tmp_path):
    sweep = tmp_path / "sweep"
    run_train(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *overrides(pair, tmp_path / "cache"), "seed=0,1",
               f"hydra.sweep.dir={sweep}"], tmp_path)
    logs = [(sweep / job / "train.log").read_text() for job in ("0", "1")]
    # two jobs side by side need the same two feature sets (base, tuned): each is extracted once
    extracted = [line for log in logs for line in log.splitlines() if "extracting " in line]
    assert len(extracted) == 2 and {"base/sentiment" in extracted[0], "base/sentiment" in extracted[1]} == {True, False}
    reused = sum(log.count("extracted by another job, reused") + log.count("backbone not run") for log in logs)
    assert reused == 2
    assert len(stores_by_role(tmp_path / "cache")) == 2

    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "analyze.py"), f"runs={sweep}", f"hydra.run.dir={report}",
                           "bootstrap=0"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (report / "report.html").exists() and "missing job" not in proc.stdout
    merged = load_runs([sweep])
    assert sorted(p.name for p in merged.result_dirs) == ["0", "1"]
    assert set(merged.probes["seed"].astype(int)) == {0, 1}


def control_overrides(pair, cache):
    """Two demo tasks on the tiny pair, one small LoRA control per task (6 steps), no report: seconds per job."""
    base, tuned = pair
    return ["model.build_demo=false", f"model.base={base}", f"model.tuned={tuned}", "task=demo", "task.n_per_task=80",
            "probe.max_epochs=3", "trainer.accelerator=cpu", "report=false", "model.random_init=false",
            f"paths.cache_dir={cache}", "model.train_controls=true", "tuning=default", "tuning.max_steps=6",
            "tuning.batch_size=8", "tuning.grad_accum=1", "tuning.lr=2e-2", "tuning.logger=null"]


def control_rows(path):
    """{(task, model_a, model_b, layer_a, layer_b, measure): value} of the control rows of a similarity.csv."""
    with open(path) as f:
        return {(r["task"], r["model_a"], r["model_b"], r["layer_a"], r["layer_b"], r["measure"]): r["value"]
                for r in csv.DictReader(f) if r["model_b"].startswith("control:")}


def test_a_sweep_trains_one_control_per_job_that_a_later_run_reuses(pair, tmp_path):
    """python train.py -m 'task.tasks=[sentiment],[topic]' model.train_controls=true (Hydra's basic launcher), then
    python train.py 'task.tasks=[sentiment,topic]' with the same settings: read from what a user sees, the model
    cache's manifests, the logs, the adapter files and similarity.csv."""
    from layerprobe.tasks import load_tasks

    cache, sweep, final = tmp_path / "cache", tmp_path / "sweep", tmp_path / "final"
    swept = run_train(["-m", *control_overrides(pair, cache), "task.tasks=[sentiment],[topic]", f"hydra.sweep.dir={sweep}"],
                      tmp_path)
    # training, saving and loading models keeps library progress bars and deprecation notices off the console
    for noise in ("Loading weights", "Writing model shards", "FutureWarning", "is_gradient_checkpointing"):
        assert noise not in swept.stdout + swept.stderr, noise
    jobs = {"sentiment": sweep / "0", "topic": sweep / "1"}
    for task, job in jobs.items():
        log = (job / "train.log").read_text()
        other = {"sentiment": "topic", "topic": "sentiment"}[task]
        assert log.count(f"tuning control:{task} (lora") == 1 and f"tuning control:{other}" not in log  # one control per job
    manifests = {}
    for path in (cache / "models").glob("*/manifest.json"):
        meta = json.loads(path.read_text())
        manifests[meta["name"]] = (path.parent, meta)
    assert sorted(manifests) == ["control:sentiment", "control:topic"]
    for task in ("sentiment", "topic"):
        root, meta = manifests[f"control:{task}"]
        [data] = load_tasks(TaskConfig(tasks=[task], n_per_task=80, fractions=[0.1, 0.2, 0.7]))  # conf/task/demo.yaml
        with open(jobs[task] / "tasks.csv") as f:
            [row] = list(csv.DictReader(f))
        assert meta["method"] == "lora" and meta["data"]["tasks"] == [task]
        # its task's train split, nothing else
        assert meta["data"]["examples"] == int(row["n_train"]) == sum(ex.split == "train" for ex in data.examples) == 8
        assert meta["base"]["path"] == str(pair[0].resolve()) and meta["train"]["steps"] == 6
        assert meta["fingerprint"] == root.name and (root / "adapter_model.safetensors").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (cache / "models").rglob("*") if p.is_file() and p.suffix != ".lock"}
    assert sorted(p.name for p in stamps if p.name in ("adapter_model.safetensors", "manifest.json")) == \
        ["adapter_model.safetensors"] * 2 + ["manifest.json"] * 2
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".") and p.is_dir()]  # no work or tmp dir left

    proc = run_train([*control_overrides(pair, cache), "task.tasks=[sentiment,topic]", f"hydra.run.dir={final}"], tmp_path)
    log = (final / "train.log").read_text()
    for task in ("sentiment", "topic"):
        root = manifests[f"control:{task}"][0]
        assert f"model control:{task}: cached at {root}, reused (nothing trained)" in log
    assert "tuning control:" not in log and "trained in" not in log
    assert "reused (nothing trained)" in proc.stdout + proc.stderr  # on the console too, not only in train.log
    assert {p: p.stat().st_mtime_ns for p in (cache / "models").rglob("*") if p.is_file() and p.suffix != ".lock"} == stamps
    rows = control_rows(final / "similarity.csv")
    assert {(k[0], k[1], k[2]) for k in rows} == {(t, a, f"control:{t}") for t in ("sentiment", "topic")
                                                  for a in ("base", "tuned")}
    for task, job in jobs.items():  # the same controls and features: each job's control rows, value for value
        assert {k: v for k, v in rows.items() if k[0] == task} == control_rows(job / "similarity.csv")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml")))
def test_sweep_presets_compose(preset):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"sweep={preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params and all("," in str(v) for v in params.values())


def test_launcher_presets_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        local = compose("train", overrides=["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
        slurm = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"],
                        return_hydra_config=True).hydra.launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2
    slurm = OmegaConf.to_container(slurm, resolve=True)
    assert slurm["_target_"].endswith("SlurmLauncher")
    # one task per GPU on every node, as Lightning's SLURMEnvironment checks
    assert (slurm["tasks_per_node"], slurm["gpus_per_node"], slurm["nodes"]) == (4, 4, 2)
