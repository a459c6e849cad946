"""Synthetic train.py outputs with planted sections, in the exact run-dir contract.

For tests, development and demos of the report without a backbone: ``make_run``
writes one run dir, ``make_multirun`` a sweep (one job per task and seed, optionally
with crashed jobs). Every task's signal is flat up to ``transition_start - 1``,
rises linearly through the transition and is flat from ``refinement_start`` on:
1 - CKA(base, tuned) and tuned - base accuracy follow it, so the planted boundaries
are known. Task names and clusters follow Flan 2021.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

FLAN_CLUSTERS: dict[str, list[str]] = {
    "nli": ["anli_r1", "anli_r2", "anli_r3", "cb", "mnli_matched", "mnli_mismatched", "qnli", "rte", "snli", "wnli"],
    "commonsense": ["copa", "hellaswag", "piqa", "story_cloze"],
    "sentiment": ["imdb_reviews", "sentiment140", "sst2", "yelp_polarity_reviews"],
    "paraphrase": ["glue_mrpc", "glue_qqp", "paws_wiki", "stsb"],
    "closed_book_qa": ["arc_challenge", "arc_easy", "natural_questions", "trivia_qa"],
    "struct_to_text": ["common_gen", "dart", "e2e_nlg", "web_nlg_en"],
    "translation": ["wmt14_enfr", "wmt16_translate_deen", "wmt16_translate_tren", "para_crawl_enes"],
    "reading_comp": ["bool_q", "drop", "multirc", "openbookqa", "squad_v1", "squad_v2"],
    "coreference": ["definite_pronoun_resolution", "winogrande", "wsc"],
    "misc": ["cola", "coqa", "math_dataset", "quac", "trec", "fix_punct", "true_case", "word_segment"],
    "summarization": ["ag_news_subset", "aeslc", "cnn_dailymail", "gigaword", "multi_news", "newsroom", "samsum", "xsum",
                      "opinion_abstracts_idebate", "opinion_abstracts_rotten_tomatoes", "wiki_lingua_english_en"],
    "read_comp_commonsense": ["cosmos_qa", "record"],
}
METRICS = ("accuracy", "macro_f1", "control_accuracy", "selectivity", "majority_baseline")


@dataclass
class Planted:
    """The sections built into the synthetic signal (layer numbers)."""

    num_layers: int = 8  # transformer blocks; layers are 0..num_layers
    transition_start: int = 3
    refinement_start: int = 6

    @property
    def layers(self) -> np.ndarray:
        return np.arange(self.num_layers + 1)

    def ramp(self) -> np.ndarray:
        """0 on shared layers, rising linearly through the transition, 1 from refinement on."""
        width = self.refinement_start - self.transition_start + 1
        return np.clip((self.layers - (self.transition_start - 1)) / width, 0.0, 1.0)


def task_table(n_tasks: int, n_clusters: int, seen_fraction: float = 0.6, seed: int = 0) -> pd.DataFrame:
    """``tasks.csv`` rows: Flan 2021 names, dealt round-robin over ``n_clusters`` clusters.

    A cluster whose names ran out is skipped; made-up names are used only once all
    ran out (64 tasks in 12 clusters are all real).
    """
    clusters = list(FLAN_CLUSTERS)[:n_clusters]
    pools = {c: list(FLAN_CLUSTERS[c]) for c in clusters}
    rows, extra = [], 0
    while len(rows) < n_tasks:
        open_pools = [c for c in clusters if pools[c]]
        for c in open_pools or clusters:
            if len(rows) == n_tasks:
                break
            if pools[c]:
                rows.append((pools[c].pop(0), c))
            else:
                rows.append((f"{c}_extra{extra}", c))
                extra += 1
    rng = np.random.default_rng(seed)
    seen = rng.permutation(n_tasks) < round(seen_fraction * n_tasks)
    classes = rng.choice([2, 3, 4, 6], size=n_tasks)
    return pd.DataFrame({
        "task": [r[0] for r in rows], "cluster": [r[1] for r in rows], "seen": seen,
        "num_classes": classes, "n_train": 400, "n_val": 100, "n_test": 200,
    })


def _task_seed(name: str) -> int:
    """A stable per-task seed, so a task looks the same in a single run and in a sweep job."""
    return zlib.crc32(name.encode())


def _probe_rows(tasks: pd.DataFrame, planted: Planted, seed: int, noise: float, models: Sequence[str]) -> pd.DataFrame:
    layers = planted.layers
    ramp = planted.ramp()
    rise = 1 - np.exp(-layers / max(1.0, planted.num_layers / 4))  # base decodability grows with depth
    rows = []
    for task in tasks.itertuples():
        t = _task_seed(task.task)
        rng = np.random.default_rng([seed, t])
        majority = 1.0 / task.num_classes
        peak = majority + (0.95 - majority) * (0.55 + 0.3 * np.random.default_rng(t).random())
        gain = 0.12 if task.seen else 0.05
        base = majority + (peak - majority) * rise
        curves = {"base": base, "tuned": base + gain * ramp, "sft": base + 0.6 * gain * ramp}
        for model in models:
            acc = np.clip(curves[model] + rng.normal(0, noise, len(layers)), 0, 1)
            control = np.clip(majority + 0.08 * rise + rng.normal(0, noise / 2, len(layers)), 0, 1)
            values = {"accuracy": acc, "macro_f1": np.clip(acc - 0.03, 0, 1), "control_accuracy": control,
                      "selectivity": acc - control, "majority_baseline": np.full(len(layers), majority)}
            for metric in METRICS:
                for layer in layers:
                    rows.append((task.task, model, int(layer), "test", metric, float(values[metric][layer]), seed, "linear"))
    return pd.DataFrame(rows, columns=["task", "model", "layer", "split", "metric", "value", "seed", "probe"])


def _similarity_rows(tasks: pd.DataFrame, planted: Planted, seed: int, noise: float, cross_layer: bool, controls: bool) -> pd.DataFrame:
    layers = planted.layers
    ramp = planted.ramp()
    rows = []
    for task in tasks.itertuples():
        t = _task_seed(task.task)
        rng = np.random.default_rng([seed, t, 7])
        amplitude = (0.45 if task.seen else 0.3) + 0.1 * np.random.default_rng(t).random()
        cka = np.clip(1 - amplitude * ramp + rng.normal(0, noise, len(layers)), 0, 1)
        pairs = [("base", "tuned", cka)]
        if controls:  # the per-task control drifts from the tuned model where tuned gets task-specific
            pairs.append(("tuned", f"control:{task.task}", np.clip(0.95 - 0.5 * ramp + rng.normal(0, noise, len(layers)), 0, 1)))
        for model_a, model_b, diag in pairs:
            for measure, shift in (("linear_cka", 0.0), ("debiased_cka", -0.04)):
                for la, lb in itertools.product(layers, layers):
                    if la != lb and not (cross_layer and measure == "linear_cka" and model_a == "base"):
                        continue
                    value = np.sqrt(diag[la] * diag[lb]) * np.exp(-abs(la - lb) / max(1.0, planted.num_layers / 6)) + shift
                    low, high = (value - 0.03, value + 0.03) if la == lb else (np.nan, np.nan)
                    rows.append((task.task, model_a, model_b, int(la), int(lb), measure, value, low, high, 0.12 if la == lb else np.nan))
    return pd.DataFrame(rows, columns=["task", "model_a", "model_b", "layer_a", "layer_b", "measure", "value", "ci_low", "ci_high", "null_mean"])


def _write_hydra(run_dir: Path, config: dict, overrides: list[str]) -> None:
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"name": "train"}}}), run_dir / ".hydra" / "hydra.yaml")


def make_run(
    run_dir: Path,
    tasks: pd.DataFrame | None = None,
    planted: Planted | None = None,
    seed: int = 0,
    noise: float = 0.02,
    models: Sequence[str] = ("base", "tuned"),
    cross_layer: bool = True,
    controls: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Write one complete train.py run dir; returns it."""
    run_dir = Path(run_dir)
    tasks = task_table(10, 5) if tasks is None else tasks
    planted = planted or Planted()
    run_dir.mkdir(parents=True, exist_ok=True)
    first = tasks["task"].iloc[0] if len(tasks) == 1 else "suite"
    _write_hydra(run_dir, {"seed": seed, "task": {"name": first}, "model": {"name": "synthetic"}, "probe": {"name": "linear"}}, list(overrides))
    tasks.to_csv(run_dir / "tasks.csv", index=False)
    _probe_rows(tasks, planted, seed, noise, models).to_csv(run_dir / "probes.csv", index=False)
    if "base" in models and "tuned" in models:
        _similarity_rows(tasks, planted, seed, noise, cross_layer, controls).to_csv(run_dir / "similarity.csv", index=False)
    return run_dir


