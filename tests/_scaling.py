"""Helpers shared by the scale-out tests (test_ddp, test_multirun, test_locking)."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny (base, tuned) pair of saved Llama checkpoints."""
    root = tmp_path_factory.mktemp("pair")
    return tiny_llama(root / "base", seed=0), tiny_llama(root / "tuned", seed=1)


def overrides(pair, cache: Path, *extra: str) -> list[str]:
    """One small task on the tiny pair, CPU, no report: a run takes seconds."""
    base, tuned = pair
    return ["model.build_demo=false", f"model.base={base}", f"model.tuned={tuned}", "task=sentiment",
            "task.n_per_task=120", "extract.shard_size=16", "probe.max_epochs=6", "probe.batch_size=16",
            "trainer.accelerator=cpu", "report=false", f"paths.cache_dir={cache}", *extra]


def run_train(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def stores_by_role(cache: Path) -> dict[tuple[str, str], np.ndarray]:
    """{(role, task): features} of every complete store under a cache dir."""
    out = {}
    for root in (Path(cache) / "features").iterdir():
        if (root / "manifest.json").exists():
            meta = json.loads((root / "manifest.json").read_text())
            out[meta["role"], meta["task"]] = np.load(root / "features.npy")
    return out


def probe_values(path: Path) -> dict[tuple, float]:
    with open(path) as f:
        return {(r["task"], r["model"], r["layer"], r["split"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}


def stop_after(monkeypatch, count: int) -> None:
    """Make FeatureStore.write_shard raise once `count` shards are written (an interrupted extraction)."""
    from layerprobe.features.store import FeatureStore

    real = FeatureStore.write_shard
    written = []

    def write(self, index, features):
        real(self, index, features)
        written.append(index)
        if len(written) == count:
            raise RuntimeError("stopped")

    monkeypatch.setattr(FeatureStore, "write_shard", write)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
