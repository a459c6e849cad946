"""What train.py runs: tasks x models -> feature stores -> probes and similarity -> CSVs.

    tasks = load_tasks(...)                       # examples with fixed-seed splits
    stores = ensure_features(role, ...)          # one backbone forward per example, cached
    probes.csv     <- fit_probes(task, features)  # all layers (and models) in one fit
    similarity.csv <- similarity_rows(task, test features)   (+ similarity_diagnostics.csv)
    report/        <- layerprobe.analysis.write_report([run_dir])

Outputs are written only when every task has finished, each file atomically, so a failed
run never leaves CSVs that look complete.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from layerprobe.config import (ExtractConfig, ModelConfig, PathsConfig, ProbeConfig, TaskConfig, to_dataclass)
from layerprobe.distributed import launch
from layerprobe.features.extract import ensure_features
from layerprobe.features.store import FeatureError, atomic_write_bytes
from layerprobe.modelsets import check_placement, extract_settings_for
from layerprobe.prompting import prepare_prompts
from layerprobe.probes import fit_probes
from layerprobe.similarity import DIAGNOSTIC_KEYS, SimilarityConfig, SimilarityWarning, diagnostics_rows, similarity_rows
from layerprobe.tasks import TaskData, load_tasks

log = logging.getLogger(__name__)

PROBE_COLUMNS = ["task", "model", "layer", "split", "metric", "value", "seed", "probe"]
SIMILARITY_COLUMNS = ["task", "model_a", "model_b", "layer_a", "layer_b", "measure", "value", "ci_low", "ci_high", "null_mean",
                      "p_value", "n"]
TASK_COLUMNS = ["task", "cluster", "seen", "num_classes", "n_train", "n_val", "n_test", "source", "target"]


@dataclass
class RunSettings:
    paths: PathsConfig
    model: ModelConfig
    task: TaskConfig
    extract: ExtractConfig
    probe: ProbeConfig
    similarity: SimilarityConfig
    trainer: dict
    seed: int
    report: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RunSettings":
        return cls(
            paths=to_dataclass(PathsConfig, cfg.paths),
            model=to_dataclass(ModelConfig, cfg.model),
            task=to_dataclass(TaskConfig, cfg.task),
            extract=to_dataclass(ExtractConfig, cfg.extract),
            probe=to_dataclass(ProbeConfig, cfg.probe),
            similarity=to_dataclass(SimilarityConfig, cfg.similarity),
            trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
            seed=int(cfg.seed),
            report=bool(cfg.get("report", True)),
        )


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def resolve_checkpoints(s: RunSettings, cache_dir: Path) -> dict[str, str]:
    roles = s.model.roles()
    if s.model.build_demo and (not roles["base"] or not roles["tuned"]):
        from layerprobe.demo import build_demo_pair

        base, tuned = build_demo_pair(s.model.demo, cache_dir)
        roles["base"], roles["tuned"] = str(base), str(tuned)
    return roles


def task_rows(tasks: list[TaskData]) -> list[dict]:
    rows = []
    for t in tasks:
        sizes = t.split_sizes()
        rows.append({"task": t.name, "cluster": t.cluster, "seen": str(t.seen).lower(), "num_classes": t.num_classes,
                     "n_train": sizes["train"], "n_val": sizes["val"], "n_test": sizes["test"], "source": t.source,
                     "target": t.meta.get("target", "label")})
    return rows


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the whole pipeline for one config; returns the output paths and the rows."""
    start = time.time()
    s = RunSettings.from_config(cfg)
    run_dir = Path(run_dir)
    cache_dir = Path(s.paths.cache_dir).expanduser().resolve()
    tasks = load_tasks(s.task)
    log.info("%d task(s): %s", len(tasks), ", ".join(t.name for t in tasks))
    checkpoints = resolve_checkpoints(s, cache_dir)
    check_placement(s.model, s.trainer)
    prompts = prepare_prompts(s.model, checkpoints)  # chat template per role, checked before any backbone runs
    extract_cfg = extract_settings_for(s.model, s.extract)  # model.dtype overrides extract.dtype
    # trainer.devices > 1: Lightning starts ranks 1..N-1 here; they re-run this command into the same run dir
    ranks = launch(s.trainer)
    s.trainer = ranks.trainer_cfg  # in a local parallel sweep: the GPU leased to this job
    stores = {
        role: ensure_features(role, path, tasks, extract_cfg, s.trainer, cache_dir, s.model.revision, s.model.trust_remote_code,
                              prompt=prompts[role], device_map=s.model.device_map, ranks=ranks)
        for role, path in checkpoints.items()
    }

    from rich.progress import Progress

    probe_rows, sim_rows, diagnostic_rows = [], [], []
    notes: dict[str, list[str]] = {}
    pairs = s.model.role_pairs()
    with Progress(transient=True, disable=not ranks.is_zero) as progress:
        bar = progress.add_task("probes + similarity", total=len(tasks))
        for task in tasks:
            progress.update(bar, description=f"probes + similarity: {task.name}")
            features = {}
            for role in checkpoints:
                array, ids = stores[role][task.name].load()
                if ids != task.ids:
                    raise FeatureError(f"store {stores[role][task.name].root} holds other example ids than task '{task.name}'; delete it and rerun")
                features[role] = array
            probe_rows += fit_probes(task, features, s.probe, s.trainer, s.seed, run_dir / "probes")
            if not ranks.is_zero:  # similarity, outputs and report: once, on rank 0
                continue
            test = task.indices(s.similarity.split)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SimilarityWarning)
                # rows=test: only the compared rows are read from the memory-mapped stores
                args = (task.name, features, pairs, s.similarity)
                kwargs = {"ids": [task.ids[i] for i in test], "rows": test}
                sim_rows += similarity_rows(*args, **kwargs)
                diagnostic_rows += diagnostics_rows(*args, **kwargs)
            for w in caught:
                notes.setdefault(str(w.message), []).append(task.name)
            progress.advance(bar)
    ranks.close()
    if not ranks.is_zero:
        return {"outputs": {}, "probe_rows": probe_rows, "similarity_rows": [], "tasks": tasks}
    # One line per distinct similarity warning, naming its tasks, instead of one per task.
    for message, names in notes.items():
        log.warning("%s [tasks: %s]", message, ", ".join(dict.fromkeys(names)))

    outputs = {"probes": run_dir / "probes.csv", "similarity": run_dir / "similarity.csv", "tasks": run_dir / "tasks.csv",
               "diagnostics": run_dir / "similarity_diagnostics.csv", "config": run_dir / "config_resolved.yaml"}
    atomic_write_bytes(outputs["config"], OmegaConf.to_yaml(cfg, resolve=True).encode())
    write_csv(outputs["tasks"], task_rows(tasks), TASK_COLUMNS)
    write_csv(outputs["diagnostics"], diagnostic_rows, list(DIAGNOSTIC_KEYS))
    write_csv(outputs["similarity"], sim_rows, SIMILARITY_COLUMNS)
    write_csv(outputs["probes"], probe_rows, PROBE_COLUMNS)  # last: its presence marks a finished run
    print_summary(tasks, probe_rows, sim_rows, list(checkpoints))
    log.info("outputs in %s (%.1f s)", run_dir, time.time() - start)
    if s.report:
        outputs.update(write_run_report(run_dir))
    return {"outputs": outputs, "probe_rows": probe_rows, "similarity_rows": sim_rows, "tasks": tasks}


