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


def train_cli(extra, cwd, env=None):
    import os

    return subprocess.run([sys.executable, str(ROOT / "train.py"), *extra, "hydra.run.dir=out"], cwd=cwd, capture_output=True,
                          text=True, timeout=240, env={**os.environ, **(env or {})})


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
    # each of these from the real command line: test_a_control_that_cannot_work_is_one_error_line_exit_2_and_no_outputs


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


# --- given controls through the real command line -------------------------------------------------------------

MAIN, V2 = "a" * 40, "b" * 40  # the commits a fake hub cache's refs/main and refs/v2 point at


def fake_hub(root: Path, base_dir: Path) -> Path:
    """A Hugging Face cache (HF_HUB_CACHE) holding the hub id lp/tiny: refs main -> MAIN (the tiny base's files),
    v2 -> V2 (another commit), same -> MAIN (a branch at main's commit)."""
    import shutil

    repo = root / "models--lp--tiny"
    (repo / "refs").mkdir(parents=True)
    for ref, sha in (("main", MAIN), ("v2", V2), ("same", MAIN)):
        (repo / "refs" / ref).write_text(sha)
    shutil.copytree(base_dir, repo / "snapshots" / MAIN)
    (repo / "snapshots" / V2).mkdir(parents=True)
    shutil.copy(base_dir / "config.json", repo / "snapshots" / V2 / "config.json")
    return root


