"""Examples, tasks and fixed-seed splits: the first stage of the data flow.

A task is a list of examples that all carry the same probe target space. Example ids
are `<task>:<source index>` and never depend on the model or the run, so every model
is compared on exactly the same rows.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from layerprobe.errors import LayerprobeError

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


class TaskError(LayerprobeError):
    """Bad task configuration or data; the message names the problem and the fix."""


@dataclass(frozen=True)
class Example:
    id: str
    text: str  # the rendered prompt the backbone reads
    label: int  # index into TaskData.label_names
    split: str  # train | val | test


@dataclass
class TaskData:
    name: str
    cluster: str
    instruction: str
    label_names: list[str]
    examples: list[Example]
    seen: bool = True  # was the task in the tuned model's instruction-tuning mix?
    source: str = "demo"
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def indices(self, split: str) -> np.ndarray:
        """Row indices (into `examples`, and so into the feature store) of one split."""
        return np.array([i for i, ex in enumerate(self.examples) if ex.split == split], dtype=np.int64)

    def labels(self) -> np.ndarray:
        return np.array([ex.label for ex in self.examples], dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        return [ex.id for ex in self.examples]

    def content_hash(self) -> str:
        """Hash of what the backbone reads (ids and prompts); labels are not part of it,
        so relabelling a task reuses its cached features."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(ex.id.encode())
            h.update(b"\x00")
            h.update(ex.text.encode())
            h.update(b"\x01")
        return h.hexdigest()

    def split_sizes(self) -> dict[str, int]:
        counts = Counter(ex.split for ex in self.examples)
        return {s: counts.get(s, 0) for s in SPLITS}


def assign_splits(labels: list[int], fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Stratified, fixed-seed train/val/test assignment.

    Stratifying keeps every class in every split even for small tasks; the seeded
    permutation within each class makes the assignment identical across runs and models.
    """
    rng = np.random.default_rng(seed)
    out = [""] * len(labels)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    f_train, f_val, _ = fractions
    for y in sorted(by_class):
        idx = np.array(by_class[y])[rng.permutation(len(by_class[y]))]
        n = len(idx)
        n_train = int(round(n * f_train))
        n_val = int(round(n * f_val))
        for j, i in enumerate(idx):
            out[i] = "train" if j < n_train else ("val" if j < n_train + n_val else "test")
    return out


def finalize_task(
    name: str,
    cluster: str,
    instruction: str,
    label_names: list[str],
    rows: list[tuple[str, str, int]],
    fractions: tuple[float, float, float],
    seed: int,
    seen: bool = True,
    source: str = "demo",
    min_per_split: tuple[int, int, int] = (4, 2, 4),
    meta: dict | None = None,
    warn_empty: bool = True,
) -> TaskData:
    """Check a task has a real target and enough rows, then split it.

    rows: (id, rendered prompt, label index). Fails with a one-line TaskError naming the
    task and the fix when the task has fewer than two classes or too few examples. Empty
    prompts are kept (the backbone reads just its special tokens) and counted in the log
    (warn_empty=False: the caller has counted them already).
    """
    empty = sum(1 for _, text, _ in rows if not text.strip())
    if empty and warn_empty:
        log.warning("task '%s': %d of %d prompts are empty (kept; check the data or task.template)", name, empty, len(rows))
    present = sorted({y for _, _, y in rows})
    if len(present) < 2:
        raise TaskError(
            f"task '{name}' has {len(present)} class(es) in its data; a probe needs at least 2 — "
            "check the label column or the data file"
        )
    splits = assign_splits([y for _, _, y in rows], fractions, seed)
    examples = [Example(id=i, text=t, label=y, split=s) for (i, t, y), s in zip(rows, splits)]
    task = TaskData(name, cluster, instruction, list(label_names), examples, seen, source, meta or {})
    sizes = task.split_sizes()
    for split, need in zip(SPLITS, min_per_split):
        if sizes[split] < need:
            raise TaskError(
                f"task '{name}' has {len(rows)} examples, leaving {sizes[split]} in its {split} split "
                f"(need >= {need}); add examples or raise the cap (e.g. task.max_examples)"
            )
    return task
