"""Hydra sweeps: a joblib sweep whose two concurrent jobs extract each feature set once and
whose run dirs analyze.py merges; the sweep and launcher presets compose."""
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from _scaling import overrides, pair, run_train, stores_by_role  # noqa: F401 (fixture)
from conftest import ROOT
from layerprobe.analysis import load_runs
from layerprobe.config import register_configs

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