def peft_adapter(base_dir: Path, out: Path, declared: str, revision: str | None) -> Path:
    """A LoRA adapter saved by peft itself (no layerprobe manifest) that names `declared` at `revision` as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                           revision=revision)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["revision"] == revision  # peft records the base revision it was given
    config["base_model_name_or_path"] = declared
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def bad(models, tmp_path_factory):
    """Controls that cannot work with the tiny base, each built from config objects and saved."""
    from transformers import AutoModelForCausalLM

    from test_prompting import chat_tokenizer

    root = tmp_path_factory.mktemp("bad_controls")
    other_tok = root / "other_tok"  # the base's architecture and weights, another vocabulary
    AutoModelForCausalLM.from_pretrained(models["base"]).save_pretrained(other_tok)
    tok = chat_tokenizer()
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other_tok)
    return {"foreign": _adapter_of(models["other"], root, "foreign"), "other_tok": other_tok,
            "hub": fake_hub(root / "hub", models["base"]),
            "rev_v2": peft_adapter(models["base"], root / "rev_v2", "lp/tiny", "v2"),
            "rev_same": peft_adapter(models["base"], root / "rev_same", "lp/tiny", "same"),
            "rev_main_sha": peft_adapter(models["base"], root / "rev_main_sha", "lp/tiny", MAIN),
            "rev_none": peft_adapter(models["base"], root / "rev_none", "lp/tiny", None),
            "peft_other": peft_adapter(models["other"], root / "peft_other", str(models["other"]), None),
            "hub_other": peft_adapter(models["base"], root / "hub_other", "lp/other", None),
            "broken": _broken_adapter(peft_adapter(models["base"], root / "broken", str(models["base"]), None))}


def _broken_adapter(adapter: Path) -> Path:
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", ')  # cut off mid-write
    return adapter


CLI_ERRORS = {  # control -> (what the error line names: the problem, both models, the fix)
    "not_in_run": (lambda m, b: ["model.controls.cola=/x"],
                   lambda m, b: ["model.controls.cola: task 'cola' is not in this run (tasks: sentiment, topic)",
                                 "add it to task.tasks or drop the control"]),
    "missing_dir": (lambda m, b: ["model.controls.topic=/no/such/dir"],
                    lambda m, b: ["model.controls.topic: control dir does not exist: /no/such/dir",
                                  "fix model.controls.topic=<existing checkpoint dir, hub id or LoRA adapter dir>"]),
    "broken_adapter_config": (lambda m, b: [f"model.controls.topic={b['broken']}"],
                              lambda m, b: [f"model.controls.topic: cannot read {b['broken']}/adapter_config.json (JSONDecodeError",
                                            "fix or re-create the adapter dir, or give a merged checkpoint"]),
    "foreign_adapter": (lambda m, b: [f"model.controls.topic={b['foreign']}"],
                        lambda m, b: [f"model.controls.topic: the LoRA adapter {b['foreign']} was made for another base model "
                                      f"({m['other']}), not this run's base ({m['base']})",
                                      f"train it from {m['base']} or give a merged checkpoint"]),
    "foreign_peft_adapter": (lambda m, b: [f"model.controls.topic={b['peft_other']}"],  # no manifest: adapter_config.json
                             lambda m, b: [f"model.controls.topic: the LoRA adapter {b['peft_other']} was made for another "
                                           f"base model ({m['other']}), not this run's base ({m['base']})"]),
    "architecture": (lambda m, b: [f"model.controls.topic={m['gpt2']}"],
                     lambda m, b: [f"model.controls.topic: the control {m['gpt2']} is a gpt2 model with hidden size 32 and 2 "
                                   f"layers, the base {m['base']} a llama with 32 and 3",
                                   "a control must be fine-tuned from the base"]),
    "tokenizer": (lambda m, b: [f"model.controls.topic={b['other_tok']}"],
                  lambda m, b: [f"model.controls.topic: the tokenizer of the control {b['other_tok']} differs from that of "
                                f"the base {m['base']}", "a control must keep the base's tokenizer"]),
    "adapter_revision": (lambda m, b: ["model.base=lp/tiny", f"model.controls.topic={b['rev_v2']}"],
                         lambda m, b: [f"model.controls.topic: the LoRA adapter {b['rev_v2']} was made for revision 'v2' of "
                                       f"lp/tiny, but this run loads revision 'main' (commit {MAIN}) of the base lp/tiny",
                                       "set model.revision=v2 or give an adapter trained on revision 'main'"]),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_a_control_that_cannot_work_is_one_error_line_exit_2_and_no_outputs(models, bad, tmp_path, case):
    extra, expected = CLI_ERRORS[case]
    cache = tmp_path / "cache"
    extra = extra(models, bad)
    given = {a.split("=", 1)[0] for a in extra}
    argv = [a for a in args(models, cache) if a.split("=", 1)[0] not in given] + extra  # e.g. model.base=lp/tiny
    proc = train_cli(argv, tmp_path, env={"HF_HUB_CACHE": str(bad["hub"]), "HF_HUB_OFFLINE": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    for part in expected(models, bad):
        assert part in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    out = tmp_path / "out"
    assert not (out / "probes.csv").exists() and not (out / "similarity.csv").exists()
    # nothing half-written in the cache either: no feature store and no model was started
    assert not list(cache.glob("features/*")) and not list(cache.glob("models/*"))


def test_an_adapter_of_another_revision_of_a_hub_base_is_refused(models, bad, monkeypatch):
    """adapter_config.json `revision` against model.revision (default main), both resolved to commits through the
    local cache: a branch at the loaded commit, or the commit itself, is accepted; no revision means peft's default."""
    import huggingface_hub.constants

    from layerprobe.config import ModelConfig
    from layerprobe.models.roles import ControlError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(bad["hub"]))
    tasks = load_tasks(TaskConfig(tasks=["topic"], n_per_task=40))

    def check(adapter, revision=None, base="lp/tiny"):
        cfg = ModelConfig(base=base, tuned=str(models["tuned"]), revision=revision, controls={"topic": str(bad[adapter])})
        controls_mod.check_given_controls(cfg, tasks, base)

    with pytest.raises(ControlError) as err:
        check("rev_v2")
    assert f"made for revision 'v2' of lp/tiny, but this run loads revision 'main' (commit {MAIN})" in str(err.value)
    with pytest.raises(ControlError, match=f"made for revision '{MAIN}' of lp/tiny, but this run loads revision 'v2' "
                                           f"\\(commit {V2}\\)"):
        check("rev_main_sha", revision="v2")
    with pytest.raises(ControlError, match="the LoRA adapter .* was made for another base model \\(lp/other\\), not this "
                                           "run's base \\(lp/tiny\\)"):
        check("hub_other")  # another hub id altogether
    check("rev_v2", revision="v2")  # the run loads the adapter's revision
    check("rev_same")  # branch 'same' is main's commit
    check("rev_main_sha")  # the commit main resolves to
    check("rev_none")  # an adapter that names no revision: peft's default, not checked
    check("rev_v2", base=str(models["base"]))  # a local base: revisions do not apply (a directory has one version)


