"""Tasks from local files (jsonl/json/csv/tsv/parquet) or the Hugging Face hub, via `datasets`.

Both go through `datasets.load_dataset`, so a local file and a hub dataset share one
code path: columns are mapped by a prompt template (`{column}` placeholders) and a label
column; an optional task column splits one file into several tasks.

Bad data is one TaskError line naming the file and the fix: an empty file, a line that is
not JSON (with its line number), a file the CSV reader rejects, rows without a label
(unless `task.drop_unlabeled=true`, which drops them and logs how many). Empty prompt
texts are kept and counted in the log.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import string
from pathlib import Path

import numpy as np

from .base import TaskData, TaskError, finalize_task

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# TSV (GLUE, SST-2) has no quoting: a quote character is part of the text, never a delimiter
BUILDER_OPTIONS = {".tsv": {"delimiter": "\t", "quoting": csv.QUOTE_NONE}}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _json_problem(path: Path) -> str | None:
    """Where a .json/.jsonl file stops being JSON: 'line N: why', or None if every line parses."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"byte {err.start} is not UTF-8 text"
    if path.suffix.lower() == ".json" and text.lstrip()[:1] in "[{":
        try:
            json.loads(text)
            return None  # one JSON document: whatever the reader disliked, it is not the syntax
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": JSON Lines in a .json file, checked line by line below
                return f"line {err.lineno}: {err.msg}"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}: {err.msg} (column {err.colno})"
        if not isinstance(row, dict):
            return f"line {number}: a JSON {type(row).__name__}, not an object with the columns"
    return None


def _read_file(path: Path):
    import datasets

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise TaskError(f"cannot read '{path.name}': use one of {sorted(FILE_BUILDERS)} (or task.source=hf)")
    if path.is_dir():
        raise TaskError(f"task.path={path} is a directory; point it at a data file (or use task.source=hf for a dataset dir)")
    if builder != "parquet":
        with open(path, "rb") as f:
            empty = not f.read(1 << 16).strip()
        if empty and not path.read_bytes().strip():
            raise TaskError(f"data file {path} is empty; fill it with one example per line / row, or fix task.path")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **BUILDER_OPTIONS.get(path.suffix.lower(), {}))
    except Exception as err:  # the readers (pyarrow, pandas) raise many types; each means "this file is malformed"
        cause = err.__cause__ or err.__context__ or err
        where = _json_problem(path) if builder == "json" else None
        detail = where or _first_line(cause)
        raise TaskError(f"cannot read data file {path}: {detail}; fix the file (one {builder.upper()} record per "
                        f"{'line' if builder == 'json' else 'row'})") from None


def _load_rows(cfg) -> "datasets.Dataset":  # noqa: F821 - datasets is imported lazily (slow import)
    import datasets

    if cfg.source == "file":
        if not cfg.path:
            raise TaskError("task.source=file needs task.path=<file.jsonl|.csv|.tsv|.parquet>")
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise TaskError(f"data file not found: {path}; fix task.path")
        ds = _read_file(path)
    elif cfg.source == "hf":
        if not cfg.path:
            raise TaskError("task.source=hf needs task.path=<hub dataset id or local dataset dir>")
        try:
            ds = datasets.load_dataset(cfg.path, cfg.data_name, split=cfg.data_split)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            raise TaskError(f"could not load dataset '{cfg.path}' (split {cfg.data_split}): {_first_line(err)}") from err
    else:
        raise TaskError(f"unknown task.source '{cfg.source}'; valid: demo, file, hf")
    if len(ds) == 0:
        raise TaskError(f"{_describe(cfg)} has no rows; add examples or fix task.path")
    return ds


def _describe(cfg) -> str:
    if cfg.source == "file":
        return f"data file {Path(cfg.path).expanduser()}"
    return f"dataset '{cfg.path}' (split {cfg.data_split})"


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _check_columns(ds, needed: list[str], cfg) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise TaskError(
            f"dataset '{cfg.path}' has no column(s) {missing}; it has {ds.column_names} — "
            "fix task.template / task.label_column / task.id_column / task.task_column"
        )


def _is_missing(value, class_names) -> bool:
    """No label: null, NaN (a CSV's empty cell), an empty string, or -1 for a ClassLabel (HF's "no label", e.g. GLUE test)."""
    return _is_blank(value) or (class_names is not None and value == -1)


def _label_value(value):
    """1.0 -> 1: a CSV column of integer labels with an empty cell is read as floats."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_blank(value) -> bool:
    return _is_null(value) or (isinstance(value, str) and not value.strip())


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
        unlabeled = [i for i in rows_idx if _is_missing(table[cfg.label_column][i], class_names)]
        if unlabeled:
            if not getattr(cfg, "drop_unlabeled", False):
                raise TaskError(
                    f"{_describe(cfg)}: {len(unlabeled)} of {len(rows_idx)} rows of task '{name}' have no label in column "
                    f"'{cfg.label_column}' (first: row {unlabeled[0] + 1}); fill them in, or set task.drop_unlabeled=true to drop them"
                )
            log.info("task '%s': dropped %d of %d rows without a label in column '%s' (task.drop_unlabeled=true)",
                     name, len(unlabeled), len(rows_idx), cfg.label_column)
            dropped = set(unlabeled)
            rows_idx = [i for i in rows_idx if i not in dropped]
        if cfg.max_examples and len(rows_idx) > cfg.max_examples:
            keep = np.random.default_rng(split_seed).choice(len(rows_idx), cfg.max_examples, replace=False)
            rows_idx = [rows_idx[j] for j in sorted(keep)]
        raw_labels = [_label_value(table[cfg.label_column][i]) for i in rows_idx]
        if class_names is not None:
            names = list(class_names)
            label_of = {v: v for v in range(len(names))}
        else:
            names = sorted({str(v) for v in raw_labels})
            label_of = {v: names.index(str(v)) for v in set(raw_labels)}
        rows, blank = [], 0
        for i, y in zip(rows_idx, raw_labels):
            values = {f: table[f][i] for f in fields}
            if fields and all(_is_blank(v) for v in values.values()):
                blank += 1
            values = {f: "" if _is_null(v) else v for f, v in values.items()}  # a null renders as "", not "None"
            text = cfg.template.format(instruction=cfg.instruction, **values)
            ex_id = f"{name}:{table[cfg.id_column][i] if cfg.id_column else i}"
            rows.append((ex_id, text, label_of[y]))
        if blank:
            alone = cfg.template.format(instruction=cfg.instruction, **{f: "" for f in fields}).strip()
            log.warning("task '%s': %d of %d rows have an empty %s (kept; their prompts are %s)", name, blank, len(rows),
                        " / ".join("{" + f + "}" for f in fields), "the template's own text only" if alone else "empty")
        tasks.append(
            finalize_task(name, cfg.cluster, cfg.instruction, names, rows, fractions, split_seed, cfg.seen, cfg.source,
                          warn_empty=not blank)
        )
    return tasks
