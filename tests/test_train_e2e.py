"""train.py end to end: the Hydra compose API on a tiny demo pair, the CSV contracts,
the cache on a second run, and one-line errors from the real command line."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, tiny_llama
from layerprobe.config import register_configs
from layerprobe.pipeline import run

register_configs()

TINY = [
    "model.demo.num_layers=2", "model.demo.hidden_size=32", "model.demo.intermediate_size=64",
    "model.demo.pretrain_steps=20", "model.demo.tune_steps=20", "model.demo.examples_per_task=40",
    "task.n_per_task=60", "task.tasks=[sentiment,first_color]", "probe.max_epochs=5", "trainer.accelerator=cpu",
    "report=false", "model.train_controls=false",  # the demo's MOSSA controls: tests/test_controls.py
]


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_demo_run_writes_both_csvs_then_reuses_the_cache(tmp_path, monkeypatch, caplog):
    cfg = compose_train(TINY + [f"paths.cache_dir={tmp_path / 'cache'}"])
    out = run(cfg, tmp_path / "run1")["outputs"]

    probes = read_csv(out["probes"])
    assert {"task", "model", "layer", "split", "metric", "value", "seed"} <= set(probes[0])
    assert {r["model"] for r in probes} == {"base", "tuned", "random_init"}  # the demo's random-weights baseline
    metrics = {(r["split"], r["metric"]) for r in probes}
    assert {("train", "mdl"), ("train", "compression"), ("train", "control_accuracy")} <= metrics
    assert {r["layer"] for r in probes} == {"0", "1", "2"}
    test_metrics = {r["metric"] for r in probes if r["split"] == "test"}
    assert {"accuracy", "macro_f1", "control_accuracy", "selectivity", "majority_baseline"} <= test_metrics
    for r in probes:
        if r["metric"] in ("accuracy", "macro_f1", "control_accuracy"):
            assert 0.0 <= float(r["value"]) <= 1.0

    sim = read_csv(out["similarity"])
    assert {"task", "model_a", "model_b", "layer_a", "layer_b", "measure", "value"} <= set(sim[0])
    diag = {(r["task"], r["layer_a"], r["measure"]) for r in sim if r["layer_a"] == r["layer_b"]}
    assert diag == {(t, str(l), m) for t in ("sentiment", "first_color") for l in range(3) for m in ("linear_cka", "debiased_cka")}
    tasks = read_csv(out["tasks"])
    assert [t["task"] for t in tasks] == ["sentiment", "first_color"]

    # Second run, same settings: no model building and no backbone forward at all.
    import layerprobe.demo.models as demo_models
    import layerprobe.features.extract as extract

    monkeypatch.setattr(extract, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded on a cached run"))
    monkeypatch.setattr(demo_models, "LlamaForCausalLM", None, raising=False)
    with caplog.at_level("INFO"):
        out2 = run(cfg, tmp_path / "run2")["outputs"]
    # the console says it once per model, not once per (model, task) store
    lines = [r.getMessage() for r in caplog.records if r.name == "layerprobe.features.extract" and r.levelname == "INFO"]
    assert sorted(lines) == sorted(f"features {role}: 2 tasks cached in {tmp_path / 'cache' / 'features'}, backbone not run"
                                   for role in ("base", "tuned", "random_init")), lines
    again = {(r["task"], r["model"], r["layer"], r["metric"]): r["value"] for r in read_csv(out2["probes"])}
    first = {(r["task"], r["model"], r["layer"], r["metric"]): r["value"] for r in probes}
    assert again == first  # same seed, same features: same numbers


def test_partly_cached_role_is_one_line_plus_one_per_extracted_store(llama_dir, tmp_path, caplog):
    from layerprobe.config import ExtractConfig, TaskConfig
    from layerprobe.features.extract import ensure_features
    from layerprobe.tasks import load_tasks

    tasks = load_tasks(TaskConfig(tasks=["sentiment", "topic", "first_color"], n_per_task=40))
    trainer, cfg = {"accelerator": "cpu", "devices": 1}, ExtractConfig(shard_size=16)
    ensure_features("base", str(llama_dir), tasks[:2], cfg, trainer, tmp_path)
    with caplog.at_level("INFO", logger="layerprobe.features.extract"):
        ensure_features("base", str(llama_dir), tasks, cfg, trainer, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "layerprobe.features.extract"]
    assert lines[0] == f"features base: 2 of 3 tasks cached in {tmp_path / 'features'}, extracting the other 1"
    assert [line.split(":")[0] for line in lines[1:]] == ["extracting base/first_color"]


def test_cached_control_models_are_one_console_line(tmp_path, caplog):
    models = {name: tiny_llama(tmp_path / name, seed=i) for i, name in enumerate(["base", "tuned", "c_sentiment", "c_topic"])}
    cfg = compose_train([
        "model.build_demo=false", f"model.base={models['base']}", f"model.tuned={models['tuned']}", "model.random_init=false",
        f"model.controls.sentiment={models['c_sentiment']}", f"model.controls.topic={models['c_topic']}",
        "task=demo", "task.tasks=[sentiment,topic]", "task.n_per_task=60", "probe.max_epochs=2", "trainer.accelerator=cpu",
        "similarity.bootstrap=0", "similarity.permutations=0", "report=false", f"paths.cache_dir={tmp_path / 'cache'}"])
    run(cfg, tmp_path / "run1")
    with caplog.at_level("INFO", logger="layerprobe.features.extract"):
        run(cfg, tmp_path / "run2")
    lines = [r.getMessage() for r in caplog.records if r.name == "layerprobe.features.extract"]
    where = tmp_path / "cache" / "features"
    assert lines == [f"features base: 2 tasks cached in {where}, backbone not run",
                     f"features tuned: 2 tasks cached in {where}, backbone not run",
                     f"features control:<task>: 2 control models cached in {where}, backbone not run"], lines


def test_probe_layers_and_mlp_override(tmp_path):
    cfg = compose_train(TINY + [f"paths.cache_dir={tmp_path / 'cache'}", "probe=mlp", "probe.layers=[0,2]", "probe.max_epochs=3", "seed=3"])
    probes = read_csv(run(cfg, tmp_path / "run")["outputs"]["probes"])
    assert {r["layer"] for r in probes} == {"0", "2"}
    assert {r["probe"] for r in probes} == {"mlp"} and {r["seed"] for r in probes} == {"3"}


def train_cli(args, cwd: Path):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={cwd / 'out'}"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["model=gpt5"], "unknown model 'gpt5'; valid: demo"),
    (["task=sentimnt"], "unknown task 'sentimnt'; valid: "),
    (["model.build_demo=false", "model.base=/no/such/dir", "model.tuned=/no/such/dir"], "checkpoint path for model 'base' not found: /no/such/dir"),
    (["task.tasks=[nope]"], "unknown demo task(s) ['nope']"),
])
def test_bad_input_is_one_line_and_non_zero(tmp_path, args, message):
    proc = train_cli(args, tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out" / "probes.csv").exists()


def test_layers_out_of_range_from_the_command_line(tmp_path):
    base, tuned = tiny_llama(tmp_path / "base", seed=0), tiny_llama(tmp_path / "tuned", seed=1)
    proc = train_cli([f"model.base={base}", f"model.tuned={tuned}", "model.build_demo=false", "task=sentiment",
                      "task.n_per_task=40", "probe.layers=[7]", f"paths.cache_dir={tmp_path / 'cache'}",
                      "trainer.accelerator=cpu", "report=false"], tmp_path)
    assert proc.returncode != 0
    assert "error: probe.layers=[7] is out of range: model 'base' has layers 0..3" in proc.stderr
    assert not (tmp_path / "out" / "probes.csv").exists()


def test_all_similarity_measures_with_cis_and_full_matrices(tmp_path):
    measures = ["linear_cka", "debiased_cka", "rbf_cka", "svcca", "pwcca", "procrustes", "mutual_knn"]
    cfg = compose_train(TINY + [f"paths.cache_dir={tmp_path / 'cache'}", f"similarity.measures=[{','.join(measures)}]",
                                "similarity.cross_layer=true", "similarity.bootstrap=10", "similarity.permutations=10",
                                "task.tasks=[sentiment]", "task.n_per_task=200"])
    out = run(cfg, tmp_path / "run")["outputs"]
    sim = read_csv(out["similarity"])
    assert {r["measure"] for r in sim} == set(measures)
    linear = {(r["layer_a"], r["layer_b"]) for r in sim if r["measure"] == "linear_cka"}
    assert linear == {(str(a), str(b)) for a in range(3) for b in range(3)}  # the full layer x layer matrix
    finite = [r for r in sim if r["measure"] == "debiased_cka" and r["layer_a"] == r["layer_b"] == "2"]
    assert finite and all(r["ci_low"] != "" and r["null_mean"] != "" for r in finite)
    assert float(finite[0]["ci_low"]) <= float(finite[0]["value"]) <= float(finite[0]["ci_high"])
    diagnostics = read_csv(out["diagnostics"])
    assert {"top_dim_variance_share"} <= {r["diagnostic"] for r in diagnostics}
