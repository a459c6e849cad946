"""Find train.py outputs, read and merge them, and aggregate repeats across seeds.

A *result dir* is any directory holding ``probes.csv`` and/or ``similarity.csv``
(single runs and multirun job dirs alike). A *missing job* is a Hydra job dir
(``.hydra/`` present) without results, or a job a multirun sweep listed in
``multirun.yaml`` but never started. Everything is merged keyed on task, model and
layer; repeats (seeds, or the same job run twice) become mean and a Student-t CI.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from .errors import AnalysisError, NoResultsError

PROBES_FILE = "probes.csv"
SIMILARITY_FILE = "similarity.csv"
TASKS_FILE = "tasks.csv"
RESULT_FILES = (PROBES_FILE, SIMILARITY_FILE)
# Files an analysis output dir holds; a Hydra dir with one is never a missing job.
REPORT_MARKERS = ("report.html", "sections.json")

PROBE_COLUMNS = ("task", "model", "layer", "split", "metric", "value")
SIMILARITY_COLUMNS = ("task", "model_a", "model_b", "layer_a", "layer_b", "measure", "value")
PROBE_KEYS = ["task", "model", "probe", "split", "metric", "layer"]
SIMILARITY_KEYS = ["task", "model_a", "model_b", "measure", "layer_a", "layer_b"]
UNASSIGNED = "unassigned"


@dataclass
class MissingJob:
    """A job of a run or sweep that left no results."""

    path: Path
    overrides: list[str]
    reason: str

    def describe(self) -> str:
        what = " ".join(self.overrides) if self.overrides else "(no overrides)"
        return f"{self.path}: {what} — {self.reason}"


@dataclass
class RunData:
    """Everything read from the inputs, merged across result dirs (one row per repeat)."""

    probes: pd.DataFrame
    similarity: pd.DataFrame
    tasks: pd.DataFrame  # one row per task: task, cluster, seen, ...
    inputs: list[Path]
    result_dirs: list[Path]
    missing: list[MissingJob] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- discovery


def _walk(root: Path, exclude: set[Path]) -> Iterable[tuple[Path, list[str]]]:
    """Directories below ``root`` (itself included) with their file names; skips dot dirs."""
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in exclude)
        yield here, files


def _is_report_dir(path: Path, files: Sequence[str]) -> bool:
    if any(marker in files for marker in REPORT_MARKERS):
        return True
    hydra_file = path / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        try:
            return OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.name") == "analyze"
        except Exception:  # unreadable hydra.yaml: not ours to judge
            return False
    return False


def _sweep_root(path: Path, stop: Path) -> Path | None:
    """The multirun root (dir with ``multirun.yaml``) holding ``path``, up to ``stop``'s parent."""
    for candidate in [path, *path.parents]:
        if (candidate / "multirun.yaml").is_file():
            return candidate
        if candidate == stop.parent or candidate == candidate.parent:
            break
    return None


def find_latest_run(search_roots: Sequence[Path]) -> Path:
    """The newest train.py run or multirun under ``search_roots``.

    Newest = the latest modification time of a ``probes.csv``; a job dir of a multirun
    stands for its whole sweep (the dir holding ``multirun.yaml``).
    """
    best: tuple[float, Path] | None = None
    for root in search_roots:
        if not root.is_dir():
            continue
        for path, files in _walk(root, set()):
            if PROBES_FILE in files:
                mtime = (path / PROBES_FILE).stat().st_mtime
                if best is None or mtime > best[0]:
                    best = (mtime, path)
    if best is None:
        roots = ", ".join(str(r) for r in search_roots)
        raise NoResultsError(f"no train.py results ({PROBES_FILE}) under {roots}; run train.py first or pass runs=DIR")
    path = best[1]
    for root in search_roots:
        if root.is_dir() and path.resolve().is_relative_to(root.resolve()):
            return _sweep_root(path, root) or path
    return path


def _read_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path))]
    except Exception:
        return []


def _read_job_config(job: Path):
    path = job / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception:
        return None


