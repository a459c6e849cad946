"""Feature store: round trip, fingerprints, atomic shards, resume after an interruption."""
import json
from dataclasses import replace

import numpy as np
import pytest

from layerprobe.models import LayerCapture, checkpoint_identity, load_backbone
from layerprobe.config import ExtractConfig
from layerprobe.features import extract as extract_mod
from layerprobe.features.extract import ensure_features, store_for
from layerprobe.features.store import FeatureError, FeatureStore
from layerprobe.tasks import load_tasks
from layerprobe.config import TaskConfig

TRAINER = {"accelerator": "cpu", "devices": 1}


@pytest.fixture()
def task():
    # words outside the tiny tokenizer's vocabulary map to <unk>; that is fine for the store
    return load_tasks(TaskConfig(tasks=["sentiment"], n_per_task=40))[0]


def test_round_trip_matches_direct_capture(llama_dir, task, tmp_path):
    cfg = ExtractConfig(shard_size=16, batch_size=8)
    stores = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path)
    feats, ids = stores["sentiment"].load()
    assert isinstance(feats, np.memmap)
    assert ids == task.ids and feats.shape[0] == len(task.examples)
    manifest = json.loads((stores["sentiment"].root / "manifest.json").read_text())
    assert manifest["n"] == 40 and manifest["num_layers"] == 4
    assert not list(stores["sentiment"].root.glob("shards/*.npy"))  # consolidated

    model, tok = load_backbone(str(llama_dir))
    enc = tok([task.examples[i].text for i in (0, 17, 39)], padding=True, return_tensors="pt")
    with LayerCapture(model, "last") as cap:
        direct = cap(enc["input_ids"], enc["attention_mask"]).numpy()
    np.testing.assert_allclose(feats[[0, 17, 39]], direct, atol=1e-5)


def test_fingerprint_changes_with_every_setting(llama_dir, task, tmp_path):
    identity = checkpoint_identity(str(llama_dir))
    base = ExtractConfig()
    root = store_for(tmp_path, identity, task, base).root
    variants = [replace(base, pooling="mean"), replace(base, max_length=64), replace(base, dtype="bfloat16"),
                replace(base, truncation_side="right"), replace(base, final_norm=True), replace(base, store_dtype="float16")]
    roots = {store_for(tmp_path, identity, task, v).root for v in variants}
    assert root not in roots and len(roots) == len(variants)
    # batch and shard sizes do not change the numbers, so they do not change the store
    assert store_for(tmp_path, identity, task, replace(base, batch_size=3, shard_size=7)).root == root
    other_task = load_tasks(TaskConfig(tasks=["topic"], n_per_task=40))[0]
    assert store_for(tmp_path, identity, other_task, base).root != root
    assert store_for(tmp_path, {**identity, "content": "other weights"}, task, base).root != root


def test_checkpoint_identity_follows_the_weights_not_the_path(tmp_path):
    from conftest import tiny_llama

    first = checkpoint_identity(str(tiny_llama(tmp_path / "m", seed=0)))
    assert checkpoint_identity(str(tmp_path / "m")) == first  # stable
    second = checkpoint_identity(str(tiny_llama(tmp_path / "m", seed=1)))  # same path, new weights
    assert second["content"] != first["content"]


def test_second_run_does_not_touch_the_backbone(llama_dir, task, tmp_path, monkeypatch, caplog):
    cfg = ExtractConfig(shard_size=16)
    ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path)

    def boom(*a, **k):
        raise AssertionError("backbone loaded on a cached run")

    monkeypatch.setattr(extract_mod, "load_backbone", boom)
    with caplog.at_level("INFO"):
        ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path)
    assert "backbone not run" in caplog.text


