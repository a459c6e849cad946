"""Probes: high accuracy where the label is linearly encoded, chance where it is not,
the stacked heads equal independent per-layer classifiers, and the full-batch solver
reaches scikit-learn's optimum."""
import numpy as np
import pytest
import torch

from layerprobe.config import ConfigError, ProbeConfig
from layerprobe.probes import ProbeError, StackedHeads, fit_probes, fit_softmax_heads, resolve_layers
from layerprobe.tasks import finalize_task

TRAINER = {"accelerator": "cpu", "devices": 1}


def synthetic_task(n=600, classes=3, seed=0, types=40):
    """Prompts with one recurring type word each (the control task's types), labels at random."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    kinds = rng.integers(0, types, n)
    rows = [(f"syn:{i}", f"Classify the input.\nInput: item{kinds[i]} number {i}\nAnswer:", int(y))
            for i, y in enumerate(labels)]
    task = finalize_task("syn", "synthetic", "", [f"c{k}" for k in range(classes)], rows, (0.6, 0.2, 0.2), 0)
    return task, kinds


def layered_features(task, d=16, signal_layers=(2, 3), seed=0):
    """[n, 4, d] features: label encoded linearly (class means) in signal_layers, pure noise elsewhere."""
    rng = np.random.default_rng(seed)
    y = task.labels()
    feats = rng.normal(size=(len(y), 4, d)).astype(np.float32)
    means = rng.normal(size=(task.num_classes, d)) * 3.0
    for layer in signal_layers:
        feats[:, layer] += means[y]
    return feats


def metric(rows, model, layer, name, split="test"):
    return next(r["value"] for r in rows if (r["model"], r["layer"], r["metric"], r["split"]) == (model, layer, name, split))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_finds_linearly_encoded_labels_and_chance_elsewhere(kind):
    task, _ = synthetic_task()
    feats = {"base": layered_features(task)}
    cfg = ProbeConfig(name=kind, max_epochs=40, lr=0.01, mdl=False)
    rows = fit_probes(task, feats, cfg, TRAINER, seed=0)
    chance = 1 / task.num_classes
    for layer in (2, 3):
        assert metric(rows, "base", layer, "accuracy") > 0.95
        assert metric(rows, "base", layer, "selectivity") > 0.5
    for layer in (0, 1):
        assert abs(metric(rows, "base", layer, "accuracy") - chance) < 0.12
    test_labels = task.labels()[task.indices("test")]
    majority = np.bincount(task.labels()[task.indices("train")]).argmax()
    assert metric(rows, "base", 0, "majority_baseline") == pytest.approx((test_labels == majority).mean())
    # the rows a run writes for every layer
    keys = {(r["split"], r["metric"]) for r in rows if r["layer"] == 0}
    assert keys == {("test", m) for m in ("accuracy", "macro_f1", "majority_baseline", "control_accuracy", "selectivity")} | {
        ("val", "accuracy"), ("val", "weight_decay"), ("val", "control_accuracy"), ("train", "accuracy"),
        ("train", "control_accuracy")}


def test_models_probed_together_match_probed_alone():
    task, _ = synthetic_task(n=300)
    a, b = layered_features(task, seed=1), layered_features(task, signal_layers=(1,), seed=2)
    cfg = ProbeConfig(max_epochs=15, control=False, mdl=False)
    together = fit_probes(task, {"base": a, "tuned": b}, cfg, TRAINER, seed=0)
    alone = fit_probes(task, {"tuned": b}, cfg, TRAINER, seed=0)
    # each model's layers keep their own signal when trained side by side
    for rows in (together, alone):
        assert metric(rows, "tuned", 1, "accuracy") > 0.95
        assert max(metric(rows, "tuned", layer, "accuracy") for layer in (0, 2, 3)) < 0.55
    assert metric(together, "base", 2, "accuracy") > 0.95 and metric(together, "base", 1, "accuracy") < 0.55
    for layer in range(4):  # linear probes are fitted to the optimum: side by side changes nothing
        assert metric(together, "tuned", layer, "accuracy") == metric(alone, "tuned", layer, "accuracy")


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fit_frees_its_feature_copy_when_it_returns_or_raises(kind, fails, monkeypatch):
    """The Trainer and the DataModule reference each other; the standardized copy of a task's
    features must still be freed when fit_probes returns, not whenever the cycle collector runs.
    So must it when the fit raises (then caught in a notebook, or by a sweep that goes on in one
    process), although the exception's traceback still holds fit_probes' frame."""
    import gc
    import weakref

    import layerprobe.probes.fit as fit_module

    copies = []

    class Watched(fit_module.CachedFeatureData):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            copies.extend(weakref.ref(rows.x) for rows in self.data.values())

    def fail(*args, **kwargs):
        raise RuntimeError("planted failure after the fit")

    monkeypatch.setattr(fit_module, "CachedFeatureData", Watched)
    if fails:
        monkeypatch.setattr(fit_module.ProbeModule, "train_statistics", fail)
    task, _ = synthetic_task()

    def fit():
        fit_probes(task, {"base": layered_features(task)}, ProbeConfig(name=kind, max_epochs=2, mdl=False), TRAINER, seed=0)

    gc.disable()  # as between two automatic collections
    try:
        if fails:
            with pytest.raises(RuntimeError, match="planted failure") as caught:
                fit()
            assert caught.tb is not None  # the frames stay referenced while the copies are checked
        else:
            fit()
        alive = [ref() is not None for ref in copies]
    finally:
        gc.enable()
    assert len(copies) == 3 and not any(alive)


def test_stacked_heads_equal_independent_linear_layers():
    torch.manual_seed(0)
    heads = StackedHeads(num_layers=3, dim=5, num_heads=2, num_classes=4)
    x = torch.randn(7, 3, 5)
    out = heads(x)
    for layer in range(3):
        for k in range(2):
            ref = x[:, layer] @ heads.weight[layer, :, k] + heads.bias[layer, k]
            torch.testing.assert_close(out[:, layer, k], ref)


def test_full_batch_solver_reaches_the_sklearn_optimum():
    """Every (layer, weight decay) head against scikit-learn's LogisticRegression on the same
    objective (mean CE + wd ||W||^2 is sklearn's C = 1 / (2 n wd)), in float64."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n, d, C, layers = 200, 6, 3, 2
    y = rng.integers(0, C, n)
    x = rng.normal(size=(layers, n, d)) + rng.normal(size=(layers, C, d))[:, y] * np.array([0.5, 1.5])[:, None, None]
    x[:, :, 0] *= 20  # badly scaled: the preconditioner has to deal with it
    wds = [1e-3, 1e-2, 1e-1]
    W, b, info = fit_softmax_heads(torch.from_numpy(x), torch.from_numpy(y).view(-1, 1), torch.ones(n, 1),
                                   torch.tensor(wds, dtype=torch.float64), C, max_iter=500, tol=1e-12)
    for layer in range(layers):
        for g, wd in enumerate(wds):
            ref = LogisticRegression(C=1 / (2 * n * wd), tol=1e-12, max_iter=10000).fit(x[layer], y)
            np.testing.assert_allclose(W[layer, :, g].numpy(), ref.coef_.T, atol=2e-4 * np.abs(ref.coef_).max())
            # softmax is shift invariant: compare the intercepts up to a constant
            np.testing.assert_allclose(b[layer, g].numpy() - b[layer, g].numpy().mean(), ref.intercept_ - ref.intercept_.mean(),
                                       atol=2e-4 * max(1.0, np.abs(ref.intercept_).max()))


def test_layers_out_of_range_is_a_clear_error():
    assert resolve_layers([3, 1, 3], 9, "base") == [1, 3]
    with pytest.raises(ProbeError, match=r"probe.layers=\[40\].*'base' has layers 0..8"):
        resolve_layers([40], 9, "base")


@pytest.mark.parametrize("kwargs, message", [
    ({"mdl_fractions": [0.5, 0.25, 1.0]}, r"probe.mdl_fractions=\[0.5, 0.25, 1.0\] must increase"),
    ({"mdl_fractions": [0.1, 0.5]}, "end at 1.0"),
    ({"control_min_count": 1}, r"probe.control_min_count=1 must be >= 2"),
    ({"control_max_share": 0.0}, r"probe.control_max_share=0.0 must be in \(0, 1\]"),
    ({"weight_decays": [-1.0]}, r"probe.weight_decays=\[-1.0\] must be >= 0"),
    ({"seeds": []}, r"probe.seeds=\[\] is empty"),
    ({"solver_tol": 0.0}, "probe.solver_tol > 0"),
])
def test_bad_probe_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        ProbeConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_nystrom_recovers_a_low_rank_moment_exactly():
    """A PSD matrix of rank k <= r is reproduced exactly by its rank-r Nystrom factorization
    (Tropp et al. 2017), with orthonormal eigenvectors, in float64."""
    from layerprobe.probes.solver import nystrom

    rng = np.random.default_rng(1)
    d, k, r = 30, 6, 10
    G = torch.from_numpy(rng.normal(size=(2, d, k)) * np.array([1.0, 1e-2])[:, None, None])  # two scales
    A = G @ G.transpose(1, 2)
    omega = torch.from_numpy(rng.normal(size=(d, r)))
    U, lam = nystrom(A @ omega, omega)
    torch.testing.assert_close(U @ torch.diag_embed(lam) @ U.transpose(1, 2), A, atol=1e-9 * float(A.abs().max()), rtol=0)
    # the eigenvectors of the k nonzero eigenvalues are orthonormal; A's null space has no
    # columns (its singular values in the sketch are only the shift's): those are 0
    Uk = U[:, :, -k:]
    torch.testing.assert_close(Uk.transpose(1, 2) @ Uk, torch.eye(k, dtype=torch.float64).expand(2, k, k), atol=1e-10, rtol=0)
    exact = torch.linalg.eigvalsh(A)[:, -k:]
    torch.testing.assert_close(lam[:, -k:], exact, atol=1e-9 * float(exact.max()), rtol=0)
    assert float(U[:, :, : r - k].abs().max()) == 0.0 and float(lam[:, : r - k].abs().max()) == 0.0


def test_full_batch_solver_with_a_low_rank_preconditioner_reaches_the_sklearn_optimum():
    """Hidden-state-like features (a low-rank latent plus a little noise): the solver's Nystrom
    preconditioner stays below full rank, and every head still reaches scikit-learn's optimum."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    n, d, C, latent = 400, 48, 3, 5
    y = rng.integers(0, C, n)
    z = rng.normal(size=(n, latent)) + rng.normal(size=(C, latent))[y]
    x = z @ rng.normal(size=(latent, d)) + 0.05 * rng.normal(size=(n, d))
    x = (x - x.mean(0)) / x.std(0)
    wds = [1e-2, 1e-1]
    W, b, info = fit_softmax_heads(torch.from_numpy(x[None]), torch.from_numpy(y).view(-1, 1), torch.ones(n, 1),
                                   torch.tensor(wds, dtype=torch.float64), C, max_iter=500, tol=1e-12, precond_rank=8)
    assert info["precond_rank"] < d / 2  # the Nystrom path, not the exact eigendecomposition
    for g, wd in enumerate(wds):
        ref = LogisticRegression(C=1 / (2 * n * wd), tol=1e-12, max_iter=10000).fit(x, y)
        np.testing.assert_allclose(W[0, :, g].numpy(), ref.coef_.T, atol=2e-4 * np.abs(ref.coef_).max())
