"""Probes: high accuracy where the label is linearly encoded, chance where it is not,
and the stacked heads equal independent per-layer classifiers."""
import numpy as np
import pytest
import torch

from layerprobe.config import ProbeConfig
from layerprobe.probes import ProbeError, StackedHeads, control_labels, fit_probes, resolve_layers
from layerprobe.tasks import finalize_task

TRAINER = {"accelerator": "cpu", "devices": 1}


def synthetic_task(n=600, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    rows = [(f"syn:{i}", f"text {i}", int(y)) for i, y in enumerate(labels)]
    return finalize_task("syn", "synthetic", "", [f"c{k}" for k in range(classes)], rows, (0.6, 0.2, 0.2), 0)


def layered_features(task, d=16, signal_layers=(2, 3), seed=0):
    """[n, 4, d] features: label encoded linearly (class means) in signal_layers, pure noise elsewhere."""
    rng = np.random.default_rng(seed)
    y = task.labels()
    feats = rng.normal(size=(len(y), 4, d)).astype(np.float32)
    means = rng.normal(size=(task.num_classes, d)) * 3.0
    for layer in signal_layers:
        feats[:, layer] += means[y]
    return feats


def metric(rows, model, layer, name):
    return next(r["value"] for r in rows if (r["model"], r["layer"], r["metric"], r["split"]) == (model, layer, name, "test"))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_finds_linearly_encoded_labels_and_chance_elsewhere(kind):
    task = synthetic_task()
    feats = {"base": layered_features(task)}
    cfg = ProbeConfig(name=kind, max_epochs=40, lr=0.01)
    rows = fit_probes(task, feats, cfg, TRAINER, seed=0)
    chance = 1 / task.num_classes
    for layer in (2, 3):
        assert metric(rows, "base", layer, "accuracy") > 0.95
        assert metric(rows, "base", layer, "selectivity") > 0.5
    for layer in (0, 1):
        assert abs(metric(rows, "base", layer, "accuracy") - chance) < 0.12
    for layer in range(4):  # shuffled labels carry nothing anywhere
        assert abs(metric(rows, "base", layer, "control_accuracy") - chance) < 0.12
    test_labels = task.labels()[task.indices("test")]
    majority = np.bincount(task.labels()[task.indices("train")]).argmax()
    assert metric(rows, "base", 0, "majority_baseline") == pytest.approx((test_labels == majority).mean())


def test_models_probed_together_match_probed_alone():
    task = synthetic_task(n=300)
    a, b = layered_features(task, seed=1), layered_features(task, signal_layers=(1,), seed=2)
    cfg = ProbeConfig(max_epochs=15, control=False)
    together = fit_probes(task, {"base": a, "tuned": b}, cfg, TRAINER, seed=0)
    alone = fit_probes(task, {"tuned": b}, cfg, TRAINER, seed=0)
    # each model's layers keep their own signal when trained side by side
    for rows in (together, alone):
        assert metric(rows, "tuned", 1, "accuracy") > 0.95
        assert max(metric(rows, "tuned", layer, "accuracy") for layer in (0, 2, 3)) < 0.55
    assert metric(together, "base", 2, "accuracy") > 0.95 and metric(together, "base", 1, "accuracy") < 0.55


def test_stacked_heads_equal_independent_linear_layers():
    torch.manual_seed(0)
    heads = StackedHeads(num_layers=3, dim=5, num_heads=2, num_classes=4)
    x = torch.randn(7, 3, 5)
    out = heads(x)
    for layer in range(3):
        for k in range(2):
            ref = x[:, layer] @ heads.weight[layer, :, k] + heads.bias[layer, k]
            torch.testing.assert_close(out[:, layer, k], ref)


def test_control_labels_are_a_fixed_permutation():
    y = np.arange(50) % 3
    c1, c2 = control_labels(y, 7), control_labels(y, 7)
    np.testing.assert_array_equal(c1, c2)
    assert sorted(c1) == sorted(y) and (c1 != y).any()


def test_layers_out_of_range_is_a_clear_error():
    assert resolve_layers([3, 1, 3], 9, "base") == [1, 3]
    with pytest.raises(ProbeError, match=r"probe.layers=\[40\].*'base' has layers 0..8"):
        resolve_layers([40], 9, "base")