def _crash_after_two_shards(llama_dir, task, cfg, run_dir, monkeypatch) -> FeatureStore:
    """Extract until two shards are written, then die as a killed job would; return the partial store."""
    real_write = FeatureStore.write_shard
    written = []

    def write_then_die(self, index, features):
        real_write(self, index, features)
        written.append(index)
        if len(written) == 2:
            raise RuntimeError("simulated crash after two shards")

    monkeypatch.setattr(FeatureStore, "write_shard", write_then_die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_features("base", str(llama_dir), [task], cfg, TRAINER, run_dir)
    monkeypatch.setattr(FeatureStore, "write_shard", real_write)
    return FeatureStore(next(p for p in (run_dir / "features").iterdir() if p.is_dir()))


def test_interrupted_extraction_resumes_to_identical_arrays(llama_dir, task, tmp_path, monkeypatch):
    cfg = ExtractConfig(shard_size=8, batch_size=4)
    reference, _ = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "ref")["sentiment"].load()

    store = _crash_after_two_shards(llama_dir, task, cfg, tmp_path / "run", monkeypatch)
    assert not store.complete and store.finished_shards() == {0, 1}
    with pytest.raises(FeatureError, match="incomplete"):
        store.load()

    calls = []
    real_predict = extract_mod.FeatureExtractor.predict_step
    monkeypatch.setattr(extract_mod.FeatureExtractor, "predict_step",
                        lambda self, batch, i: calls.append(batch[0]) or real_predict(self, batch, i))
    resumed, _ = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "run")["sentiment"].load()
    assert sorted(calls) == [2, 3, 4]  # only the missing shards ran
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(reference))


def test_non_finite_features_name_model_layer_and_example(tmp_path):
    store = FeatureStore(tmp_path / "s")
    good = np.zeros((3, 4, 5), np.float32)
    bad = good.copy()
    bad[1, 2, 0] = np.nan
    store.write_shard(0, good)
    store.write_shard(1, bad)
    ids = [f"t:{i}" for i in range(6)]
    with pytest.raises(FeatureError, match=r"model 'tuned'.*layer 2.*example 't:4'"):
        store.finalize(ids, 2, {"task": "t"}, "tuned")
    assert not store.complete


# --- integrity: sizes and checksums in the manifest, damaged stores rebuilt, fsync before rename ----------


def _reference(llama_dir, task, tmp_path, cfg):
    store = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "ref")["sentiment"]
    return np.array(store.load()[0])


def _zero_rows(path, rows: slice, row_bytes: int, header: int):
    """Overwrite rows of an .npy file with zeros in place (same size, other bytes)."""
    with open(path, "r+b") as f:
        f.seek(header + rows.start * row_bytes)
        f.write(b"\0" * ((rows.stop - rows.start) * row_bytes))


def _npy_header_len(path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        return f.tell()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_manifest_records_exact_sizes_and_crc32(llama_dir, task, tmp_path):
    import zlib

    store = ensure_features("base", str(llama_dir), [task], ExtractConfig(shard_size=16), TRAINER, tmp_path)["sentiment"]
    files = store.manifest()["files"]
    for name in ("features.npy", "ids.json"):
        data = (store.root / name).read_bytes()
        assert files[name] == {"bytes": len(data), "crc32": zlib.crc32(data)}  # independent of the writer's running CRC
    assert store.damage(verify=True) is None


def _built_store(llama_dir, task, tmp_path):
    """(cfg, reference features, a complete store under tmp_path/run, its features.npy)."""
    cfg = ExtractConfig(shard_size=16)
    reference = _reference(llama_dir, task, tmp_path, cfg)
    store = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "run")["sentiment"]
    return cfg, reference, store, store.root / "features.npy"


def _rebuilt_with_one_warning(llama_dir, task, tmp_path, cfg, caplog, reason):
    """The next ensure_features call: one warning naming `reason` and "rebuilding", and the rebuilt store."""
    with caplog.at_level("WARNING"):
        rebuilt = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "run")["sentiment"]
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and reason in warnings[0] and "rebuilding" in warnings[0]
    return rebuilt


