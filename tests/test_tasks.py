"""Tasks: the demo suite's promises, local files in real schemas, splits and bad input."""
import json

import pandas as pd
import pytest

from layerprobe.config import ConfigError, TaskConfig
from layerprobe.tasks import DEMO_TASKS, TaskError, load_tasks


def test_demo_suite_shape_and_promises():
    tasks = load_tasks(TaskConfig(n_per_task=120))
    assert len(tasks) >= 8 and len({t.cluster for t in tasks}) >= 4
    assert all(t.instruction and t.num_classes >= 2 for t in tasks)
    assert sum(not t.seen for t in tasks) >= 2
    by_name = {t.name: t for t in tasks}
    first, last = by_name["first_color"], by_name["last_color"]
    strip = lambda t: [ex.text.split("Input: ")[1] for ex in t.examples]  # noqa: E731
    assert strip(first) == strip(last)  # same inputs...
    assert [ex.text for ex in first.examples] != [ex.text for ex in last.examples]  # ...other instruction
    assert first.labels().tolist() != last.labels().tolist()  # so the label depends on the task


def test_demo_is_deterministic_and_ids_are_stable():
    a = load_tasks(TaskConfig(tasks=["topic"], n_per_task=60))[0]
    b = load_tasks(TaskConfig(tasks=["topic"], n_per_task=60))[0]
    assert a.examples == b.examples
    assert a.ids == [f"topic:{i}" for i in range(60)]
    c = load_tasks(TaskConfig(tasks=["topic"], n_per_task=60, data_seed=1))[0]
    assert [e.text for e in c.examples] != [e.text for e in a.examples]


def test_splits_are_stratified_fractions():
    t = load_tasks(TaskConfig(tasks=["sentiment"], n_per_task=500))[0]
    sizes = t.split_sizes()
    assert sizes["train"] == pytest.approx(300, abs=3) and sizes["test"] == pytest.approx(100, abs=3)
    for split in ("train", "val", "test"):
        assert set(t.labels()[t.indices(split)]) == {0, 1}


def test_unknown_demo_task_lists_valid_names():
    with pytest.raises(TaskError, match="unknown demo task.*valid: sentiment"):
        load_tasks(TaskConfig(tasks=["sentimnt"]))


def write_reviews(tmp_path, fmt, n=60, labels=("pos", "neg")):
    rows = [{"idx": 1000 + i, "sentence": f"review number {i}", "label": labels[i % len(labels)]} for i in range(n)]
    path = tmp_path / f"reviews.{fmt}"
    df = pd.DataFrame(rows)
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_files_with_column_mapping_and_template(tmp_path, fmt):
    path = write_reviews(tmp_path, fmt)
    cfg = TaskConfig(name="reviews", source="file", path=str(path), template="Review: {sentence}\nSentiment:",
                     label_column="label", id_column="idx")
    (task,) = load_tasks(cfg)
    assert task.label_names == ["neg", "pos"]
    assert task.examples[3].text == "Review: review number 3\nSentiment:"
    assert task.examples[3].id == "reviews:1003" and task.examples[3].label == 0  # "neg"


def test_hf_source_reads_a_local_dataset_dir_with_class_labels(tmp_path):
    """source=hf goes through datasets.load_dataset(path, name, split) like a hub id would."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {"sentence": [f"s {i}" for i in range(40)], "label": [i % 2 for i in range(40)]},
        features=datasets.Features({"sentence": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["negative", "positive"])}),
    )
    (tmp_path / "sst2").mkdir()
    ds.to_parquet(str(tmp_path / "sst2" / "train.parquet"))
    (task,) = load_tasks(TaskConfig(name="sst2", source="hf", path=str(tmp_path / "sst2"), data_split="train",
                                    template="{sentence}"))
    assert task.label_names == ["negative", "positive"]  # ClassLabel names survive
    assert task.examples[1].label == 1 and task.examples[1].text == "s 1"


def test_missing_column_names_the_columns(tmp_path):
    path = write_reviews(tmp_path, "jsonl")
    with pytest.raises(TaskError, match=r"no column\(s\) \['text'\].*has \['idx', 'sentence', 'label'\]"):
        load_tasks(TaskConfig(source="file", path=str(path), template="{text}"))


def test_one_class_and_too_few_examples_fail_clearly(tmp_path):
    with pytest.raises(TaskError, match="1 class.*at least 2"):
        load_tasks(TaskConfig(source="file", path=str(write_reviews(tmp_path, "csv", labels=("pos",))), template="{sentence}"))
    with pytest.raises(TaskError, match="test split"):
        load_tasks(TaskConfig(source="file", path=str(write_reviews(tmp_path, "jsonl", n=8)), template="{sentence}"))


def test_bad_fractions_are_a_config_error():
    with pytest.raises(ConfigError, match="task.fractions"):
        TaskConfig(fractions=[0.5, 0.5, 0.5])


def test_every_demo_task_has_a_valid_label_space():
    for spec in DEMO_TASKS.values():
        t = load_tasks(TaskConfig(tasks=[spec.name], n_per_task=100))[0]
        assert set(t.labels()) <= set(range(len(spec.labels)))