def _planned_jobs(sweep: Path) -> list[list[str]] | None:
    """The job overrides a basic-sweeper multirun planned, in job-number order, or None.

    None too when the job dirs are not named by job number (``hydra.sweep.subdir``).
    """
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        config = OmegaConf.load(sweep / "multirun.yaml")
        sweep_dir = OmegaConf.select(config, "hydra.sweep")
        subdir = OmegaConf.to_container(sweep_dir, resolve=False).get("subdir") if sweep_dir is not None else None
        if subdir not in (None, "${hydra.job.num}"):
            return None
        task_overrides = OmegaConf.select(config, "hydra.overrides.task")
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task_overrides or []])
        axes = []
        for override in parsed:
            key = override.get_key_element()
            if override.is_sweep_override():
                axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
            else:
                axes.append([f"{key}={override.get_value_element_as_str()}"])
        return [list(combo) for combo in itertools.product(*axes)]
    except Exception:  # a custom sweeper, glob(), an unreadable file: count what exists only
        return None


def _never_started(sweep: Path) -> list[MissingJob]:
    planned = _planned_jobs(sweep)
    if planned is None:
        return []
    present = {int(p.name) for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()}
    return [
        MissingJob(sweep / str(i), overrides, "never started (planned in multirun.yaml)")
        for i, overrides in enumerate(planned)
        if i not in present
    ]


# ---------------------------------------------------------------------------- reading


def _require_columns(df: pd.DataFrame, required: Sequence[str], path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise AnalysisError(f"{path} lacks column(s) {', '.join(missing)}; expected at least {', '.join(required)}")


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame | None:
    """The table, or None when the file is empty (a job that died while writing)."""
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    except (OSError, pd.errors.ParserError) as exc:
        raise AnalysisError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    _require_columns(df, required, path)
    return df if len(df) else None


def _fill_from_config(df: pd.DataFrame, column: str, value) -> pd.DataFrame:
    if column not in df.columns:
        df[column] = value
    elif value is not None:
        df[column] = df[column].where(df[column].notna(), value)
    return df


def _read_result_dir(path: Path, run_label: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None, pd.DataFrame | None]:
    cfg = _read_job_config(path)
    seed = OmegaConf.select(cfg, "seed") if cfg is not None else None
    probe_name = OmegaConf.select(cfg, "probe.name") if cfg is not None else None
    probes = similarity = tasks = None
    if (path / PROBES_FILE).is_file():
        probes = _read_csv(path / PROBES_FILE, PROBE_COLUMNS)
        if probes is not None:
            probes = _fill_from_config(probes, "seed", seed)
            probes = _fill_from_config(probes, "probe", probe_name if probe_name is not None else "linear")
            probes["run"] = run_label
    if (path / SIMILARITY_FILE).is_file():
        similarity = _read_csv(path / SIMILARITY_FILE, SIMILARITY_COLUMNS)
        if similarity is not None:
            for column in ("ci_low", "ci_high", "null_mean"):
                similarity = _fill_from_config(similarity, column, np.nan)
            similarity = _fill_from_config(similarity, "seed", seed)
            similarity["run"] = run_label
    if (path / TASKS_FILE).is_file():
        tasks = _read_csv(path / TASKS_FILE, ("task",))
    return probes, similarity, tasks


def _parse_seen(value) -> object:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "1.0", "yes", "y", "seen"):
        return True
    if text in ("false", "0", "0.0", "no", "n", "unseen"):
        return False
    return None


def _merge_tasks(frames: list[pd.DataFrame], names: Iterable[str], warnings: list[str]) -> pd.DataFrame:
    tasks = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["task"])
    tasks["task"] = tasks["task"].astype(str)
    if "cluster" in tasks.columns:
        conflicting = tasks.dropna(subset=["cluster"]).groupby("task")["cluster"].nunique()
        for task in conflicting[conflicting > 1].index:
            warnings.append(f"tasks.csv files disagree on the cluster of task '{task}'; the first one read is used")
    tasks = tasks.drop_duplicates("task", keep="first")
    known = set(tasks["task"])
    extra = pd.DataFrame({"task": sorted(set(names) - known)})
    tasks = pd.concat([tasks, extra], ignore_index=True)
    tasks["cluster"] = tasks["cluster"].fillna(UNASSIGNED).astype(str) if "cluster" in tasks.columns else UNASSIGNED
    tasks["seen"] = tasks["seen"].map(_parse_seen) if "seen" in tasks.columns else None
    tasks["seen"] = tasks["seen"].astype(object).where(tasks["seen"].notna(), None)
    return tasks.sort_values(["cluster", "task"]).reset_index(drop=True)


