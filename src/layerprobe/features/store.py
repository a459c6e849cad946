"""The feature store: `[n, L+1, d]` per (model, task, extraction settings) on disk.

Layout of `<cache_dir>/features/<fingerprint>/`:
    shards/shard_00000.npy ...   written atomically (tmp file + rename) while extracting
    layout.json                  shard size (and world size) of a partial store, fixed when it began
    features.npy                 the consolidated array, read memory-mapped
    ids.json                     example ids, row order of features.npy
    manifest.json                written LAST: its presence means the store is complete

A store without a manifest is partial and is never read; a rerun reuses its finished
shards. Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerprobe.errors import LayerprobeError

STORE_VERSION = 1

log = logging.getLogger(__name__)


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

    def shard_layout(self, n: int, shard_size: int, world_size: int = 1) -> int:
        """The shard size to extract with: a partial store keeps the one it was begun with.

        Shards are fixed slices of the example list, so a resume may use any world size; a
        different `extract.shard_size` would cut other slices, so the recorded one wins. A
        shard whose row count does not fit the layout is deleted and extracted again.
        """
        path = self.root / "layout.json"
        layout = json.loads(path.read_text()) if path.exists() else None
        if layout is not None and layout.get("n") == n:
            if layout["shard_size"] != shard_size or layout.get("world_size") != world_size:
                log.info("resuming %s with its own layout (shard_size=%d, begun with world size %s; now %d, %d)",
                         self.root.name, layout["shard_size"], layout.get("world_size"), shard_size, world_size)
            shard_size = int(layout["shard_size"])
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps({"n": n, "shard_size": shard_size, "world_size": world_size}).encode())
        for i in sorted(self.finished_shards()):
            rows = np.load(self.shard_path(i), mmap_mode="r").shape[0]
            if rows != min(shard_size, n - i * shard_size):
                log.warning("shard %d of %s has %d rows, not those of shard_size=%d: extracting it again",
                            i, self.root.name, rows, shard_size)
                self.shard_path(i).unlink()
        return shard_size

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

        Runs shard by shard with plain file writes (no memory map of the output, whose
        written pages would count in this process's RSS), so peak memory is one shard
        whatever the number of examples.
        """
        first = np.load(self.shard_path(0), mmap_mode="r")
        shape = (len(ids),) + first.shape[1:]
        tmp = self.root / f".features.{os.getpid()}.tmp.npy"
        row = 0
        with open(tmp, "wb") as out:
            np.lib.format.write_array_header_2_0(
                out, {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False, "shape": shape})
            for i in range(num_shards):
                shard = np.load(self.shard_path(i))
                bad = ~np.isfinite(shard)
                if bad.any():
                    r, layer, _ = np.argwhere(bad)[0]
                    out.close()
                    tmp.unlink(missing_ok=True)
                    raise FeatureError(
                        f"model '{role}' produced NaN/inf features at layer {layer} for example '{ids[row + r]}' "
                        f"(task {meta.get('task')}); check the checkpoint, or use extract.dtype=float32 if float16 overflowed"
                    )
                out.write(np.ascontiguousarray(shard, dtype=first.dtype).tobytes())
                row += len(shard)
                del shard, bad
        if row != len(ids):
            tmp.unlink(missing_ok=True)
            raise FeatureError(f"store {self.root} has {row} rows in its shards but {len(ids)} ids; delete it and rerun")
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
        (self.root / "layout.json").unlink(missing_ok=True)
