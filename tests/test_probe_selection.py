"""Best layers are chosen on val and reported on test: the report's summary table and the
console summary of train.py."""
import numpy as np
import pandas as pd

from layerprobe.analysis.tables import _best
from layerprobe.tasks import finalize_task


def test_best_layer_is_chosen_on_val_and_reported_on_test():
    test = pd.DataFrame({0: [0.5, 0.6], 1: [0.9, 0.7], 2: [0.8, np.nan]}, index=pd.Index(["a", "b"], name="task"))
    val = pd.DataFrame({0: [0.5, 0.9], 1: [0.6, 0.5], 2: [0.95, 0.99]}, index=test.index)
    layer, value = _best(test, val)
    # a: val picks layer 2 (test 0.8, not the test maximum 0.9); b: layer 2 has no test value, so layer 0
    assert layer.tolist() == [2.0, 0.0] and value.tolist() == [0.8, 0.6]
    layer, value = _best(test)  # no val values at all: the shown split decides
    assert layer.tolist() == [1.0, 1.0] and value.tolist() == [0.9, 0.7]


def test_console_summary_selects_on_val(capsys):
    from layerprobe.pipeline import print_summary

    task = finalize_task("t", "c", "", ["x", "y"], [(f"t:{i}", "p", i % 2) for i in range(40)], (0.6, 0.2, 0.2), 0)
    rows = []
    for layer, (val, test) in enumerate([(0.6, 0.95), (0.9, 0.7), (0.8, 0.8)]):
        rows += [{"task": "t", "model": "base", "layer": layer, "split": "val", "metric": "accuracy", "value": val},
                 {"task": "t", "model": "base", "layer": layer, "split": "test", "metric": "accuracy", "value": test}]
    print_summary([task], rows, [], ["base"])
    out = capsys.readouterr().out
    assert "1 / 0.700" in out and "0 / 0.950" not in out
