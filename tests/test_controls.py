"""MOSSA control roles: a control trains on its task's train split alone, LoRA controls extracted by adapter swap
equal merged checkpoints, control rows in probes.csv / similarity.csv / the report, the cache on a second run,
and one-line errors for controls that cannot work."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import ROOT, tiny_gpt2, tiny_llama
from layerprobe.config import TaskConfig, register_configs
from layerprobe.errors import LayerprobeError
from layerprobe.models import LayerCapture, PromptEncoder, load_backbone
from layerprobe.models.load import AdapterSet
from layerprobe.pipeline import run
from layerprobe.tasks import load_tasks
from layerprobe.tuning import TuningConfig, tune
from layerprobe.tuning import controls as controls_mod
from layerprobe.tuning import run as tuning_run

register_configs()
CPU = {"accelerator": "cpu", "devices": 1}
FAST = ["tuning=default", "tuning.max_steps=6", "tuning.batch_size=8", "tuning.grad_accum=1", "tuning.lr=2e-2",
        "tuning.logger=null"]


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    return {"base": tiny_llama(root / "base", seed=0), "tuned": tiny_llama(root / "tuned", seed=1),
            "other": tiny_llama(root / "other", seed=2), "gpt2": tiny_gpt2(root / "gpt2")}


def args(models, cache, *extra, tasks="sentiment,topic"):
    return ["model.build_demo=false", f"model.base={models['base']}", f"model.tuned={models['tuned']}",
            "task=demo", f"task.tasks=[{tasks}]", "task.n_per_task=80", "probe.max_epochs=3",
            "trainer.accelerator=cpu", "report=false", "model.random_init=false", f"paths.cache_dir={cache}", *extra]


def test_a_control_trains_on_its_own_tasks_train_split_only(models, tmp_path, monkeypatch):
    tasks = load_tasks(TaskConfig(tasks=["sentiment", "topic"], n_per_task=60))
    calls = {}
    monkeypatch.setattr(controls_mod, "tune", lambda base, prompts, answers, cfg, *a, name, **k: calls.setdefault(name, (prompts, answers)) and name)
    cfg = compose_train(args(models, tmp_path, "model.train_controls=true"))
    from layerprobe.pipeline import RunSettings

    s = RunSettings.from_config(cfg)
    made = controls_mod.make_controls(s.model, s.tuning, tasks, str(models["base"]), tmp_path, CPU)
    assert set(made) == {"control:sentiment", "control:topic"}
    for t in tasks:
        prompts, answers = calls[f"control:{t.name}"]
        train = [ex for ex in t.examples if ex.split == "train"]
        assert prompts == [ex.text for ex in train]  # its task's train examples, nothing else
        assert answers == [t.label_names[ex.label] for ex in train]


def test_adapter_swap_equals_merged_checkpoints(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tasks = load_tasks(TaskConfig(tasks=["sentiment", "topic"], n_per_task=40))
    cfg = TuningConfig(lr=5e-2, max_steps=6, batch_size=8, grad_accum=1, logger=None)
    dirs = {t.name: tune(str(models["base"]), *controls_mod.task_pairs(t), cfg, tmp_path, CPU, name=t.name) for t in tasks}
    swap = AdapterSet(str(models["base"]))
    for name, d in dirs.items():
        swap.add(name, str(d))

    def features(backbone, tokenizer, prompts):
        enc = PromptEncoder(tokenizer)
        ids, attention, pool_mask = enc.pad(enc.encode(prompts))
        with LayerCapture(backbone) as capture:
            return capture(ids, attention, pool_mask)

    prompts = [ex.text for ex in tasks[0].examples[:12]]
    base_feats = features(*load_backbone(str(models["base"])), prompts)
    swapped = {name: features(*swap.activate(name), prompts) for name in dirs}
    for name, d in dirs.items():  # merged: the adapter folded into the weights, saved as a plain checkpoint
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), d).merge_and_unload()
        merged.save_pretrained(tmp_path / f"merged_{name}")
        swap.tokenizer(name).save_pretrained(tmp_path / f"merged_{name}")
        reference = features(*load_backbone(str(tmp_path / f"merged_{name}")), prompts)
        torch.testing.assert_close(swapped[name], reference, rtol=1e-4, atol=1e-5)
        assert (swapped[name][:, -1] - base_feats[:, -1]).abs().max() > 1e-3  # the adapter is active, not the base
    assert (swapped["sentiment"][:, -1] - swapped["topic"][:, -1]).abs().max() > 1e-3  # and swapping changes it


def test_trained_controls_give_control_rows_and_are_reused(models, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = compose_train(args(models, cache, "model.train_controls=true", "similarity.cross_layer=true", *FAST))
    out = run(cfg, tmp_path / "run1")["outputs"]
    sim = read_csv(out["similarity"])
    pairs = {(r["task"], r["model_a"], r["model_b"]) for r in sim}
    assert pairs == {(t, a, b) for t in ("sentiment", "topic") for a, b in
                     (("base", "tuned"), ("base", f"control:{t}"), ("tuned", f"control:{t}"))}
    layers = {(r["layer_a"], r["layer_b"]) for r in sim if r["model_b"] == "control:topic" and r["measure"] == "linear_cka"}
    assert layers == {(str(a), str(b)) for a in range(4) for b in range(4)}  # full L x L with cross_layer
    probes = read_csv(out["probes"])
    assert {(r["task"], r["model"]) for r in probes} == {(t, m) for t in ("sentiment", "topic")
                                                         for m in ("base", "tuned", f"control:{t}")}
    # control features come from base + the task's adapter: the store's fingerprint follows the adapter
    metas = [json.loads(p.read_text()) for p in (cache / "features").glob("*/manifest.json")]
    ctrl = [m for m in metas if m["role"].startswith("control:")]
    assert sorted(m["task"] for m in ctrl) == ["sentiment", "topic"]
    assert all(m["checkpoint"]["kind"] == "adapter" for m in ctrl)
    assert len({json.dumps(m["checkpoint"]["adapter"], sort_keys=True) for m in ctrl}) == 2

    import layerprobe.features.extract as extract

    monkeypatch.setattr(tuning_run, "fit", lambda *a, **k: pytest.fail("a control was trained again"))
    monkeypatch.setattr(extract, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded on a cached run"))
    monkeypatch.setattr(AdapterSet, "_load", lambda self: pytest.fail("adapters loaded on a cached run"))
    again = run(cfg, tmp_path / "run2")["outputs"]
    assert read_csv(again["similarity"]) == sim

    # the same controls given as adapter dirs (model.controls.<task>=DIR, no '+') give the same rows
    made = {t: next(m["checkpoint"]["adapter"]["path"] for m in ctrl if m["task"] == t) for t in ("sentiment", "topic")}
    given = compose_train(args(models, cache, "similarity.cross_layer=true", *[f"model.controls.{t}={d}" for t, d in made.items()]))
    assert read_csv(run(given, tmp_path / "run3")["outputs"]["similarity"]) == sim


def test_report_has_the_control_figures(models, tmp_path):
    cfg = compose_train(args(models, tmp_path / "cache", "model.train_controls=true", *FAST, tasks="sentiment,topic,mixed_review"))
    run(cfg, tmp_path / "run")
    from layerprobe.analysis import write_report

    write_report([tmp_path / "run"], tmp_path / "report")
    figures = {p.name for p in (tmp_path / "report" / "figures").iterdir()}
    assert {"control_cka_heatmaps.png", "control_cka_difference.png", "control_cka_curves.png",
            "control_cka_by_cluster_base.png", "control_cka_by_cluster_tuned.png"} <= figures, figures
    html = (tmp_path / "report" / "report.html").read_text()
    assert "control" in html.lower()
    rows = read_csv(tmp_path / "report" / "control_summary.csv")
    assert {(r["model"], r["group_by"], r["group"]) for r in rows} >= {("base", "seen", "seen"), ("tuned", "seen", "unseen")}
    sections = json.loads((tmp_path / "report" / "sections.json").read_text())
    assert sections["signal"] == "control_cka"  # with controls, sections follow the study's signal by default


def train_cli(extra, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *extra, "hydra.run.dir=out"], cwd=cwd, capture_output=True,
                          text=True, timeout=240)


def _adapter_of(base, tmp_path, name):
    tasks = load_tasks(TaskConfig(tasks=["sentiment"], n_per_task=40))
    return tune(str(base), *controls_mod.task_pairs(tasks[0]), TuningConfig(max_steps=2, batch_size=8, grad_accum=1, logger=None),
                tmp_path / name, CPU, name=name)


def test_controls_that_cannot_work_fail_in_one_line(models, tmp_path):
    cache = tmp_path / "cache"
    foreign = _adapter_of(models["other"], tmp_path, "foreign")  # a LoRA adapter of another base
    cases = [
        (["model.controls.cola=/x"], "model.controls.cola: task 'cola' is not in this run (tasks: sentiment, topic)"),
        (["model.controls.topic=/no/such/dir"], "model.controls.topic: control dir does not exist: /no/such/dir"),
        ([f"model.controls.topic={foreign}"], f"was made for another base model ({models['other']})"),
        ([f"model.controls.topic={models['gpt2']}"], f"the control {models['gpt2']} is a gpt2 model"),
    ]
    for extra, message in cases:
        with pytest.raises(LayerprobeError) as err:
            run(compose_train(args(models, cache, *extra)), tmp_path / "run")
        assert message in str(err.value) and "\n" not in str(err.value)
    # a control with the base's architecture but another tokenizer: both named
    from test_prompting import chat_tokenizer

    other_tok = tmp_path / "other_tok"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(models["base"]).save_pretrained(other_tok)
    tok = chat_tokenizer()
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other_tok)
    with pytest.raises(LayerprobeError, match=rf"the tokenizer of the control {other_tok} differs from that of the base {models['base']}"):
        run(compose_train(args(models, cache, f"model.controls.topic={other_tok}")), tmp_path / "run")
    assert not (tmp_path / "run" / "probes.csv").exists()

    # from the real command line: one line, exit 2
    proc = train_cli(args(models, cache, "model.controls.topic=/no/such/dir"), tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "model.controls.topic: control dir does not exist: /no/such/dir" in errors[0]


def test_a_task_without_answer_text_cannot_train_a_control(models):
    from dataclasses import replace

    from layerprobe.config import ModelConfig
    from layerprobe.tuning.config import TuningError

    [task] = load_tasks(TaskConfig(tasks=["sentiment"], n_per_task=40))
    no_answers = replace(task, meta={"target": "task_id"})  # e.g. a Flan task probed for its task id
    cfg = ModelConfig(base=str(models["base"]), tuned=str(models["tuned"]), train_controls=True)
    with pytest.raises(TuningError, match="task 'sentiment' has no answer text to train on"):
        controls_mod.check_trainable(cfg, [no_answers])
    controls_mod.check_trainable(cfg, [task])  # label names are the answers
    given = ModelConfig(base=str(models["base"]), tuned=str(models["tuned"]), train_controls=True, controls={"sentiment": "x/y"})
    controls_mod.check_trainable(given, [no_answers])  # a given control needs no training data


def test_controls_trained_one_task_per_job_are_reused_by_the_full_run(models, tmp_path, caplog):
    """What `python train.py -m task.tasks=[sentiment],[topic] model.train_controls=true` does, job by job, then the
    analysis run over both tasks: every control comes from the shared model cache, none is trained again."""
    import logging

    cache = tmp_path / "cache"
    for task in ("sentiment", "topic"):  # the sweep's jobs
        run(compose_train(args(models, cache, "model.train_controls=true", *FAST, tasks=task)), tmp_path / task)
    trained = sorted(p.parent.name for p in (cache / "models").glob("*/manifest.json"))
    assert len(trained) == 2
    with caplog.at_level(logging.INFO, logger="layerprobe.tuning.run"):
        run(compose_train(args(models, cache, "model.train_controls=true", *FAST)), tmp_path / "all")
    assert caplog.text.count("reused (nothing trained)") == 2 and "tuning control" not in caplog.text
    assert sorted(p.parent.name for p in (cache / "models").glob("*/manifest.json")) == trained