def _label(path: Path, inputs: Sequence[Path]) -> str:
    for root in inputs:
        if path == root:
            return root.name or str(root)
        if path.is_relative_to(root):
            return str(Path(root.name) / path.relative_to(root))
    return str(path)


def _warn_duplicate_seeds(df: pd.DataFrame, keys: list[str], what: str, warnings: list[str]) -> None:
    """Same key and seed from two runs: averaged as repeats, but the user should know."""
    if df.empty or df["seed"].isna().all():
        return
    dup = df.dropna(subset=["seed"]).groupby(keys + ["seed"], dropna=False)["run"].nunique()
    n = int((dup > 1).sum())
    if n:
        warnings.append(f"{n} {what} rows repeat the same key and seed in different runs; they are averaged as repeats")


def load_runs(paths: Sequence[Path], exclude: Sequence[Path] = ()) -> RunData:
    """Find and merge every result below ``paths`` (run dirs, multirun roots, or any tree).

    ``exclude`` (e.g. the report's own output dir) is never read nor listed as missing.
    Raises :class:`NoResultsError` when no result file is found.
    """
    inputs = [Path(p).resolve() for p in paths]
    for p in inputs:
        if not p.is_dir():
            raise AnalysisError(f"runs: '{p}' is not a directory; pass a train.py run or multirun directory")
    excluded = {Path(p).resolve() for p in exclude}
    probe_frames, sim_frames, task_frames = [], [], []
    result_dirs: list[Path] = []
    missing: list[MissingJob] = []
    sweeps: set[Path] = set()
    seen_dirs: set[Path] = set()
    for root in inputs:
        for path, files in _walk(root, excluded):
            if path in seen_dirs or path in excluded:
                continue
            seen_dirs.add(path)
            if "multirun.yaml" in files:
                sweeps.add(path)
            has_results = any(name in files for name in RESULT_FILES)
            if has_results:
                probes, similarity, tasks = _read_result_dir(path, _label(path, inputs))
                if probes is None and similarity is None:
                    missing.append(MissingJob(path, _read_overrides(path), "result files are empty (crashed while writing?)"))
                    continue
                result_dirs.append(path)
                probe_frames += [probes] if probes is not None else []
                sim_frames += [similarity] if similarity is not None else []
                task_frames += [tasks] if tasks is not None else []
            elif (path / ".hydra").is_dir() and not _is_report_dir(path, files):
                missing.append(MissingJob(path, _read_overrides(path), "no probes.csv (crashed or still running)"))
    for sweep in sorted(sweeps):
        missing += _never_started(sweep)
    if not result_dirs:
        where = ", ".join(str(p) for p in inputs)
        note = f" ({len(missing)} job dir(s) without results: crashed or still running?)" if missing else ""
        raise NoResultsError(f"no {PROBES_FILE} or {SIMILARITY_FILE} found under {where}{note}")

    warnings: list[str] = []
    probes = pd.concat(probe_frames, ignore_index=True) if probe_frames else _empty(PROBE_KEYS + ["value", "seed", "run"])
    similarity = pd.concat(sim_frames, ignore_index=True) if sim_frames else _empty(SIMILARITY_KEYS + ["value", "ci_low", "ci_high", "null_mean", "seed", "run"])
    probes = _normalise(probes, {"task": str, "model": str, "probe": str, "split": str, "metric": str}, ["layer"])
    similarity = _normalise(similarity, {"task": str, "model_a": str, "model_b": str, "measure": str}, ["layer_a", "layer_b"])
    _warn_duplicate_seeds(probes, PROBE_KEYS, PROBES_FILE, warnings)
    _warn_duplicate_seeds(similarity, SIMILARITY_KEYS, SIMILARITY_FILE, warnings)
    names = set(probes["task"]) | set(similarity["task"])
    tasks = _merge_tasks(task_frames, names, warnings)
    return RunData(probes, similarity, tasks, inputs, sorted(result_dirs, key=_path_order), sorted(missing, key=lambda m: _path_order(m.path)), warnings)


