"""Tasks from local files (jsonl/json/csv/parquet) or the Hugging Face hub, via `datasets`.

Both go through `datasets.load_dataset`, so a local file and a hub dataset share one
code path: columns are mapped by a prompt template (`{column}` placeholders) and a label
column; an optional task column splits one file into several tasks.
"""
from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from .base import TaskData, TaskError, finalize_task

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _load_rows(cfg) -> "datasets.Dataset":  # noqa: F821 - datasets is imported lazily (slow import)
    import datasets

    if cfg.source == "file":
        if not cfg.path:
            raise TaskError("task.source=file needs task.path=<file.jsonl|.csv|.parquet>")
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise TaskError(f"data file not found: {path}; fix task.path")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise TaskError(f"cannot read '{path.name}': use one of {sorted(FILE_BUILDERS)} (or task.source=hf)")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if cfg.source == "hf":
        if not cfg.path:
            raise TaskError("task.source=hf needs task.path=<hub dataset id or local dataset dir>")
        try:
            return datasets.load_dataset(cfg.path, cfg.data_name, split=cfg.data_split)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TaskError(f"could not load dataset '{cfg.path}' (split {cfg.data_split}): {first}") from err
    raise TaskError(f"unknown task.source '{cfg.source}'; valid: demo, file, hf")


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _check_columns(ds, needed: list[str], cfg) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise TaskError(
            f"dataset '{cfg.path}' has no column(s) {missing}; it has {ds.column_names} — "
            "fix task.template / task.label_column / task.id_column / task.task_column"
        )


def load_file_tasks(cfg, fractions, split_seed) -> list[TaskData]:
    ds = _load_rows(cfg)
    fields = [f for f in template_fields(cfg.template) if f != "instruction"]
    needed = fields + [cfg.label_column] + [c for c in (cfg.id_column, cfg.task_column) if c]
    _check_columns(ds, needed, cfg)

    label_feature = ds.features[cfg.label_column]
    class_names = getattr(label_feature, "names", None)  # datasets.ClassLabel keeps its names
    table = ds.to_dict()
    n = len(ds)
    groups: dict[str, list[int]] = {}
    for i in range(n):
        key = str(table[cfg.task_column][i]) if cfg.task_column else cfg.name
        groups.setdefault(key, []).append(i)
    wanted = cfg.tasks or sorted(groups)
    unknown = [t for t in wanted if t not in groups]
    if unknown:
        raise TaskError(f"task(s) {unknown} not in '{cfg.path}'; it holds: {', '.join(sorted(groups)[:20])}")

    tasks = []
    for name in wanted:
        rows_idx = groups[name]
        if cfg.max_examples and len(rows_idx) > cfg.max_examples:
            keep = np.random.default_rng(split_seed).choice(len(rows_idx), cfg.max_examples, replace=False)
            rows_idx = [rows_idx[j] for j in sorted(keep)]
        raw_labels = [table[cfg.label_column][i] for i in rows_idx]
        if class_names is not None:
            names = list(class_names)
            label_of = {v: v for v in range(len(names))}
        else:
            names = sorted({str(v) for v in raw_labels})
            label_of = {v: names.index(str(v)) for v in set(raw_labels)}
        rows = []
        for i, y in zip(rows_idx, raw_labels):
            values = {f: table[f][i] for f in fields}
            text = cfg.template.format(instruction=cfg.instruction, **values)
            ex_id = f"{name}:{table[cfg.id_column][i] if cfg.id_column else i}"
            rows.append((ex_id, text, label_of[y]))
        tasks.append(
            finalize_task(name, cfg.cluster, cfg.instruction, names, rows, fractions, split_seed, cfg.seen, cfg.source)
        )
    return tasks
