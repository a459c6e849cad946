"""Sharing one feature store between processes: a lock holder killed midway releases its
lock, one waiting process resumes its shards while the other waits again and reuses the
result (extracted once, both succeed); a partial store keeps its shard layout; each job
of a local sweep gets a GPU of its own."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from _scaling import stop_after
from conftest import ROOT
from layerprobe import distributed
from layerprobe.config import ExtractConfig, TaskConfig
from layerprobe.distributed import Ranks, lease_gpu
from layerprobe.features.extract import ensure_features
from layerprobe.features.store import FeatureStore
from layerprobe.tasks import load_tasks

TRAINER = {"accelerator": "cpu", "devices": 1}

# One extraction process: 40 examples in 5 shards of 8. With a gate path it stops after
# writing shard 1 (holding the store's lock) until the gate file appears; with a start
# path it begins only once that file exists (so every process can import beforehand).
# It prints the shards its backbone ran; its log (stderr) says when it waits for another job.
WORKER = """
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from layerprobe.config import ExtractConfig, TaskConfig
from layerprobe.features import extract
from layerprobe.features.store import FeatureStore
from layerprobe.tasks import load_tasks
model, cache, gate, start_after = sys.argv[1:5]
real_write, real_predict, ran = FeatureStore.write_shard, extract.FeatureExtractor.predict_step, []
def write(self, index, features):
    real_write(self, index, features)
    if gate != "-":  # "-" = no gate: leave no marker files behind
        Path(f"{gate}.{index}").touch()
    while gate != "-" and index >= 1 and not Path(gate).exists():
        time.sleep(0.05)
FeatureStore.write_shard = write
extract.FeatureExtractor.predict_step = lambda self, batch, i: ran.append(batch[0]) or real_predict(self, batch, i)
task = load_tasks(TaskConfig(tasks=["sentiment"], n_per_task=40))[0]
while start_after != "-" and not Path(start_after).exists():
    time.sleep(0.05)
extract.ensure_features("base", model, [task], ExtractConfig(shard_size=8, batch_size=4),
                        {"accelerator": "cpu", "devices": 1}, Path(cache))
print(json.dumps(sorted(ran)))
"""


@pytest.fixture()
def task():
    return load_tasks(TaskConfig(tasks=["sentiment"], n_per_task=40))[0]


def start(llama_dir, cache: Path, gate: str, log: Path, start_after: str = "-") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(llama_dir), str(cache), gate, start_after], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=open(log, "w"))


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, log: Path) -> list[int]:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def only_store(cache: Path) -> FeatureStore:
    (root,) = [p for p in (cache / "features").iterdir() if p.is_dir()]
    return FeatureStore(root)


def test_killed_holder_releases_its_lock_one_waiter_resumes_the_other_reuses(llama_dir, task, tmp_path):
    cache, gate = tmp_path / "cache", str(tmp_path / "gate")
    logs = {name: tmp_path / f"{name}.log" for name in ("holder", "a", "b")}
    holder = start(llama_dir, cache, gate, logs["holder"])  # its gate never opens
    # the waiters start once the holder has written two shards, holding the lock
    waiters = {name: start(llama_dir, cache, "-", logs[name], start_after=f"{gate}.1") for name in ("a", "b")}
    wait_for(lambda: Path(f"{gate}.1").exists(), "the holder to write two shards", holder, logs["holder"])
    for name, proc in waiters.items():
        wait_for(lambda: "waiting for features base/sentiment" in logs[name].read_text(), "both to wait on the lock",
                 proc, logs[name])
    holder.send_signal(signal.SIGKILL)  # dies holding the lock, mid-extraction
    holder.wait(timeout=30)

    ran = {name: finish(proc, logs[name]) for name, proc in waiters.items()}  # both succeed
    resumer = next(name for name in ran if ran[name])
    other = "b" if resumer == "a" else "a"
    assert ran[resumer] == [2, 3, 4] and ran[other] == []  # the holder's shards kept; extracted once
    assert "resuming base/sentiment: 2 of 5 shards already on disk" in logs[resumer].read_text()
    assert "extracted by another job, reused" in logs[other].read_text()
    reference, _ = ensure_features("base", str(llama_dir), [task], ExtractConfig(shard_size=8, batch_size=4), TRAINER,
                                   tmp_path / "ref")["sentiment"].load()
    np.testing.assert_array_equal(np.asarray(only_store(cache).load()[0]), np.asarray(reference))


def test_partial_store_keeps_its_shard_layout(llama_dir, task, tmp_path, monkeypatch, caplog):
    reference, _ = ensure_features("base", str(llama_dir), [task], ExtractConfig(shard_size=40), TRAINER,
                                   tmp_path / "ref")["sentiment"].load()
    stop_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="stopped"):
        ensure_features("base", str(llama_dir), [task], ExtractConfig(shard_size=8), TRAINER, tmp_path / "run")
    monkeypatch.undo()
    store = only_store(tmp_path / "run")
    assert json.loads((store.root / "layout.json").read_text()) == {"n": 40, "shard_size": 8, "world_size": 1}
    with caplog.at_level("INFO"):  # asking for shard_size=12 now would cut other slices
        resumed, _ = ensure_features("base", str(llama_dir), [task], ExtractConfig(shard_size=12), TRAINER,
                                     tmp_path / "run")["sentiment"].load()
    assert "resuming base/sentiment: 2 of 5 shards" in caplog.text and "with its own layout (shard_size=8" in caplog.text
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(reference))
    assert not (store.root / "layout.json").exists() and not list(store.shard_dir.glob("*.npy"))


def test_shards_that_do_not_fit_the_layout_are_extracted_again(llama_dir, task, tmp_path):
    reference, _ = ensure_features("base", str(llama_dir), [task], ExtractConfig(), TRAINER,
                                   tmp_path / "ref")["sentiment"].load()
    store = only_store(tmp_path / "ref")
    partial = FeatureStore(tmp_path / "run" / "features" / store.root.name)
    partial.write_shard(0, np.full((5, 4, 32), 7.0, np.float32))  # a stray shard of another size, no layout.json
    resumed, _ = ensure_features("base", str(llama_dir), [task], ExtractConfig(shard_size=8), TRAINER,
                                 tmp_path / "run")["sentiment"].load()
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(reference))


def test_rank_zero_waits_for_a_lock_held_elsewhere(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(distributed, "LOCK_POLL_S", 0.05)
    other = FileLock(str(tmp_path / "store.lock"), thread_local=False)  # another job, released from a timer thread
    other.acquire()
    threading.Timer(0.5, other.release).start()
    with caplog.at_level("INFO"):
        t0 = time.time()
        with Ranks().hold(str(tmp_path / "store.lock"), "features base/t"):
            waited = time.time() - t0
    assert waited >= 0.4 and "waiting for features base/t" in caplog.text


def test_each_sweep_job_leases_its_own_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "_gpu_lock_dir", lambda: tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = [{"accelerator": "auto", "devices": 1} for _ in range(3)]
    first, second = lease_gpu(jobs[0], gpu_count=2), lease_gpu(jobs[1], gpu_count=2)
    assert (jobs[0]["devices"], jobs[1]["devices"]) == ([0], [1])
    threading.Timer(0.3, first.release).start()  # the third job waits for a free GPU
    third = lease_gpu(jobs[2], gpu_count=2, poll_s=0.05)
    assert jobs[2]["devices"] == [0]
    second.release(), third.release()
    # explicit device ids and one-GPU machines are left alone
    assert lease_gpu({"devices": [3]}, gpu_count=2) is None and lease_gpu({"devices": 1}, gpu_count=1) is None
