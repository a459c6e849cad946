"""The feature store: `[n, L+1, d]` per (model, task, extraction settings) on disk.

Layout of `<cache_dir>/features/<fingerprint>/`:
    shards/shard_00000.npy ...   written atomically (tmp file, fsync, rename) while extracting
    shards/shard_00000.json ...  beside each shard: its rows, byte size and CRC-32, written after it
    layout.json                  shard size (and world size) of a partial store, fixed when it began
    features.npy                 the consolidated array, read memory-mapped
    ids.json                     example ids, row order of features.npy
    manifest.json                written LAST: its presence means the store is complete; it
                                 records the byte size and CRC-32 of features.npy and ids.json

A store without a manifest is partial and is never read; a rerun reuses its finished
shards. Integrity: every load compares the files' sizes with the manifest (a truncated or
extended file is caught at once) and checks ids.json's checksum; the checksum of
features.npy is checked when the store is finalized (each shard against the checksum it
was written with) and on request (`FeatureStore.verify()`, `extract.verify=true`), since
it reads the whole array. `layerprobe.features.extract.ensure_features` rebuilds a damaged
store with one warning. Every file is flushed to disk (fsync) before the rename that
publishes it. Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerprobe.errors import LayerprobeError

STORE_VERSION = 1  # part of every fingerprint: bump only when the numbers themselves change
MANIFEST_FORMAT = 2  # 2: the manifest records byte sizes and CRC-32 checksums of its files
CHUNK = 16 << 20  # bytes per read when checksumming a file
LEGACY = "its manifest has no size and checksum records (written by an older layerprobe)"

log = logging.getLogger(__name__)


class FeatureError(LayerprobeError):
    """Non-finite features or an unreadable store; the message names model, layer and example."""


class DamagedShards(Exception):
    """Shards that fail their size or checksum record at finalize (internal: they are extracted again)."""

    def __init__(self, shards: dict[int, str]):
        super().__init__(", ".join(f"shard {i}: {why}" for i, why in sorted(shards.items())))
        self.shards = shards


def fingerprint(parts: dict) -> str:
    """A stable hash of everything that changes the numbers."""
    blob = json.dumps({"store_version": STORE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def prepare_cache_dir(path) -> Path:
    """The absolute cache dir, created and checked for writing before anything runs."""
    root = Path(path).expanduser().resolve()
    try:
        (root / "features").mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise FeatureError(f"cannot use paths.cache_dir={path} ({err.strerror or err}); point paths.cache_dir "
                           "(or LAYERPROBE_CACHE) at a directory you can write") from None
    return root


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a tmp file, fsync it, rename it onto `path`, fsync the directory."""
    tmp = _tmp_for(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class _Checksummed:
    """A binary file being written, with the running CRC-32 and size of what went in."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return self.f.write(view)


def _write_npy(out: _Checksummed, dtype: np.dtype, shape: tuple, chunks) -> None:
    np.lib.format.write_array_header_2_0(
        out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    for chunk in chunks:
        out.write(np.ascontiguousarray(chunk, dtype=dtype).data)


def atomic_save_npy(path: Path, array: np.ndarray) -> dict:
    """Save `array` as .npy atomically (fsync before the rename); returns its byte size and CRC-32."""
    tmp = _tmp_for(path)
    with open(tmp, "wb") as f:
        out = _Checksummed(f)
        _write_npy(out, array.dtype, array.shape, [array])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return {"bytes": out.size, "crc32": out.crc}


def file_checksum(path: Path) -> dict:
    """Byte size and CRC-32 of a file, read in 16 MiB chunks (see docs: a few GB/s when cached)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": crc}


def _npy_from_bytes(raw: bytes) -> np.ndarray:
    """The array of an .npy file's bytes, without copying them."""
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    count = int(np.prod(shape))
    if fortran or f.tell() + count * dtype.itemsize != len(raw):
        raise ValueError("header and size disagree")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=f.tell()).reshape(shape)


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

    def shard_record_path(self, index: int) -> Path:
        return self.shard_dir / f"shard_{index:05d}.json"

    def _shard_record(self, index: int) -> dict | None:
        try:
            return json.loads(self.shard_record_path(index).read_text())
        except (OSError, ValueError):
            return None

    def finished_shards(self) -> set[int]:
        """Shards on disk with their record, at the size it records (the full checksum is checked at finalize)."""
        if not self.shard_dir.exists():
            return set()
        done = set()
        for p in self.shard_dir.glob("shard_*.npy"):
            i = int(p.stem.split("_")[1])
            record = self._shard_record(i)
            if record is not None and record.get("bytes") == p.stat().st_size:
                done.add(i)
        return done

    def shard_layout(self, n: int, shard_size: int, world_size: int = 1) -> int:
        """The shard size to extract with: a partial store keeps the one it was begun with.

        Shards are fixed slices of the example list, so a resume may use any world size; a
        different `extract.shard_size` would cut other slices, so the recorded one wins. A
        shard whose row count does not fit the layout, or that lacks its size record (written
        by a run that died in between), is deleted and extracted again.
        """
        path = self.root / "layout.json"
        try:
            layout = json.loads(path.read_text()) if path.exists() else None
        except ValueError:
            layout = None  # unreadable: start a new layout (its shards are checked below)
        if layout is not None and layout.get("n") == n:
            if layout["shard_size"] != shard_size or layout.get("world_size") != world_size:
                log.info("resuming %s with its own layout (shard_size=%d, begun with world size %s; now %d, %d)",
                         self.root.name, layout["shard_size"], layout.get("world_size"), shard_size, world_size)
            shard_size = int(layout["shard_size"])
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps({"n": n, "shard_size": shard_size, "world_size": world_size}).encode())
        finished = self.finished_shards()
        for p in sorted(self.shard_dir.glob("shard_*.npy")) if self.shard_dir.exists() else []:
            i = int(p.stem.split("_")[1])
            if i not in finished:
                self.drop_shard(i)
                continue
            rows = self._shard_record(i).get("rows")
            if rows != min(shard_size, n - i * shard_size):
                log.warning("shard %d of %s has %s rows, not those of shard_size=%d: extracting it again",
                            i, self.root.name, rows, shard_size)
                self.drop_shard(i)
        return shard_size

    def drop_shard(self, index: int) -> None:
        self.shard_record_path(index).unlink(missing_ok=True)
        self.shard_path(index).unlink(missing_ok=True)

    def write_shard(self, index: int, features: np.ndarray) -> None:
        """The shard (atomic, fsync'd), then its record: a shard without a record is not finished."""
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.shard_record_path(index).unlink(missing_ok=True)
        record = atomic_save_npy(self.shard_path(index), features)
        atomic_write_bytes(self.shard_record_path(index), json.dumps({"rows": int(features.shape[0]), **record}).encode())

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    # --- integrity --------------------------------------------------------------------------

    def damage(self, verify: bool = False) -> str | None:
        """What is wrong with a complete store, or None: file sizes always, ids.json's checksum
        always (it is small), features.npy's checksum only with verify=True (reads it all)."""
        try:
            manifest = self.manifest()
        except (OSError, ValueError):
            return "manifest.json is unreadable"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            return LEGACY
        for name in ("features.npy", "ids.json"):
            record = files.get(name) or {}
            path = self.root / name
            if not path.exists():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != record.get("bytes"):
                return f"{name} has {size} bytes, the manifest records {record.get('bytes')}"
            if (name == "ids.json" or verify) and file_checksum(path)["crc32"] != record.get("crc32"):
                return f"{name} does not match its checksum (same size, other bytes)"
        return None

    def verify(self) -> None:
        """Check sizes and every checksum; a damaged store raises FeatureError (one line)."""
        if not self.complete:
            raise FeatureError(f"feature store {self.root} is incomplete (no manifest.json); rerun train.py to finish it")
        problem = self.damage(verify=True)
        if problem:
            raise FeatureError(self.damaged_message(problem))

    def damaged_message(self, problem: str) -> str:
        return f"feature store {self.root} is damaged: {problem}; rerun train.py to rebuild it, or delete that directory"

    def discard(self) -> None:
        """Remove a damaged store's files, manifest first, so it is never read as complete again."""
        self.manifest_path.unlink(missing_ok=True)
        fsync_dir(self.root)
        for name in ("features.npy", "ids.json", "layout.json"):
            (self.root / name).unlink(missing_ok=True)
        shutil.rmtree(self.shard_dir, ignore_errors=True)

    def load(self, verify: bool = False) -> tuple[np.ndarray, list[str]]:
        """(features memmap [n, L+1, d], ids). Only complete stores whose files match their manifest are read."""
        if not self.complete:
            raise FeatureError(f"feature store {self.root} is incomplete (no manifest.json); rerun train.py to finish it")
        problem = self.damage(verify)
        if problem is None:
            try:
                ids = json.loads((self.root / "ids.json").read_text())
                features = np.load(self.root / "features.npy", mmap_mode="r")
            except (OSError, ValueError) as err:
                problem = f"its files cannot be read ({err})"
            else:
                manifest = self.manifest()
                shape = (manifest.get("n"), manifest.get("num_layers"), manifest.get("dim"))
                if features.shape != shape or len(ids) != shape[0]:
                    problem = f"features.npy has shape {features.shape} and {len(ids)} ids; the manifest records {shape}"
        if problem:
            raise FeatureError(self.damaged_message(problem))
        return features, ids

    # --- consolidation ----------------------------------------------------------------------

    def _read_shard(self, index: int, problems: dict[int, str]) -> np.ndarray | None:
        """The shard's array if its bytes match the record written with it; else None (noted in `problems`)."""
        record = self._shard_record(index)
        try:
            raw = self.shard_path(index).read_bytes()
        except OSError:
            problems[index] = "missing"
            return None
        if record is None:
            problems[index] = "no size/checksum record"
        elif len(raw) != record.get("bytes"):
            problems[index] = f"{len(raw)} bytes, recorded {record.get('bytes')}"
        elif zlib.crc32(raw) != record.get("crc32"):
            problems[index] = "checksum mismatch"
        else:
            try:
                return _npy_from_bytes(raw)
            except ValueError:
                problems[index] = "unreadable"
        return None

    def finalize(self, ids: list[str], num_shards: int, meta: dict, role: str) -> None:
        """Stream the shards into one array, check every value is finite, then write the manifest.

        Each shard is checked against the size and CRC-32 recorded when it was written; shards
        that fail are deleted and raise DamagedShards (all of them, so that one more extraction
        replaces them) before anything is published. Runs shard by shard with plain file writes
        (no memory map of the output, whose written pages would count in this process's RSS),
        so peak memory is one shard whatever the number of examples.
        """
        problems: dict[int, str] = {}
        shape, dtype, row = None, None, 0
        tmp = self.root / f".features.{os.getpid()}.tmp.npy"
        try:
            with open(tmp, "wb") as f:
                out = _Checksummed(f)
                for i in range(num_shards):
                    shard = self._read_shard(i, problems)
                    if shard is None:
                        continue
                    if shape is None:
                        shape, dtype = (len(ids),) + shard.shape[1:], shard.dtype
                        _write_npy(out, dtype, shape, [])
                    elif shard.shape[1:] != shape[1:] or shard.dtype != dtype:
                        problems[i] = f"shape {shard.shape} / {shard.dtype}, the other shards have {shape[1:]} / {dtype}"
                        continue
                    if problems:  # nothing will be published: only find the other bad shards
                        continue
                    bad = ~np.isfinite(shard)
                    if bad.any():
                        r, layer, _ = np.argwhere(bad)[0]
                        raise FeatureError(
                            f"model '{role}' produced NaN/inf features at layer {layer} for example '{ids[row + r]}' "
                            f"(task {meta.get('task')}); check the checkpoint, or use extract.dtype=float32 if float16 overflowed"
                        )
                    out.write(shard.data)
                    row += len(shard)
                    del shard, bad
                if problems:
                    raise DamagedShards(problems)
                f.flush()
                os.fsync(f.fileno())
            if row != len(ids):
                raise FeatureError(f"store {self.root} has {row} rows in its shards but {len(ids)} ids; delete it and rerun")
        except BaseException:
            tmp.unlink(missing_ok=True)
            for i in problems:
                self.drop_shard(i)
            raise
        os.replace(tmp, self.root / "features.npy")
        ids_bytes = json.dumps(ids).encode()
        atomic_write_bytes(self.root / "ids.json", ids_bytes)  # fsyncs the directory, so the rename above too
        manifest = {
            **meta,
            "format": MANIFEST_FORMAT,
            "n": shape[0],
            "num_layers": shape[1],
            "dim": shape[2],
            "dtype": str(dtype),
            "files": {"features.npy": {"bytes": out.size, "crc32": out.crc},
                      "ids.json": {"bytes": len(ids_bytes), "crc32": zlib.crc32(ids_bytes)}},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=2).encode())
        for i in range(num_shards):  # the consolidated array replaces them
            self.drop_shard(i)
        (self.root / "layout.json").unlink(missing_ok=True)
