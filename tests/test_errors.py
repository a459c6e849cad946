"""Bad input fails with exactly one `error: ...` line on stderr that names the problem and the
fix, exit status 2, no traceback and no outputs. Each case runs the real `python train.py ...`
from the repo root, with tiny models, a tmp cache and the run dir in tmp_path; every case
fails before a backbone runs, so each takes a few seconds (mostly imports).

The last tests: data files that are not errors (.tsv, rows without labels dropped on request,
empty prompts) and a quiet console (Lightning's banners at most once, no tips)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, WORDS

OUTPUTS = ("probes.csv", "similarity.csv", "tasks.csv", "similarity_diagnostics.csv", "config_resolved.yaml", "report")


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "COLUMNS": "120"}


def run_train(tmp_path: Path, *overrides: str, cache: Path | None = None, script: str = "train.py"):
    cache = cache or tmp_path / "cache"
    args = [sys.executable, script, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    if script == "train.py":
        args.append(f"paths.cache_dir={cache}")
    return subprocess.run(args, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)


def assert_one_error(result, tmp_path: Path, *fragments: str) -> str:
    """Exit 2, one `error:` line holding every fragment, no traceback, no outputs, no complete store."""
    console = result.stdout + result.stderr
    assert result.returncode == 2, console[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in console and "HYDRA_FULL_ERROR" not in console, console[-3000:]
    assert errors[0] not in result.stdout  # said once, not also as a log line on the console
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    run_dir = tmp_path / "run"
    assert not [name for name in OUTPUTS if (run_dir / name).exists()]
    assert not list((tmp_path / "cache").glob("features/*/manifest.json"))
    return errors[0]


def words(i: int, n: int = 4) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled(n: int = 40) -> list[dict]:
    return [{"text": words(i) + (" happy" if i % 2 else " sad"), "label": i % 2} for i in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama_dir) -> list[str]:
    from conftest import tiny_llama

    tuned = tiny_llama(tmp_path_factory.mktemp("tuned") / "model", seed=1)
    return [f"model.base={llama_dir}", f"model.tuned={tuned}", "model.build_demo=false"]


def file_task(path: Path, *extra: str) -> list[str]:
    return ["task=file", f"task.path={path}", *extra]


# --- bad data files ---------------------------------------------------------------------------


def test_empty_data_file(tmp_path, models):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    result = run_train(tmp_path, *models, *file_task(data))
    assert_one_error(result, tmp_path, str(data), "is empty", "task.path")


def test_malformed_json_line_names_the_file_and_the_line(tmp_path, models):
    data = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in labelled()]
    lines[2] = '{"text": "the cat", "label": '  # line 3 is cut short
    data.write_text("\n".join(lines) + "\n")
    result = run_train(tmp_path, *models, *file_task(data))
    assert_one_error(result, tmp_path, str(data), "line 3", "fix the file")


def test_rows_without_a_label_are_an_error(tmp_path, models):
    rows = labelled()
    for i in (3, 13, 23):
        rows[i]["label"] = None
    data = write_jsonl(tmp_path / "nulls.jsonl", rows)
    result = run_train(tmp_path, *models, *file_task(data))
    assert_one_error(result, tmp_path, str(data), "3 of 40 rows", "no label", "row 4", "task.drop_unlabeled=true")


# --- bad values and keys ----------------------------------------------------------------------


def test_command_line_checks_import_neither_torch_nor_lightning(tmp_path):
    """A typo is reported before torch and Lightning load (they take seconds): the checks before Hydra
    read only the config schemas. -X importtime lists every module the command imported."""
    for script, override, fragment in (("train.py", "probe.layer=3", "unknown key 'probe.layer'"),
                                       ("analyze.py", "sigal=cka_distance", "unknown key 'sigal'")):
        result = subprocess.run([sys.executable, "-X", "importtime", script, override], cwd=ROOT, env=_env(tmp_path),
                                capture_output=True, text=True, timeout=120)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
        assert not {m.split(".")[0] for m in imported} & {"torch", "lightning", "transformers", "matplotlib"}, script


def test_seed_that_is_not_an_integer(tmp_path, models):
    result = run_train(tmp_path, *models, "seed=abc")
    assert_one_error(result, tmp_path, "seed=abc", "integer", "seed=0")


def test_unknown_key_names_it_and_lists_the_valid_ones(tmp_path, models):
    result = run_train(tmp_path, *models, "probe.layer=3")
    line = assert_one_error(result, tmp_path, "unknown key 'probe.layer'", "probe.layers")
    from layerprobe.config import ProbeConfig
    from dataclasses import fields

    assert all(f.name in line for f in fields(ProbeConfig))  # every valid key is listed


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu(tmp_path, models):
    result = run_train(tmp_path, *models, "trainer.accelerator=gpu")
    assert_one_error(result, tmp_path, "trainer.accelerator=gpu", "trainer.accelerator=auto")


def test_cache_dir_that_cannot_be_created(tmp_path, models):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_train(tmp_path, *models, cache=blocker / "cache")
    assert_one_error(result, tmp_path, f"paths.cache_dir={blocker / 'cache'}", "writ")


# --- damaged checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "not_a_model"])
def test_damaged_weight_file_is_named(tmp_path, models, llama_dir, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    else:
        weights.write_text("<html>404 not found</html>")
    data = write_jsonl(tmp_path / "data.jsonl", labelled())
    result = run_train(tmp_path, f"model.base={broken}", *models[1:], *file_task(data))
    assert_one_error(result, tmp_path, f"weight file {weights}", "model 'base'", "model.base")


def test_analyze_unknown_key(tmp_path):
    result = run_train(tmp_path, "sigal=cka_distance", script="analyze.py")
    assert_one_error(result, tmp_path, "unknown key 'sigal'", "signal")


def test_analyze_run_dir_without_results(tmp_path):
    (tmp_path / "empty_run").mkdir()
    result = run_train(tmp_path, f"runs={tmp_path / 'empty_run'}", script="analyze.py")
    assert_one_error(result, tmp_path, "no probes.csv or similarity.csv", str(tmp_path / "empty_run"))
    assert not (tmp_path / "run" / "report.html").exists()


def test_analyze_invalid_option_value(tmp_path):
    from layerprobe.analysis.synthetic import Planted, make_run, task_table

    run = make_run(tmp_path / "results", task_table(2, 1), Planted(num_layers=4, transition_start=2, refinement_start=3))
    result = run_train(tmp_path, f"runs={run}", "signal=cka_distanse", script="analyze.py")  # a valid key, a bad value
    assert_one_error(result, tmp_path, "signal='cka_distanse'", "cka_distance")
    assert not (tmp_path / "run" / "report.html").exists()


# --- data that is not an error ------------------------------------------------------------------


def test_tsv_is_read_without_quote_handling(tmp_path):
    from layerprobe.config import TaskConfig
    from layerprobe.tasks import load_tasks

    rows = labelled()
    rows[5]["text"] = 'a "quoted word and an odd quote'
    data = tmp_path / "glue.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    task = load_tasks(TaskConfig(source="file", name="sst2", path=str(data), template="{sentence}"))[0]
    assert [ex.text for ex in task.examples] == [r["text"] for r in rows]  # quotes are text, as in GLUE's TSVs
    assert task.label_names == ["0", "1"] and [task.label_names[ex.label] for ex in task.examples] == [str(r["label"]) for r in rows]


def test_unlabeled_rows_dropped_on_request_and_counted(tmp_path, caplog):
    from layerprobe.config import TaskConfig
    from layerprobe.tasks import load_tasks

    rows = labelled()
    for i in (0, 7):
        rows[i]["label"] = None
    data = tmp_path / "nulls.tsv"  # a CSV/TSV's empty cell: the integer column becomes floats with NaN
    data.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{'' if r['label'] is None else r['label']}\n" for r in rows))
    with caplog.at_level(logging.INFO):
        task = load_tasks(TaskConfig(source="file", name="t", path=str(data), drop_unlabeled=True))[0]
    assert len(task.examples) == 38 and task.label_names == ["0", "1"]  # two classes, not "0.0", "1.0", "nan"
    assert {ex.id for ex in task.examples}.isdisjoint({"t:0", "t:7"})
    assert any("dropped 2 of 40 rows without a label" in r.getMessage() for r in caplog.records)


def test_empty_prompts_are_counted_in_the_log(tmp_path, caplog):
    from layerprobe.config import TaskConfig
    from layerprobe.tasks import load_tasks

    rows = labelled()
    rows[1]["text"], rows[2]["text"], rows[3]["text"] = "", "   ", None
    data = write_jsonl(tmp_path / "some_empty.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        task = load_tasks(TaskConfig(source="file", name="t", path=str(data)))[0]
    assert [ex.text for ex in task.examples[1:4]] == ["", "   ", ""]  # kept; a null is empty, not "None"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 40 rows have an empty {text}" in warnings[0]


def test_console_is_quiet_and_tsv_runs_end_to_end(tmp_path, models):
    rows = labelled(60)
    data = tmp_path / "reviews.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    result = run_train(tmp_path, *models, *file_task(data), "probe.max_epochs=2", "similarity.bootstrap=0",
                       "similarity.permutations=0", "report=false")
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    tasks_csv = (tmp_path / "run" / "tasks.csv").read_text().splitlines()
    assert tasks_csv[1].split(",")[3] == "2"  # num_classes
    # Lightning's device banner at most once for the whole run (three Trainers), its tips never
    assert console.count("GPU available:") <= 1 and console.count("TPU available:") <= 1, console
    assert "Tip:" not in console and "litlogger" not in console
    assert "layerprobe summary" in console
