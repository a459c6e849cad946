"""The demo must really show the study's pattern, end to end through train.py's pipeline,
for more than one seed of the demo pair.

This runs the default demo (the real demo pair, built into a temporary cache, for
`model.demo.seed` 0 and 1): CKA(base, tuned) is near 1 in the early layers and falls by
depth, and in the last third of the layers the tuned model's probes beat the base's by at
least 5 points of test accuracy, averaged over the tasks. A broken capture, pooling, store,
probe, CKA or demo tuning breaks one of these.
"""
import math

import numpy as np
import pandas as pd
import pytest

from test_train_e2e import compose_train
from layerprobe.pipeline import run

SEEDS = [0, 1]


@pytest.fixture(scope="module", params=SEEDS, ids=[f"demo_seed={s}" for s in SEEDS])
def demo_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"demo{request.param}")
    # The control models and other roles the demo adds do not change base or tuned; leaving them
    # out halves this test's time.
    cfg = compose_train([f"paths.cache_dir={tmp / 'cache'}", "report=false", "trainer.accelerator=cpu",
                         f"model.demo.seed={request.param}", "model.train_controls=false"])
    out = run(cfg, tmp / "run")["outputs"]
    return pd.read_csv(out["probes"]), pd.read_csv(out["similarity"]), pd.read_csv(out["tasks"])


def last_third(num_layers: int) -> list[int]:
    """Blocks in the last third of 1..L (L=8: 6, 7, 8)."""
    return list(range(num_layers - math.ceil(num_layers / 3) + 1, num_layers + 1))


def test_cka_is_near_one_early_and_falls_late(demo_run):
    _, sim, _ = demo_run
    diag = sim[(sim.layer_a == sim.layer_b) & (sim.measure == "debiased_cka") & (sim.model_a == "base") & (sim.model_b == "tuned")]
    curve = diag.groupby("layer_a").value.mean()  # mean over tasks; layer 0 is NaN (constant last token)
    L = int(curve.index.max())
    early, late = curve.loc[1:2].mean(), curve.loc[last_third(L)].mean()
    assert curve.loc[1] > 0.95 and early > 0.85, curve.round(3).to_dict()
    assert late < early - 0.3, curve.round(3).to_dict()
    assert curve.loc[1] - late >= 0.2, curve.round(3).to_dict()
    finite = curve.dropna()
    assert np.corrcoef(finite.index, finite.values)[0, 1] < -0.7  # falls with depth


def test_tuned_probes_beat_base_in_late_layers(demo_run):
    probes, _, _ = demo_run
    test = probes[(probes.split == "test") & (probes.metric == "accuracy") & probes.model.isin(["base", "tuned"])]
    acc = test.pivot_table(index=["task", "layer"], columns="model", values="value")
    L = int(acc.index.get_level_values("layer").max())
    late = acc[acc.index.get_level_values("layer").isin(last_third(L))]
    delta = (late["tuned"] - late["base"]).groupby("task").mean().mean()  # mean over tasks
    assert delta >= 0.05, late.round(3)
    # and the tuned model decodes its tasks well above chance in those layers
    chance = probes[(probes.metric == "majority_baseline")].groupby("task").value.first()
    tuned_late = late["tuned"].groupby("task").max()
    assert (tuned_late > chance.loc[tuned_late.index] + 0.15).mean() >= 0.8