def _path_order(path: Path) -> tuple:
    """Sort key putting job 2 before job 10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _normalise(df: pd.DataFrame, text: dict[str, type], layers: list[str]) -> pd.DataFrame:
    df = df.copy()
    for column, kind in text.items():
        df[column] = df[column].astype(kind)
    for column in layers:
        df[column] = pd.to_numeric(df[column], errors="raise").astype(int)
    for column in ("value", "ci_low", "ci_high", "null_mean"):
        if column in df.columns:
            df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    return df


# ---------------------------------------------------------------------------- aggregation


@lru_cache(maxsize=256)
def t_quantile(p: float, dof: int) -> float:
    """Quantile ``p`` (> 0.5) of Student's t with ``dof`` degrees of freedom.

    Bisection on the CDF, which is integrated numerically (Simpson) from the density;
    accurate to ~1e-9, enough for CIs, and free of a SciPy dependency.
    """
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        pdf = np.exp(log_norm - (dof + 1) / 2 * np.log1p(grid**2 / dof))
        h = grid[1] - grid[0]
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def aggregate(df: pd.DataFrame, keys: list[str], level: float) -> pd.DataFrame:
    """Mean, SD, count and Student-t CI of ``value`` over repeats sharing ``keys``.

    Rows with a NaN value are not repeats. With a single repeat the CI is left to
    the caller (NaN here).
    """
    values = df.dropna(subset=["value"])
    grouped = values.groupby(keys, sort=True)["value"]
    out = grouped.agg(mean="mean", sd="std", n="count").reset_index()
    q = out["n"].map(lambda n: t_quantile(0.5 + level / 2, int(n) - 1) if n > 1 else np.nan)
    half = q * out["sd"] / np.sqrt(out["n"])
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    return out


def aggregate_probes(probes: pd.DataFrame, level: float) -> pd.DataFrame:
    """One row per (task, model, probe, split, metric, layer): mean and CI over seeds."""
    return aggregate(probes, PROBE_KEYS, level)


# Measures whose value depends on the argument order (mirrors layerprobe.similarity.config,
# which is not imported here so the analysis does not need torch): never merged across orders.
ASYMMETRIC_MEASURES = ("pwcca",)


def canonical_pairs(similarity: pd.DataFrame) -> pd.DataFrame:
    """Orient every row of a symmetric measure so that ``model_a <= model_b`` (swapping the layers too).

    Runs may write (base, tuned) or (tuned, base); for symmetric measures both are repeats
    of one comparison and are aggregated together. Rows of an asymmetric measure (PWCCA)
    keep their order: (a, b) and (b, a) are different comparisons.
    """
    swap = (similarity["model_a"] > similarity["model_b"]) & ~similarity["measure"].isin(ASYMMETRIC_MEASURES)
    out = similarity.copy()
    for left, right in (("model_a", "model_b"), ("layer_a", "layer_b")):
        out.loc[swap, left], out.loc[swap, right] = similarity.loc[swap, right], similarity.loc[swap, left]
    return out


def aggregate_similarity(similarity: pd.DataFrame, level: float) -> pd.DataFrame:
    """One row per (task, pair, measure, layer_a, layer_b): mean over repeats.

    Pairs are oriented by :func:`canonical_pairs`. With one repeat the CI comes from the file (the pipeline's bootstrap), with more
    it is the Student-t CI over repeats.
    """
    similarity = canonical_pairs(similarity)
    out = aggregate(similarity, SIMILARITY_KEYS, level)
    if out.empty:
        return out.assign(null_mean=pd.Series(dtype=float))
    from_file = similarity.groupby(SIMILARITY_KEYS, sort=True)[["ci_low", "ci_high", "null_mean"]].mean().reset_index()
    out = out.merge(from_file, on=SIMILARITY_KEYS, how="left", suffixes=("", "_file"))
    single = out["n"] == 1
    out.loc[single, "ci_low"] = out.loc[single, "ci_low_file"]
    out.loc[single, "ci_high"] = out.loc[single, "ci_high_file"]
    return out.drop(columns=["ci_low_file", "ci_high_file"])
