"""Control tasks tied to recurring input types (Hewitt & Liang 2019), and MDL probing
(Voita & Titov 2020) against an independent scikit-learn implementation."""
import math

import numpy as np
import pytest

from layerprobe.config import ProbeConfig
from layerprobe.probes import (content_words, control_labels, control_types, fit_probes, mdl_block_ends, mdl_order,
                               task_control_labels)
from layerprobe.tasks import finalize_task

TRAINER = {"accelerator": "cpu", "devices": 1}


def typed_task(n=900, classes=2, types=60, seed=0):
    """Prompts whose one recurring content word is their type; a unique word that never recurs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    kinds = rng.integers(0, types, n)
    rows = [(f"t:{i}", f"Is the input good?\nInput: item{kinds[i]} unique{i}\nAnswer:", int(y)) for i, y in enumerate(labels)]
    return finalize_task("typed", "synthetic", "", [f"c{k}" for k in range(classes)], rows, (0.6, 0.2, 0.2), 0), kinds


def get(rows, name, split="test", layer=0):
    return next(r["value"] for r in rows if (r["metric"], r["split"], r["layer"]) == (name, split, layer))


def test_types_are_recurring_content_words_and_labels_are_fixed_per_type():
    task, kinds = typed_task()
    texts = [ex.text for ex in task.examples]
    types = control_types(texts, seed=7)
    # the template words are in every prompt and the unique words in one: the type is the item word
    counts = np.bincount(kinds)
    assert types == [f"item{k}" if counts[k] >= 3 else "<none>" for k in kinds]  # min_count=3
    assert content_words("The salad was nice, and NICE") == {"salad", "nice"}
    assert control_types(texts, seed=7) == types  # deterministic
    labels = task_control_labels(task, ProbeConfig())
    for t in set(types):  # one label per type, whatever split its examples are in
        assert len({labels[i] for i, ty in enumerate(types) if ty == t}) == 1
    # types recur across splits: most test examples have a type seen in train
    train = {types[i] for i in task.indices("train")}
    assert np.mean([types[i] in train for i in task.indices("test")]) > 0.9
    # label-free, with the train split's class shares (up to one type's size)
    train_shares = np.bincount(task.labels()[task.indices("train")], minlength=2) / len(task.indices("train"))
    largest_type = max(types.count(t) for t in set(types)) / len(types)
    assert np.abs(np.bincount(labels, minlength=2) / len(labels) - train_shares).max() <= largest_type
    # with several words, the choice is a min-hash: the same word set always gets the same type
    words = ["alpha beta gamma", "gamma beta alpha", "beta alpha gamma delta"] * 5
    t = control_types(words, seed=3, max_share=1.0)
    assert t[0] == t[1] and t[0] in {"alpha", "beta", "gamma"}
    # prompts without a recurring content word share one type
    assert set(control_types(["aa", "bb", "cc"], seed=0)) == {"<none>"}
    # a label per type; the labels' shares follow the train labels'
    lab = control_labels([f"w{i % 50}" for i in range(1000)], np.array([0] * 700 + [1] * 300), 2, seed=0)
    assert abs((lab == 0).mean() - 0.7) <= 0.02
    assert len({(f"w{i % 50}", int(v)) for i, v in enumerate(lab)}) == 50


def planted(task, kinds, d=16, label_scale=3.0, type_scale=6.0, seed=0):
    """One layer: the label linearly (class means) plus the type's identity (a random vector per type)."""
    rng = np.random.default_rng(seed)
    y = task.labels()
    feats = rng.normal(size=(len(y), 2, d)).astype(np.float32)  # layer 0: pure noise
    feats[:, 1] += rng.normal(size=(task.num_classes, d))[y] * label_scale / np.sqrt(d) * 2
    feats[:, 1] += rng.normal(size=(kinds.max() + 1, d))[kinds] * type_scale / np.sqrt(d)
    return feats