def test_truncated_features_are_refused_on_load_and_rebuilt(llama_dir, task, tmp_path, caplog):
    cfg, reference, store, path = _built_store(llama_dir, task, tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(FeatureError) as err:
        store.load()
    message = str(err.value)
    assert str(store.root) in message and f"{size // 2} bytes" in message and str(size) in message
    assert "\n" not in message and "rebuild" in message

    rebuilt = _rebuilt_with_one_warning(llama_dir, task, tmp_path, cfg, caplog, "damaged")
    np.testing.assert_array_equal(np.asarray(rebuilt.load()[0]), reference)


def test_same_size_corruption_is_caught_by_the_checksum_on_request(llama_dir, task, tmp_path, caplog):
    cfg, reference, store, path = _built_store(llama_dir, task, tmp_path)
    size = path.stat().st_size
    _zero_rows(path, slice(5, 25), reference[0].nbytes, _npy_header_len(path))
    assert path.stat().st_size == size
    assert store.damage() is None  # sizes match: only the checksum can tell
    with pytest.raises(FeatureError, match="checksum"):
        store.verify()
    with pytest.raises(FeatureError, match="checksum"):
        store.load(verify=True)

    rebuilt = _rebuilt_with_one_warning(llama_dir, task, tmp_path, replace(cfg, verify=True), caplog, "checksum")
    np.testing.assert_array_equal(np.asarray(rebuilt.load(verify=True)[0]), reference)


def test_corrupted_shard_is_caught_at_finalize_and_extracted_again(llama_dir, task, tmp_path, monkeypatch, caplog):
    cfg = ExtractConfig(shard_size=8, batch_size=4)
    reference = _reference(llama_dir, task, tmp_path, cfg)
    store = _crash_after_two_shards(llama_dir, task, cfg, tmp_path / "run", monkeypatch)
    shard = store.shard_path(0)
    _zero_rows(shard, slice(2, 6), reference[0].nbytes, _npy_header_len(shard))  # same size, rows zeroed

    calls = []
    real_predict = extract_mod.FeatureExtractor.predict_step
    monkeypatch.setattr(extract_mod.FeatureExtractor, "predict_step",
                        lambda self, batch, i: calls.append(batch[0]) or real_predict(self, batch, i))
    with caplog.at_level("WARNING"):
        resumed = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "run")["sentiment"]
    assert sorted(calls) == [0, 2, 3, 4]  # the missing shards, then the damaged one again
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "shard 0: checksum mismatch" in warnings[0]
    np.testing.assert_array_equal(np.asarray(resumed.load(verify=True)[0]), reference)


def test_shard_damaged_again_after_its_rewrite_stops_with_one_line(llama_dir, task, tmp_path, monkeypatch):
    cfg = ExtractConfig(shard_size=16)
    real_write = FeatureStore.write_shard

    def write_badly(self, index, features):  # a disk that corrupts every shard 1 it is given
        real_write(self, index, features)
        if index == 1:
            with open(self.shard_path(index), "r+b") as f:
                f.seek(-4, 2)
                f.write(b"\1\2\3\4")

    monkeypatch.setattr(FeatureStore, "write_shard", write_badly)
    with pytest.raises(FeatureError) as err:
        ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path)
    assert "shard 1: checksum mismatch" in str(err.value) and "\n" not in str(err.value)
    store = FeatureStore(next(p for p in (tmp_path / "features").iterdir() if p.is_dir()))
    assert not store.complete and not (store.root / "features.npy").exists()


def test_missing_manifest_is_rebuilt(llama_dir, task, tmp_path, monkeypatch):
    cfg = ExtractConfig(shard_size=16)
    reference = _reference(llama_dir, task, tmp_path, cfg)
    store = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "run")["sentiment"]
    store.manifest_path.unlink()
    with pytest.raises(FeatureError, match="incomplete"):
        store.load()
    calls = []
    real_predict = extract_mod.FeatureExtractor.predict_step
    monkeypatch.setattr(extract_mod.FeatureExtractor, "predict_step",
                        lambda self, batch, i: calls.append(batch[0]) or real_predict(self, batch, i))
    rebuilt = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "run")["sentiment"]
    assert sorted(calls) == [0, 1, 2]  # the backbone ran again: a store without its manifest is never read
    np.testing.assert_array_equal(np.asarray(rebuilt.load()[0]), reference)


def test_unreadable_manifest_is_damage_not_a_crash(llama_dir, task, tmp_path):
    store = ensure_features("base", str(llama_dir), [task], ExtractConfig(shard_size=16), TRAINER, tmp_path)["sentiment"]
    store.manifest_path.write_text('{"n": 4')
    with pytest.raises(FeatureError, match="manifest.json is unreadable"):
        store.load()


def test_files_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    import os

    synced, published = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace_(src, dst):
        published.append((os.path.realpath(src) in synced, os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace_)
    store = FeatureStore(tmp_path / "s")
    store.write_shard(0, np.ones((3, 2, 4), np.float32))
    store.write_shard(1, np.ones((2, 2, 4), np.float32))
    store.finalize([f"t:{i}" for i in range(5)], 2, {"task": "t"}, "base")
    names = [name for _, name in published]
    assert {"shard_00000.npy", "shard_00000.json", "features.npy", "ids.json", "manifest.json"} <= set(names)
    assert all(was_synced for was_synced, _ in published), published
    assert names[-1] == "manifest.json"  # published last
    np.testing.assert_array_equal(store.load()[0], np.ones((5, 2, 4), np.float32))
