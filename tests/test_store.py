"""Feature store: round trip, fingerprints, atomic shards, resume after an interruption."""
import json
from dataclasses import replace

import numpy as np
import pytest

from layerprobe.backbone import LayerCapture, checkpoint_identity, load_backbone
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


def test_interrupted_extraction_resumes_to_identical_arrays(llama_dir, task, tmp_path, monkeypatch):
    cfg = ExtractConfig(shard_size=8, batch_size=4)
    reference, _ = ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "ref")["sentiment"].load()

    written = []
    real_write = FeatureStore.write_shard

    def write_then_die(self, index, features):
        real_write(self, index, features)
        written.append(index)
        if len(written) == 2:
            raise RuntimeError("simulated crash after two shards")

    monkeypatch.setattr(FeatureStore, "write_shard", write_then_die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_features("base", str(llama_dir), [task], cfg, TRAINER, tmp_path / "run")
    monkeypatch.setattr(FeatureStore, "write_shard", real_write)
    store = FeatureStore(next(p for p in (tmp_path / "run" / "features").iterdir() if p.is_dir()))
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