def test_selectivity_of_linear_and_mlp_probes_as_hewitt_and_liang_found():
    task, kinds = typed_task()
    feats = {"m": planted(task, kinds)}
    control = task_control_labels(task, ProbeConfig())
    test = task.indices("test")
    control_majority = np.bincount(control[test]).max() / len(test)
    linear = fit_probes(task, feats, ProbeConfig(mdl=False), TRAINER, seed=0)
    mlp = fit_probes(task, feats, ProbeConfig(name="mlp", hidden_size=256, weight_decays=[0.0], lr=3e-3, max_epochs=150,
                                              patience=30, mdl=False), TRAINER, seed=0)
    # the label is linearly encoded: the linear probe decodes it and is selective
    assert get(linear, "accuracy", layer=1) > 0.9
    assert get(linear, "selectivity", layer=1) > 0.2
    # an MLP can memorize the 60 types' random labels (a linear probe in 16 dims cannot):
    # above-majority control accuracy on test, more memorization on train, lower selectivity
    assert get(mlp, "control_accuracy", layer=1) > control_majority + 0.1
    assert get(mlp, "control_accuracy", "train", layer=1) > get(linear, "control_accuracy", "train", layer=1) + 0.1
    assert get(mlp, "selectivity", layer=1) < get(linear, "selectivity", layer=1) - 0.1
    # pure noise: nothing to decode on either task, selectivity about 0
    for rows in (linear, mlp):
        assert abs(get(rows, "selectivity", layer=0)) < 0.12


def sklearn_online_codelength(x, y, positions, ends, wds, classes):
    """Voita & Titov's online code, written from the definition with scikit-learn probes."""
    from sklearn.linear_model import LogisticRegression

    order = np.argsort(positions)
    xs, ys = x[order], y[order]
    bits = ends[0] * math.log2(classes)
    for b in range(len(ends) - 1):
        fit_x, fit_y = xs[: ends[b]], ys[: ends[b]]
        code_x, code_y = xs[ends[b] : ends[b + 1]], ys[ends[b] : ends[b + 1]]
        options = [len(code_y) * math.log2(classes)]  # the uniform code
        for wd in wds:  # mean CE + wd ||W||^2  <=>  sklearn's C = 1 / (2 n wd)
            clf = LogisticRegression(C=1 / (2 * len(fit_y) * wd), tol=1e-10, max_iter=10000).fit(fit_x, fit_y)
            p = clf.predict_proba(code_x)[np.arange(len(code_y)), code_y]
            options.append(float(-np.log2(p).sum()))
        bits += min(options) + math.log2(len(options))
    return bits


def test_mdl_matches_an_independent_implementation_and_compresses_only_signal():
    task, _ = typed_task(n=300, classes=3, types=20, seed=1)
    rng = np.random.default_rng(0)
    y = task.labels()
    feats = rng.normal(size=(len(y), 2, 5)).astype(np.float32)
    feats[:, 1] += rng.normal(size=(3, 5))[y] * 1.5  # layer 1 encodes the label, layer 0 is noise
    fractions, wds = [0.1, 0.2, 0.4, 1.0], [1e-2, 1e-1]
    cfg = ProbeConfig(weight_decays=wds, mdl_fractions=fractions, control=False, solver_tol=1e-10, solver_max_iter=500)
    rows = fit_probes(task, {"m": feats}, cfg, TRAINER, seed=3)
    train = task.indices("train")
    n = len(train)
    ends = mdl_block_ends(n, fractions)
    assert ends == [math.ceil(f * n) for f in fractions[:-1]] + [n]
    positions = mdl_order(n, 3)
    assert sorted(positions) == list(range(n))
    assert len(set(y[train][np.argsort(positions)][: ends[0]])) == 3  # every class in the first block
    for layer in (0, 1):
        x = feats[train, layer].astype(np.float64)
        x = (x - x.mean(0)) / x.std(0)  # standardized with the train split's statistics, as the probes are
        ref = sklearn_online_codelength(x, y[train], positions, ends, wds, 3)
        assert get(rows, "mdl", "train", layer) == pytest.approx(ref, rel=2e-3)
        assert get(rows, "compression", "train", layer) == pytest.approx(n * math.log2(3) / ref, rel=2e-3)
    assert 0.9 < get(rows, "compression", "train", 0) <= 1.0  # noise: about the uniform code
    assert get(rows, "compression", "train", 1) > 2.0  # encoded: far shorter


def test_block_ends_follow_the_fractions():
    standard = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0]
    assert mdl_block_ends(10000, standard) == [10, 20, 40, 80, 160, 320, 625, 1250, 2500, 5000, 10000]
    assert mdl_block_ends(240, standard) == [1, 2, 4, 8, 15, 30, 60, 120, 240]
