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
from layerprobe.distributed import check_strategy, launch
from layerprobe.features.extract import check_trainer, ensure_features, log_cached
from layerprobe.features.store import FeatureError, atomic_write_bytes, prepare_cache_dir
from layerprobe.models.load import AdapterSet, adapter_identity, checkpoint_identity, has_tokenizer, is_adapter_dir
from layerprobe.models.roles import check_placement, control_role, control_task, extract_settings_for
from layerprobe.models.prompting import prepare_prompts
from layerprobe.probes import fit_probes
from layerprobe.similarity import DIAGNOSTIC_KEYS, SimilarityConfig, SimilarityWarning, adjust_rows, diagnostics_rows, similarity_rows
from layerprobe.tasks import TaskData, load_tasks
from layerprobe.tuning.config import TuningConfig

log = logging.getLogger(__name__)

PROBE_COLUMNS = ["task", "model", "layer", "split", "metric", "value", "seed", "probe"]
SIMILARITY_COLUMNS = ["task", "model_a", "model_b", "layer_a", "layer_b", "measure", "value", "ci_low", "ci_high", "null_mean",
                      "p_value", "p_adjusted", "n"]
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
    tuning: TuningConfig = None

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
            tuning=to_dataclass(TuningConfig, cfg.tuning) if cfg.get("tuning") is not None else TuningConfig(),
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


def tokenizer_sources(checkpoints: dict[str, str], base: str) -> dict[str, str]:
    """Where each role's tokenizer comes from: its checkpoint, or the base for an adapter saved without one."""
    return {r: (c if not is_adapter_dir(c) or has_tokenizer(c) else base) for r, c in checkpoints.items()}


def role_stores(s: "RunSettings", checkpoints: dict[str, str], tasks: list[TaskData], extract_cfg, cache_dir: Path, prompts,
                ranks) -> dict:
    """Feature stores of every role: controls on their own task only; LoRA roles as adapters swapped on one base."""
    adapters = AdapterSet(checkpoints["base"], extract_cfg.dtype, s.model.revision, s.model.trust_remote_code)
    for role, path in checkpoints.items():
        if is_adapter_dir(path):
            adapters.add(role, path)
    base_identity = checkpoint_identity(checkpoints["base"], s.model.revision) if adapters.adapters else None
    stores, cached_controls = {}, []
    for role, path in checkpoints.items():
        own = control_task(role)
        role_tasks = [t for t in tasks if own is None or t.name == own]
        extra = {"cached": cached_controls} if own is not None else {}  # one console line for all control models
        if role in adapters.adapters:
            extra.update(identity=adapter_identity(base_identity, path), backbone=adapters.provider(role))
        stores[role] = ensure_features(role, path, role_tasks, extract_cfg, s.trainer, cache_dir, s.model.revision,
                                       s.model.trust_remote_code, prompt=prompts[role], device_map=s.model.device_map,
                                       ranks=ranks, **extra)
    controls = [r for r in checkpoints if control_task(r) is not None]
    log_cached("features control:<task>", cached_controls, len(controls), "control model")
    return stores