def test_given_adapter_and_merged_controls_from_the_command_line(models, tmp_path):
    """python train.py model.controls.sentiment=<LoRA adapter dir> model.controls.topic=<merged checkpoint>: exit 0,
    each control's rows on its own task, and the merged checkpoint gives what its adapter gives (in-process run)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tasks = {t.name: t for t in load_tasks(TaskConfig(tasks=["sentiment", "topic"], n_per_task=80, fractions=[0.1, 0.2, 0.7]))}
    cfg = TuningConfig(lr=5e-2, max_steps=6, batch_size=8, grad_accum=1, logger=None)
    adapters = {t: tune(str(models["base"]), *controls_mod.task_pairs(tasks[t]), cfg, tmp_path / "made", CPU, name=t)
                for t in tasks}
    merged = tmp_path / "merged_topic"  # the topic adapter folded into the weights, saved as a plain checkpoint
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), adapters["topic"]).merge_and_unload() \
        .save_pretrained(merged)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(adapters["topic"]).save_pretrained(merged)

    cache = tmp_path / "cache"
    given = [f"model.controls.sentiment={adapters['sentiment']}", f"model.controls.topic={merged}", "model.train_controls=false"]
    proc = train_cli(args(models, cache, *given), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    sim, probes = read_csv(out / "similarity.csv"), read_csv(out / "probes.csv")
    control = [r for r in sim if r["model_b"].startswith("control:")]
    assert {(r["task"], r["model_a"], r["model_b"]) for r in control} == {
        (t, a, f"control:{t}") for t in ("sentiment", "topic") for a in ("base", "tuned")}
    assert {(r["task"], r["model"]) for r in probes if r["model"].startswith("control:")} == {
        ("sentiment", "control:sentiment"), ("topic", "control:topic")}
    assert not list((cache / "models").glob("*/manifest.json"))  # given controls: nothing trained
    stores = [json.loads(p.read_text()) for p in (cache / "features").glob("*/manifest.json")]
    kinds = {m["role"]: m["checkpoint"]["kind"] for m in stores if m["role"].startswith("control:")}
    assert kinds == {"control:sentiment": "adapter", "control:topic": "local"}  # swapped on the base / loaded whole

    # the same two controls both given as adapters, in-process: the merged checkpoint's rows match its adapter's
    reference = run(compose_train(args(models, tmp_path / "cache2", "model.train_controls=false",
                                       *[f"model.controls.{t}={d}" for t, d in adapters.items()])), tmp_path / "ref")
    expected = {(r["task"], r["model_a"], r["model_b"], r["layer_a"], r["measure"]): float(r["value"])
                for r in read_csv(reference["outputs"]["similarity"]) if r["model_b"].startswith("control:")}
    got = {(r["task"], r["model_a"], r["model_b"], r["layer_a"], r["measure"]): float(r["value"]) for r in control}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if np.isnan(value):
            assert np.isnan(got[key]), key
        else:
            assert abs(got[key] - value) < 1e-4, (key, got[key], value)


def test_a_control_trains_on_its_own_answers_not_on_contrast_examples():
    """A source that keeps answer text (meta["answers"], by example id) trains on it; the contrast examples of other
    tasks that a task_id target adds (meta["contrast"]) have no answer of this task and are left out."""
    from dataclasses import replace

    [task] = load_tasks(TaskConfig(tasks=["sentiment"], n_per_task=40))
    train = [ex for ex in task.examples if ex.split == "train"]
    contrast = {ex.id for ex in train[:3]}  # stand-ins for rows of other tasks
    answers = {ex.id: f"answer {i}" for i, ex in enumerate(task.examples) if ex.id not in contrast}
    kept = replace(task, meta={"target": "task_id", "answers": answers, "contrast": len(contrast)})
    prompts, got = controls_mod.task_pairs(kept)
    assert prompts == [ex.text for ex in train if ex.id not in contrast]
    assert got == [answers[ex.id] for ex in train if ex.id not in contrast]
    # more examples without an answer than contrast rows: the answers do not belong to these examples
    with pytest.raises(LayerprobeError, match="task 'sentiment' has no answer text to train on"):
        controls_mod.answers_of(replace(kept, meta={**kept.meta, "contrast": 1}))
