"""The feature store: `[n, L+1, d]` per (model, task, extraction settings) on disk.

Layout of `<cache_dir>/features/<fingerprint>/`:
    shards/shard_00000.npy ...   written atomically (tmp file + rename) while extracting
    features.npy                 the consolidated array, read memory-mapped
    ids.json                     example ids, row order of features.npy
    manifest.json                written LAST: its presence means the store is complete

A store without a manifest is partial and is never read; a rerun reuses its finished
shards. Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerprobe.errors import LayerprobeError

STORE_VERSION = 1


class FeatureError(LayerprobeError):
    """Non-finite features or an unreadable store; the message names model, layer and example."""


def fingerprint(parts: dict) -> str:
    """A stable hash of everything that changes the numbers."""
    blob = json.dumps({"store_version": STORE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


@dataclass
class FeatureStore:
    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def shard_dir(self) -> Path:
        return self.root / "shards"

    @property
    def complete(self) -> bool:
        return self.manifest_path.exists()

    def shard_path(self, index: int) -> Path:
        return self.shard_dir / f"shard_{index:05d}.npy"

    def finished_shards(self) -> set[int]:
        if not self.shard_dir.exists():
            return set()
        return {int(p.stem.split("_")[1]) for p in self.shard_dir.glob("shard_*.npy")}

    def write_shard(self, index: int, features: np.ndarray) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(self.shard_path(index), features)

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def load(self) -> tuple[np.ndarray, list[str]]:
        """(features memmap [n, L+1, d], ids). Only complete stores can be read."""
        if not self.complete:
            raise FeatureError(f"feature store {self.root} is incomplete (no manifest.json); rerun train.py to finish it")
        ids = json.loads((self.root / "ids.json").read_text())
        return np.load(self.root / "features.npy", mmap_mode="r"), ids

    def finalize(self, ids: list[str], num_shards: int, meta: dict, role: str) -> None:
        """Stream the shards into one array, check every value is finite, then write the manifest.

        Runs shard by shard, so peak memory is one shard whatever the number of examples.
        """
        first = np.load(self.shard_path(0), mmap_mode="r")
        shape = (len(ids),) + first.shape[1:]
        tmp = self.root / f".features.{os.getpid()}.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype, shape=shape)
        row = 0
        for i in range(num_shards):
            shard = np.load(self.shard_path(i), mmap_mode="r")
            bad = ~np.isfinite(shard)
            if bad.any():
                r, layer, _ = np.argwhere(bad)[0]
                tmp.unlink(missing_ok=True)
                raise FeatureError(
                    f"model '{role}' produced NaN/inf features at layer {layer} for example '{ids[row + r]}' "
                    f"(task {meta.get('task')}); check the checkpoint, or use extract.dtype=float32 if float16 overflowed"
                )
            out[row : row + len(shard)] = shard
            row += len(shard)
        if row != len(ids):
            tmp.unlink(missing_ok=True)
            raise FeatureError(f"store {self.root} has {row} rows in its shards but {len(ids)} ids; delete it and rerun")
        out.flush()
        del out
        os.replace(tmp, self.root / "features.npy")
        atomic_write_bytes(self.root / "ids.json", json.dumps(ids).encode())
        manifest = {
            **meta,
            "n": shape[0],
            "num_layers": shape[1],
            "dim": shape[2],
            "dtype": str(first.dtype),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=2).encode())
        for i in range(num_shards):  # the consolidated array replaces them
            self.shard_path(i).unlink(missing_ok=True)