def demo_tuning_data(s: "RunSettings", tasks: list[TaskData]):
    """The demo's controls train on its tuning corpus (seeds the probe data never uses), not on probe examples."""
    if not (s.model.build_demo and s.task.source == "demo" and s.model.train_controls):
        return None
    from layerprobe.tuning.controls import demo_control_corpus

    return lambda task: demo_control_corpus(s.model.demo, task.name)


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
    cache_dir = prepare_cache_dir(s.paths.cache_dir)  # created and writable, or one line
    check_strategy(s.trainer)  # fsdp without GPUs: our one line, not Lightning's, before anything is resolved
    check_trainer(s.trainer)  # Lightning accepts the trainer settings, before any model is built or loaded
    tasks = load_tasks(s.task)
    log.info("%d task(s): %s", len(tasks), ", ".join(t.name for t in tasks))
    checkpoints = resolve_checkpoints(s, cache_dir)
    from layerprobe.tuning.controls import check_given_controls, check_trainable, make_controls, make_tuned

    check_given_controls(s.model, tasks, checkpoints["base"])  # controls: task in the run, dir exists, same base
    check_trainable(s.model, tasks)  # every model to be trained has answer text
    checkpoints.update({control_role(t): str(c) for t, c in s.model.controls.items()})
    check_placement(s.model, s.trainer)
    given = {r: c for r, c in checkpoints.items() if c}  # tuned is made below with model.train_tuned
    prompts = prepare_prompts(s.model, tokenizer_sources(given, checkpoints["base"]))  # checked before any backbone runs
    extract_cfg = extract_settings_for(s.model, s.extract)  # model.dtype overrides extract.dtype
    # trainer.devices > 1: Lightning starts ranks 1..N-1 here; they re-run this command into the same run dir
    ranks = launch(s.trainer)
    s.trainer = ranks.trainer_cfg  # in a local parallel sweep: the GPU leased to this job
    # The tuning stage, when asked (cached by fingerprint under ${paths.cache_dir}/models/): SFT and controls.
    demo_data = demo_tuning_data(s, tasks)
    if s.model.train_tuned:
        checkpoints["tuned"] = make_tuned(s.model, s.tuning, tasks, checkpoints["base"], cache_dir, s.trainer, ranks)
    checkpoints.update(make_controls(s.model, s.tuning, tasks, checkpoints["base"], cache_dir, s.trainer, ranks,
                                     data_for=demo_data))
    if s.model.random_init:  # the random-weights baseline: built once (rank 0), cached under models/
        from layerprobe.models.random_init import ROLE as RANDOM_ROLE, ensure_random_init

        checkpoints[RANDOM_ROLE] = str(ranks.on_zero(lambda: ensure_random_init(
            checkpoints["base"], cache_dir, s.model.random_init_seed, s.model.revision, s.model.trust_remote_code)))
    made = {r: c for r, c in checkpoints.items() if r not in prompts}
    prompts.update(prepare_prompts(s.model, tokenizer_sources(made, checkpoints["base"])))
    stores = role_stores(s, checkpoints, tasks, extract_cfg, cache_dir, prompts, ranks)

    from rich.progress import Progress

    probe_rows, sim_rows, diagnostic_rows = [], [], []
    notes: dict[str, list[str]] = {}
    named = {r for pair in (s.model.pairs or []) for r in pair}
    # the random-init baseline is probed only: compared with controls (or anything) only if model.pairs names it
    experimental = [r for r in checkpoints if control_task(r) is None and (r != "random_init" or r in named)]
    with Progress(transient=True, disable=not ranks.is_zero) as progress:
        bar = progress.add_task("probes + similarity", total=len(tasks))
        for task in tasks:
            progress.update(bar, description=f"probes + similarity: {task.name}")
            features = {}
            roles = [r for r in checkpoints if control_task(r) in (None, task.name)]  # a control: its own task only
            pairs = s.model.role_pairs() + [(r, control_role(task.name)) for r in experimental
                                             if control_role(task.name) in roles]
            for role in roles:
                array, ids = stores[role][task.name].load()
                if ids != task.ids:
                    raise FeatureError(f"store {stores[role][task.name].root} holds other example ids than task '{task.name}'; delete it and rerun")
                features[role] = array
            for probe_seed in s.probe.seeds or [s.seed]:  # probe.seeds: several fits, rows keep their seed
                probe_rows += fit_probes(task, features, s.probe, s.trainer, probe_seed, run_dir / "probes")
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
    write_csv(outputs["similarity"], adjust_rows(sim_rows, s.similarity.p_adjust), SIMILARITY_COLUMNS)  # one family per pair and measure, all tasks
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

    # best layer = highest val accuracy (selection on val), reported with its test accuracy; means over seeds
    acc, val = {}, {}
    for r in probe_rows:
        if r["metric"] == "accuracy" and r["split"] in ("test", "val"):
            into = acc if r["split"] == "test" else val
            into.setdefault((r["task"], r["model"]), {}).setdefault(r["layer"], []).append(r["value"])
    acc = {k: {l: float(np.mean(v)) for l, v in by.items()} for k, by in acc.items()}
    val = {k: {l: float(np.mean(v)) for l, v in by.items()} for k, by in val.items()}
    measure = "debiased_cka" if any(r["measure"] == "debiased_cka" for r in sim_rows) else "linear_cka"
    cka = {}
    for r in sim_rows:
        if r["measure"] == measure and r["layer_a"] == r["layer_b"] and (r["model_a"], r["model_b"]) == ("base", "tuned"):
            cka.setdefault(r["task"], {})[r["layer_a"]] = r["value"]
    table = Table(title=f"layerprobe summary (best layer chosen on val, its test accuracy; {measure} base vs tuned)")
    table.add_column("task")
    table.add_column("seen")
    shown = [r for r in roles if control_task(r) is None] + (["control"] if any(control_task(r) for r in roles) else [])
    for role in shown:
        table.add_column(f"{role}: best layer / acc", justify="right")
    table.add_column("CKA first / mid / last", justify="right")
    for t in tasks:
        cells = [t.name, "yes" if t.seen else "no"]
        for role in shown:
            key = (t.name, control_role(t.name) if role == "control" else role)
            by_layer, by_val = acc.get(key, {}), val.get(key, {})
            if by_layer:
                best = max(by_layer, key=lambda l: (by_val.get(l, by_layer[l]), -l))
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
    console = Console(width=max(120, int(os.environ.get("COLUMNS", 0) or 0)))
    console.print(table)
    controls = control_summary(tasks, sim_rows, roles, measure)
    if controls is not None:
        console.print(controls)


def control_summary(tasks: list[TaskData], sim_rows: list[dict], roles: list[str], measure: str):
    """MOSSA: per task with a control, CKA(model, control_t) averaged over the early / middle / late thirds of the layers."""
    from rich.table import Table

    by = {}
    for r in sim_rows:
        task = control_task(r["model_b"])
        if r["measure"] == measure and r["layer_a"] == r["layer_b"] and task == r["task"] and not np.isnan(r["value"]):
            by.setdefault((r["task"], r["model_a"]), {})[r["layer_a"]] = r["value"]
    if not by:
        return None
    models = [m for m in roles if control_task(m) is None and any(k[1] == m for k in by)]
    table = Table(title=f"control comparison (MOSSA): {measure}(model, control of the task), mean over early / middle / late layers")
    table.add_column("task")
    table.add_column("seen")
    for m in models:
        table.add_column(f"{m} vs control", justify="right")
    if {"base", "tuned"} <= set(models):
        table.add_column("tuned - base (late)", justify="right")
    for t in tasks:
        if not any(k[0] == t.name for k in by):
            continue
        cells, late = [t.name, "yes" if t.seen else "no"], {}
        for m in models:
            curve = by.get((t.name, m), {})
            layers = [l for l in sorted(curve) if l > 0]  # layer 0 (embeddings) is the base's in a LoRA control
            if not layers:
                cells.append("-")
                continue
            thirds = np.array_split(np.array(layers), 3)
            means = [float(np.mean([curve[l] for l in part])) if len(part) else float("nan") for part in thirds]
            late[m] = means[-1]
            cells.append(" / ".join(f"{v:.2f}" for v in means))
        if {"base", "tuned"} <= set(models):
            cells.append(f"{late['tuned'] - late['base']:+.3f}" if {"base", "tuned"} <= set(late) else "-")
        table.add_row(*cells)
    return table
