"""The demo must really show the study's pattern, end to end through train.py's pipeline.

This runs the default demo (the real demo pair, built once into a temporary cache):
CKA(base, tuned) is near 1 in the early layers and falls in the later layers, and the
tuned model's probes reach at least the base's accuracy in the later layers. A broken
capture, pooling, store, probe or CKA breaks one of these.
"""
import numpy as np
import pandas as pd
import pytest

from test_train_e2e import compose_train
from layerprobe.pipeline import run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg = compose_train([f"paths.cache_dir={tmp / 'cache'}", "report=false", "trainer.accelerator=cpu"])
    out = run(cfg, tmp / "run")["outputs"]
    return pd.read_csv(out["probes"]), pd.read_csv(out["similarity"]), pd.read_csv(out["tasks"])


def test_cka_is_near_one_early_and_falls_late(demo_run):
    _, sim, _ = demo_run
    diag = sim[(sim.layer_a == sim.layer_b) & (sim.measure == "debiased_cka") & (sim.model_a == "base") & (sim.model_b == "tuned")]
    curve = diag.groupby("layer_a").value.mean()  # mean over tasks; layer 0 is NaN (constant last token)
    L = int(curve.index.max())
    early, late = curve.loc[1:2].mean(), curve.loc[L - 2 : L].mean()
    assert curve.loc[1] > 0.95 and early > 0.85, curve.round(3).to_dict()
    assert late < early - 0.3, curve.round(3).to_dict()
    finite = curve.dropna()
    assert np.corrcoef(finite.index, finite.values)[0, 1] < -0.7  # falls with depth


def test_tuned_probes_match_or_beat_base_in_late_layers(demo_run):
    probes, _, _ = demo_run
    acc = probes[(probes.split == "test") & (probes.metric == "accuracy")].pivot_table(index=["task", "layer"], columns="model", values="value")
    L = int(acc.index.get_level_values("layer").max())
    late = acc[acc.index.get_level_values("layer") >= L - 2]
    delta = (late["tuned"] - late["base"]).mean()
    assert delta >= 0.0, late.round(3)
    # and the tuned model decodes its tasks well above chance in those layers
    chance = probes[(probes.metric == "majority_baseline")].groupby("task").value.first()
    tuned_late = late["tuned"].groupby("task").max()
    assert (tuned_late > chance.loc[tuned_late.index] + 0.15).mean() >= 0.8
