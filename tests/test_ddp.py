"""Several devices on CPU (gloo): trainer.devices=2 equals trainer.devices=1, ranks that a
cluster starts (SLURM, trainer.num_nodes=2), and the policy for -m with more than one rank."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from _scaling import free_port, overrides, pair, probe_values, run_train, stop_after, stores_by_role  # noqa: F401
from conftest import ROOT
from layerprobe import distributed
from layerprobe.config import register_configs
from layerprobe.distributed import DistributedError
from layerprobe.pipeline import run

register_configs()

# The stated tolerance: every test-split metric of trainer.devices=2 within two test
# examples of trainer.devices=1 (the gradients are the same sums in another order, so a
# borderline prediction or a tied weight-decay choice may flip); observed: equal.
TEST_METRICS = ("accuracy", "macro_f1", "control_accuracy", "selectivity")


def compose_train(args):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=args)


def test_two_ranks_equal_one_device_and_resume_a_partial_store(pair, tmp_path, monkeypatch):
    reference = run(compose_train(overrides(pair, tmp_path / "cache1")), tmp_path / "run1")

    # A store begun on one device with shard_size=8 and stopped after 3 shards ...
    stop_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="stopped"):
        run(compose_train(overrides(pair, tmp_path / "cache2", "extract.shard_size=8")), tmp_path / "partial")
    monkeypatch.undo()

    # ... is finished by two ranks with shard_size=16 asked for: its own layout wins.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_train(overrides(pair, tmp_path / "cache2", "trainer.devices=2", "trainer.strategy=ddp",
                               f"hydra.run.dir={cwd / 'out'}"), cwd)
    out = cwd / "out"
    log = (out / "train.log").read_text()
    assert "rank 0 of 2" in log and "resuming base/sentiment: 3 of 15 shards already on disk" in log

    one, two = stores_by_role(tmp_path / "cache1"), stores_by_role(tmp_path / "cache2")
    assert one.keys() == two.keys() == {("base", "sentiment"), ("tuned", "sentiment")}
    for key in one:  # float32 on CPU: bit for bit
        np.testing.assert_array_equal(two[key], one[key])

    ref, got = probe_values(reference["outputs"]["probes"]), probe_values(out / "probes.csv")
    assert ref.keys() == got.keys()
    n_test = reference["tasks"][0].split_sizes()["test"]
    for key, value in ref.items():
        if key[3] == "test" and key[4] in TEST_METRICS:
            assert abs(got[key] - value) <= 2 / n_test + 1e-9, (key, value, got[key])
    # identical features: identical similarity
    assert (out / "similarity.csv").read_text() == reference["outputs"]["similarity"].read_text()

    # One run dir, one set of outputs: rank 1 only adds its own log file.
    assert sorted(p.name for p in cwd.iterdir()) == ["out"]
    assert sorted(p.name for p in out.glob("*.log")) == ["train.log", "train_ddp_process_1.log"]
    assert {p.name for p in out.iterdir() if p.is_dir()} <= {".hydra", "probes"}
    assert len(list((out / "probes").iterdir())) == 1
    assert proc.stdout.count("layerprobe summary") == 1


def test_ranks_started_by_slurm_over_two_nodes_run_a_sweep(pair, tmp_path):
    """What `hydra/launcher=slurm` with trainer.num_nodes=2 does on a cluster: srun starts one
    task per node, each runs the sweep's jobs; Lightning's SLURMEnvironment joins them."""
    port, sweep = free_port(), tmp_path / "sweep"
    # one shard of 120 examples for two ranks: one rank redoes it (Lightning needs a batch on every rank)
    args = overrides(pair, tmp_path / "cache", "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp",
                     "extract.shard_size=512")
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank), "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("LOCAL_RANK", None)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *args, "seed=0,1",
                                       f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-4000:]
    for job, seed in (("0", "0"), ("1", "1")):
        log = (sweep / job / "train.log").read_text()
        assert "rank 0 of 2 (SLURMEnvironment)" in log
        assert "rank 1 of 2 (SLURMEnvironment)" in (sweep / job / "train_rank1.log").read_text()
        assert {r[2] for r in probe_values(sweep / job / "probes.csv")} == {"0", "1", "2", "3"}
        assert open(sweep / job / "probes.csv").read().count(f",{seed},linear") > 0
    assert len(stores_by_role(tmp_path / "cache")) == 2


@pytest.mark.parametrize("n, batch, world", [(37, 8, 2), (37, 8, 3), (5, 16, 2), (2, 8, 3)])
def test_rank_slices_make_up_the_one_device_batches(n, batch, world):
    import torch
    from torch.utils.data import BatchSampler, RandomSampler

    from layerprobe.distributed import RankSliceBatchSampler

    torch.manual_seed(0)
    one_device = list(BatchSampler(RandomSampler(range(n)), batch, drop_last=False))
    per_rank = []
    for rank in range(world):
        torch.manual_seed(0)  # seed_everything gives every rank the same RNG state
        per_rank.append(list(RankSliceBatchSampler(n, batch, rank, world)))
    for step, batch_ in enumerate(one_device):
        slices = [r[step] for r in per_rank]
        assert all(slices)  # no rank ever gets an empty batch
        if len(batch_) >= world:  # split: every row on exactly one rank
            assert sorted(i for s in slices for i in s) == sorted(batch_)
        else:  # smaller than the world: whole on every rank
            assert all(s == batch_ for s in slices)


def test_sweep_with_several_devices_is_refused_locally(tmp_path, monkeypatch):
    # on the command line: refused before Hydra starts anything
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "seed=0,1", "trainer.devices=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "hydra/launcher=slurm" in errors[0]
    assert not (tmp_path / "multirun").exists()
    # from the composed config (devices set in a file): refused in the job, before any rank starts
    monkeypatch.setattr(distributed, "_in_sweep", lambda: True)
    with pytest.raises(DistributedError, match="-m with 2 processes per job"):
        distributed.launch({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    # where the cluster creates the processes (srun), the same sweep is allowed
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    distributed.check_sweep_argv(["-m", "seed=0,1", "trainer.devices=2"])