def write_run_report(run_dir: Path) -> dict:
    """The single run's own report, so the demo's one command ends with a picture."""
    from layerprobe.analysis import write_report

    write_report([run_dir], run_dir / "report")
    log.info("report: %s", run_dir / "report" / "report.html")
    return {"report": run_dir / "report" / "report.html"}


def print_summary(tasks: list[TaskData], probe_rows: list[dict], sim_rows: list[dict], roles: list[str]) -> None:
    """Per task: each model's best layer and accuracy, and CKA at the first, middle and last layers."""
    from rich.console import Console
    from rich.table import Table

    acc = {}
    for r in probe_rows:
        if r["split"] == "test" and r["metric"] == "accuracy":
            acc.setdefault((r["task"], r["model"]), {})[r["layer"]] = r["value"]
    measure = "debiased_cka" if any(r["measure"] == "debiased_cka" for r in sim_rows) else "linear_cka"
    cka = {}
    for r in sim_rows:
        if r["measure"] == measure and r["layer_a"] == r["layer_b"] and (r["model_a"], r["model_b"]) == ("base", "tuned"):
            cka.setdefault(r["task"], {})[r["layer_a"]] = r["value"]
    table = Table(title=f"layerprobe summary (test accuracy; {measure} base vs tuned)")
    table.add_column("task")
    table.add_column("seen")
    for role in roles:
        table.add_column(f"{role}: best layer / acc", justify="right")
    table.add_column("CKA first / mid / last", justify="right")
    for t in tasks:
        cells = [t.name, "yes" if t.seen else "no"]
        for role in roles:
            by_layer = acc.get((t.name, role), {})
            if by_layer:
                best = max(by_layer, key=lambda l: (by_layer[l], -l))
                cells.append(f"{best} / {by_layer[best]:.3f}")
            else:
                cells.append("-")
        layers = sorted(cka.get(t.name, {}))
        if layers:
            picks = [layers[0], layers[len(layers) // 2], layers[-1]]
            # NaN = a constant layer (e.g. layer 0 at the last token when every prompt ends alike)
            values = ["n/a" if np.isnan(cka[t.name][l]) else f"{cka[t.name][l]:.2f}" for l in picks]
            cells.append(" / ".join(values) + f"  (L{picks[0]}/{picks[1]}/{picks[2]})")
        else:
            cells.append("-")
        table.add_row(*cells)
    Console(width=max(120, int(os.environ.get("COLUMNS", 0) or 0))).print(table)