def make_multirun(
    root: Path,
    tasks: pd.DataFrame | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    planted: Planted | None = None,
    crashed: Sequence[int] = (),
    never_started: int = 0,
    noise: float = 0.02,
    cross_layer: bool = False,
) -> Path:
    """A ``-m task.name=... seed=...`` sweep: job ``i`` is the i-th (task, seed) pair.

    Jobs in ``crashed`` get only ``.hydra/``; the last ``never_started`` jobs get no dir.
    """
    root = Path(root)
    tasks = task_table(6, 3) if tasks is None else tasks
    names = list(tasks["task"])
    sweep = [f"task.name={','.join(names)}", f"seed={','.join(str(s) for s in seeds)}"]
    root.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"seed": 0, "hydra": {"mode": "MULTIRUN", "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": sweep}}}), root / "multirun.yaml")
    jobs = list(itertools.product(range(len(names)), seeds))
    for i, (t, seed) in enumerate(jobs[: len(jobs) - never_started]):
        overrides = [f"task.name={names[t]}", f"seed={seed}"]
        job = root / str(i)
        if i in crashed:
            _write_hydra(job, {"seed": seed, "task": {"name": names[t]}}, overrides)
        else:
            make_run(job, tasks.iloc[[t]].reset_index(drop=True), planted, seed, noise, cross_layer=cross_layer, overrides=overrides)
    return root
