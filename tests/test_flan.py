"""The Flan 2021 suite: local files in the public `inputs / targets / task` layout, each task
type's probe target, caps and splits, bad input, the docs table, and an end-to-end run with a
base, an SFT and a chat-template tuned model."""
import csv
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, WORDS
from layerprobe.config import ConfigError, TaskConfig
from layerprobe.tasks import TaskError, load_tasks
from layerprobe.tasks.flan import CLUSTERS, FLAN_TASKS, OTHER, canonical_name, parse_options

GERMAN = ["Die", "Der", "Das", "Ein", "Eine", "Wir"]


def flan_rows(n=60, seed=0):
    """Rows as public Flan data spells them (FLAN-repo and Flan-Collection task names), with
    the answer's class kept aside as `_truth` for the tests."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        s = words(6)
        label = rng.choice(["negative", "positive"])
        rows.append({"inputs": f"{s}\nWhat is the sentiment of this review?\nOPTIONS:\n- negative\n- positive",
                     "targets": label, "task": "glue/sst2:2.0.0", "_truth": label})
        label = rng.choice(["yes", "it is not possible to tell", "no"])
        rows.append({"inputs": f"{s}\n\nCan we conclude that the cat sat?\nOPTIONS:\n- yes\n- it is not possible to tell\n- no",
                     "targets": label.capitalize(), "task": "rte_10templates", "_truth": label})
        a, b = words(3), words(3)
        pick = rng.randrange(2)
        rows.append({"inputs": f"{s}\nWhat was the cause?\nOPTIONS:\n- {a}\n- {b}", "targets": [a, b][pick] + ".",
                     "task": "copa_10templates", "_truth": f"option_{pick + 1}"})
        rows.append({"inputs": f"Write a headline: {s}", "targets": words(4), "task": "gigaword", "_truth": "gigaword"})
        first = GERMAN[min(int(rng.expovariate(0.6)), len(GERMAN) - 1)]
        rows.append({"inputs": f"Translate to German: {s}", "targets": f"{first} Katze ist gross.",
                     "task": "wmt16_translate/de-en:1.0.0", "_truth": first.lower()})
        rows.append({"inputs": f"{s}\nQ: what sat?", "targets": words(2), "task": "squad_v1_10templates", "_truth": None})
    rows.append({"inputs": "not in the suite", "targets": "x", "task": "lm1b", "_truth": None})
    return rows


def write_flan(path: Path, rows, fmt=None) -> Path:
    fmt = fmt or path.suffix.lstrip(".")
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in public))
    elif fmt == "json":
        path.write_text(json.dumps(public))
    else:
        pd.DataFrame(public).to_parquet(path)
    return path


def flan_cfg(path, **kw):
    base = dict(name="flan", source="flan", data_files=str(path), template="{inputs}", label_column="targets",
                task_column="task", max_examples=None)
    return TaskConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def rows():
    return flan_rows()


@pytest.fixture(scope="module")
def flan_file(tmp_path_factory, rows):
    return write_flan(tmp_path_factory.mktemp("flan") / "flan.jsonl", rows)


def truths(rows, raw_task):
    return [r["_truth"] for r in rows if r["task"] == raw_task]


def test_the_suite_has_the_studys_tasks_and_clusters():
    assert len(FLAN_TASKS) >= 62 and len(CLUSTERS) == 12
    assert {t.cluster for t in FLAN_TASKS.values()} == set(CLUSTERS)
    per_cluster = Counter(t.cluster for t in FLAN_TASKS.values())
    for cluster in ("translation", "summarization", "closed_book_qa", "nli", "sentiment", "paraphrase",
                    "commonsense", "coreference", "struct_to_text"):
        assert per_cluster[cluster] >= 3, cluster
    assert {"sst2", "rte", "gigaword", "copa", "wmt16_deen", "web_nlg", "winogrande"} <= set(FLAN_TASKS)


@pytest.mark.parametrize("raw, name", [
    ("glue/sst2:2.0.0", "sst2"), ("sst2_10templates", "sst2"), ("anli_r1_10templates_validation", "anli_r1"),
    ("wmt16_translate/de-en:1.0.0", "wmt16_deen"), ("wmt16_translate_deen", "wmt16_deen"), ("para_crawl_enes", "paracrawl_enes"),
    ("glue_mrpc", "mrpc"), ("super_glue/boolq", "boolq"), ("imdb_reviews", "imdb"), ("web_nlg_en", "web_nlg"),
    ("ag_news_subset:1.0.0", "ag_news"), ("wiki_lingua_english_en", "wiki_lingua_en"), ("bool_q", "boolq"),
])
def test_public_task_spellings_map_onto_the_suite(raw, name):
    assert canonical_name(raw) == name


def test_option_parsing():
    assert parse_options("premise\nOPTIONS:\n- yes\n- no") == ["yes", "no"]
    assert parse_options("Choose:\n(A) red cat\n(B) blue dog\nAnswer:") == ["red cat", "blue dog"]
    assert parse_options("Translate to German: the cat sat") is None


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_every_task_type_gets_its_target(tmp_path, rows, fmt):
    path = write_flan(tmp_path / f"flan.{fmt}", rows)
    tasks = {t.name: t for t in load_tasks(flan_cfg(path, answer_top_k=3))}
    # default: every suite task in the data, in suite order; non-suite tasks (lm1b) ignored
    assert list(tasks) == ["rte", "squad_v1", "copa", "sst2", "wmt16_deen", "gigaword"]

    sst2, rte, copa = tasks["sst2"], tasks["rte"], tasks["copa"]
    # classification: classes are the answer options, in the order the prompt lists them
    assert sst2.meta["target"] == "label" and sst2.label_names == ["negative", "positive"]
    assert [sst2.label_names[y] for y in sst2.labels()] == truths(rows, "glue/sst2:2.0.0")
    assert rte.label_names == ["yes", "it is not possible to tell", "no"]  # "Yes" answers normalised
    assert [rte.label_names[y] for y in rte.labels()] == truths(rows, "rte_10templates")
    # options that change per example: the class is the answer's position
    assert copa.label_names == ["option_1", "option_2"]
    assert [copa.label_names[y] for y in copa.labels()] == truths(rows, "copa_10templates")

    # generative: the first answer word over the top-k plus <other>
    wmt = tasks["wmt16_deen"]
    top3 = [w for w, _ in sorted(Counter(truths(rows, "wmt16_translate/de-en:1.0.0")).items(), key=lambda kv: (-kv[1], kv[0]))[:3]]
    assert wmt.meta["target"] == "answer_token" and wmt.label_names == top3 + [OTHER]
    assert [wmt.label_names[y] for y in wmt.labels()] == [w if w in top3 else OTHER for w in truths(rows, "wmt16_translate/de-en:1.0.0")]

    # task_id (gigaword's default): its own examples plus as many from the other suite tasks
    giga = tasks["gigaword"]
    assert {k: v for k, v in giga.meta.items() if k != "answers"} == {"target": "task_id", "kind": "generative", "contrast": 60}
    own = [ex for ex in giga.examples if ex.id.startswith("gigaword:")]
    # the Flan targets of its own examples (what a control trains on), none for contrast rows
    targets = [r["targets"] for r in rows if r["task"] == "gigaword"]
    assert giga.meta["answers"] == {ex.id: targets[int(ex.id.split(":")[1])] for ex in own}
    assert len(own) == 60 and len(giga.examples) == 120
    for ex in giga.examples:  # each example is labelled by the task its id names
        assert giga.label_names[ex.label] == ex.id.split(":")[0]
    assert set(giga.label_names) == {"gigaword", "rte", "squad_v1", "copa", "sst2", "wmt16_deen"}
    # a contrast example is the very same prompt (and id) as in its own task
    sst2_text = {ex.id: ex.text for ex in sst2.examples}
    assert all(sst2_text[ex.id] == ex.text for ex in giga.examples if ex.id.startswith("sst2:"))
    for t in tasks.values():
        assert set(t.split_sizes()) == {"train", "val", "test"} and min(t.split_sizes().values()) >= 4


def test_target_choice_cluster_id_and_overrides(flan_file):
    tasks = {t.name: t for t in load_tasks(flan_cfg(flan_file, tasks=["gigaword", "sst2", "squad_v1"], target="cluster_id",
                                                    target_overrides={"sst2": "answer_token"}))}
    giga = tasks["gigaword"]
    assert giga.meta["target"] == "cluster_id" and giga.label_names[0] == "summarization"
    assert set(giga.label_names) == {"summarization", "nli", "reading_comprehension", "commonsense", "sentiment", "translation"}
    for ex in giga.examples:
        assert giga.label_names[ex.label] == FLAN_TASKS[ex.id.split(":")[0]].cluster
    assert tasks["sst2"].meta["target"] == "answer_token" and set(tasks["sst2"].label_names) == {"negative", "positive"}
    assert tasks["squad_v1"].meta["target"] == "cluster_id"


def test_caps_are_seeded_per_task_and_per_cluster(flan_file):
    capped = {t.name: t for t in load_tasks(flan_cfg(flan_file, tasks=["sst2", "rte"], max_examples=40))}
    alone = load_tasks(flan_cfg(flan_file, tasks=["sst2"], max_examples=40))[0]
    assert capped["sst2"].examples == alone.examples  # a task's sample does not depend on the others
    assert len(alone.examples) == 40 and alone.split_sizes() == {"train": 24, "val": 8, "test": 8}
    other_seed = load_tasks(flan_cfg(flan_file, tasks=["sst2"], max_examples=40, data_seed=1))[0]
    assert other_seed.ids != alone.ids
    ids = [int(i.split(":")[1]) for i in alone.ids]
    assert ids == sorted(ids) and len(set(ids)) == 40  # order-preserving sample of distinct rows
    # one cluster cap shared by the cluster's selected tasks (wmt16_deen alone in translation)
    by_cluster = {t.name: t for t in load_tasks(flan_cfg(flan_file, tasks=["sst2", "wmt16_deen"], max_per_cluster=30))}
    assert len(by_cluster["sst2"].examples) == 30 and len(by_cluster["wmt16_deen"].examples) == 30


def test_bad_input_fails_with_one_clear_message(tmp_path, flan_file, rows):
    with pytest.raises(TaskError, match=r"not in the Flan 2021 suite: 'sst'.*did you mean sst2"):
        load_tasks(flan_cfg(flan_file, tasks=["sst", "rte"]))
    with pytest.raises(TaskError, match=r"Flan task\(s\) \['anli_r1'\] have no rows in task.data_files"):
        load_tasks(flan_cfg(flan_file, tasks=["anli_r1"]))
    renamed = write_flan(tmp_path / "renamed.jsonl", [{**r, "answer": r["targets"]} for r in rows])
    (tmp_path / "no_targets.jsonl").write_text(
        "\n".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "targets"})
                  for line in renamed.read_text().splitlines()))
    with pytest.raises(TaskError, match=r"has no column\(s\) \['targets'\]; it has \['inputs', 'task', 'answer'\]"):
        load_tasks(flan_cfg(tmp_path / "no_targets.jsonl"))
    with pytest.raises(TaskError, match=r"task 'sst2' has 8 examples, leaving \d in its test split"):
        load_tasks(flan_cfg(flan_file, tasks=["sst2"], max_examples=8))
    with pytest.raises(TaskError, match="data file not found"):
        load_tasks(flan_cfg(tmp_path / "nope.jsonl"))
    only = write_flan(tmp_path / "only.jsonl", [r for r in rows if r["task"] == "gigaword"])
    with pytest.raises(TaskError, match="target=task_id for Flan task 'gigaword' needs other suite tasks"):
        load_tasks(flan_cfg(only))
    with pytest.raises(ConfigError, match="task.target='tokens' is not valid"):
        flan_cfg(flan_file, target="tokens")


def test_docs_table_lists_every_task_with_its_default_target():
    text = (ROOT / "docs" / "tasks.md").read_text()
    table = {m.group(1): (m.group(2), m.group(3), m.group(4))
             for m in re.finditer(r"^\| `(\w+)` \| [^|]+ \| (\w+) \| (\w+) \| `(\w+)` \|", text, re.M)}
    assert set(table) == set(FLAN_TASKS)
    for name, spec in FLAN_TASKS.items():
        assert table[name] == (spec.cluster, spec.kind, spec.target), name


# ---------------------------------------------------------------- end to end

def _tiny(root: Path, seed: int, chat: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import save_tiny
    from test_prompting import chat_tokenizer

    torch.manual_seed(seed)
    tok = chat_tokenizer(padding_side="left") if chat else chat_tokenizer(template=None)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    return save_tiny(LlamaForCausalLM(cfg), tok, root)


def test_flan_end_to_end_with_three_models_and_a_chat_template(tmp_path, flan_file):
    from hydra import compose, initialize_config_dir

    from layerprobe.config import register_configs
    from layerprobe.pipeline import run

    register_configs()
    base, sft, tuned = _tiny(tmp_path / "base", 0, False), _tiny(tmp_path / "sft", 1, True), _tiny(tmp_path / "tuned", 2, True)
    overrides = ["task=flan", f"task.data_files={flan_file}", "task.tasks=[sst2,copa,gigaword,wmt16_deen]", "task.max_examples=40",
                 "model.build_demo=false", f"model.base={base}", f"model.tuned={tuned}", f"+model.others.sft={sft}",
                 "model.chat_roles=[sft,tuned]", "model.pairs=[[base,sft],[sft,tuned],[base,tuned]]",
                 "probe.max_epochs=3", "probe.weight_decays=[0.0]", "trainer.accelerator=cpu", "report=false",
                 f"paths.cache_dir={tmp_path / 'cache'}", "extract.batch_size=16"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    out = run(cfg, tmp_path / "run")["outputs"]
    read = lambda p: list(csv.DictReader(open(p)))  # noqa: E731
    tasks = {r["task"]: r for r in read(out["tasks"])}
    assert {t: r["target"] for t, r in tasks.items()} == {"sst2": "label", "copa": "label", "gigaword": "task_id",
                                                         "wmt16_deen": "answer_token"}
    assert {t: r["cluster"] for t, r in tasks.items()}["gigaword"] == "summarization"
    probes = read(out["probes"])
    assert {(r["task"], r["model"]) for r in probes} == {(t, m) for t in tasks for m in ("base", "sft", "tuned")}
    assert {r["layer"] for r in probes} == {"0", "1", "2"}
    sim = read(out["similarity"])
    assert {(r["model_a"], r["model_b"]) for r in sim} == {("base", "sft"), ("sft", "tuned"), ("base", "tuned")}


def test_cli_unknown_flan_task_is_one_line(tmp_path, flan_file):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "task=flan", f"task.data_files={flan_file}",
                           "task.tasks=[sst2,gigawrd]", f"hydra.run.dir={tmp_path / 'out'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: not in the Flan 2021 suite: 'gigawrd' (did you mean gigaword?); docs/tasks.md lists all "
                      f"{len(FLAN_TASKS)} tasks"], proc.stderr[-2000:]
