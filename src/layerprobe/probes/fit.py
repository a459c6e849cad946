"""Train and evaluate the probes of one task for every model, and describe them as rows."""
from __future__ import annotations

import json
import logging
import math
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np

from layerprobe.errors import LayerprobeError

from layerprobe.features.extract import make_trainer
from layerprobe.probes.controls import control_labels, control_types, mdl_block_ends, online_codelength
from layerprobe.probes.heads import StackedHeads
from layerprobe.probes.module import CachedFeatureData, ProbeModule
from layerprobe.tasks import SPLITS, TaskData


log = logging.getLogger(__name__)


class ProbeError(LayerprobeError):
    """Bad probe settings (e.g. layers out of range); the message says how to fix it."""


@contextmanager
def quiet_lightning():
    """Probe fits are many and short: keep Lightning's per-Trainer banners out of the console."""
    names = ["lightning.pytorch", "lightning.fabric", "pytorch_lightning"]
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, lvl in zip(names, levels):
            logging.getLogger(n).setLevel(lvl)


def resolve_layers(requested: list[int] | None, num_layers: int, role: str) -> list[int]:
    if requested is None:
        return list(range(num_layers))
    bad = [l for l in requested if not 0 <= l < num_layers]
    if bad:
        raise ProbeError(
            f"probe.layers={list(requested)} is out of range: model '{role}' has layers 0..{num_layers - 1} "
            f"(0 = embeddings); pick layers in that range"
        )
    return sorted(set(requested))


def majority_baseline(labels: np.ndarray, split_idx: dict[str, np.ndarray]) -> float:
    majority = np.bincount(labels[split_idx["train"]]).argmax()
    return float((labels[split_idx["test"]] == majority).mean())


def task_control_labels(task: TaskData, cfg) -> np.ndarray:
    """The control task of `task` (layerprobe.probes.controls): one random label per input type."""
    types = control_types([ex.text for ex in task.examples], cfg.control_seed, cfg.control_min_count, cfg.control_max_share)
    return control_labels(types, task.labels()[task.indices("train")], task.num_classes, cfg.control_seed)


def mdl_order(n_train: int, seed: int) -> np.ndarray:
    """positions[i] = where train row i comes in the online code's (seeded) order."""
    order = np.random.default_rng([seed, 0x4D444C]).permutation(n_train)
    positions = np.empty(n_train, dtype=np.int64)
    positions[order] = np.arange(n_train)
    return positions


def fit_probes(task: TaskData, features: dict[str, np.ndarray], cfg, trainer_cfg: dict, seed: int,
               save_dir: Path | None = None) -> list[dict]:
    """Probe every (model, layer) of one task; returns probes.csv rows.

    Models whose features have the same width are trained in ONE fit, their layers side by
    side, since they share examples and labels. Linear probes: one full-batch solve of every
    (layer, head) problem; under DDP each rank holds every world-th train row and the
    solver all-reduces its sums. MLP probes: under DDP (`use_distributed_sampler=False`)
    each rank trains on its slice of every one-device batch, with the loss rescaled so the
    averaged gradient is the one-device gradient (layerprobe.distributed). Every rank
    evaluates the whole (small) val, test and train sets, so metrics match one device.
    """
    labels = task.labels()
    variants = [labels, task_control_labels(task, cfg)] if cfg.control else [labels]
    targets = np.stack(variants, axis=1)
    split_idx = {s: task.indices(s) for s in SPLITS}
    baseline = majority_baseline(labels, split_idx)
    n_train = len(split_idx["train"])
    ends = mdl_block_ends(n_train, list(cfg.mdl_fractions)) if cfg.mdl else []
    positions = mdl_order(n_train, seed)

    groups: dict[int, list[str]] = defaultdict(list)
    for role, feats in features.items():
        groups[feats.shape[2]].append(role)
    rows = []
    for dim, roles in groups.items():
        layer_lists = {r: resolve_layers(cfg.layers, features[r].shape[1], r) for r in roles}
        parts = [np.asarray(features[r]) if layer_lists[r] == list(range(features[r].shape[1])) else
                 np.asarray(features[r][:, layer_lists[r]]) for r in roles]
        stacked = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)  # one model, every layer: no copy
        del parts
        L.seed_everything(seed, workers=True, verbose=False)
        data = CachedFeatureData(stacked, targets, split_idx, cfg.batch_size, positions, full_batch=cfg.name == "linear")
        del stacked
        try:  # a failed fit (in a notebook, or a sweep in one process) must not keep the features alive
            module = ProbeModule(data.mean.shape[0], dim, task.num_classes, len(variants), list(cfg.weight_decays),
                                 kind=cfg.name, hidden=cfg.hidden_size, lr=cfg.lr, patience=cfg.patience,
                                 mean=data.mean, std=data.std, mdl_prefixes=ends[:-1],
                                 solver_max_iter=cfg.solver_max_iter, solver_tol=cfg.solver_tol)
            with quiet_lightning(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*configure_optimizers.*")
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                trainer = make_trainer(trainer_cfg, [], progress=False, max_epochs=1 if module.full_batch else cfg.max_epochs,
                                       num_sanity_val_steps=0, log_every_n_steps=1)
                trainer.fit(module, datamodule=data)
                trainer.test(module, datamodule=data, verbose=False)
            if module.solver_info.get("unconverged"):
                log.info("probes %s: %d (layer, head) fits stopped at probe.solver_max_iter=%d before reaching "
                         "probe.solver_tol", task.name, module.solver_info["unconverged"], cfg.solver_max_iter)
            res = module.results
            train = module.train_statistics(data, ends)
        finally:
            data.release()
        if ends:
            mdl = online_codelength(ends, task.num_classes, train["block_bits"].numpy())
            uniform = n_train * math.log2(task.num_classes)
        offset = 0
        for role in roles:
            for j, layer in enumerate(layer_lists[role]):
                i = offset + j
                acc = float(res["accuracy"][i, 0])
                metrics = {"accuracy": acc, "macro_f1": float(res["macro_f1"][i, 0]), "majority_baseline": baseline}
                if cfg.control:
                    metrics["control_accuracy"] = float(res["accuracy"][i, 1])
                    metrics["selectivity"] = acc - metrics["control_accuracy"]
                rows += [_row(task, role, layer, "test", m, v, seed, cfg.name) for m, v in metrics.items()]
                rows.append(_row(task, role, layer, "val", "accuracy", float(res["val_accuracy"][i, 0]), seed, cfg.name))
                rows.append(_row(task, role, layer, "val", "weight_decay", float(res["weight_decay"][i, 0]), seed, cfg.name))
                rows.append(_row(task, role, layer, "train", "accuracy", float(train["accuracy"][i, 0]), seed, cfg.name))
                if cfg.control:
                    rows.append(_row(task, role, layer, "val", "control_accuracy", float(res["val_accuracy"][i, 1]), seed, cfg.name))
                    rows.append(_row(task, role, layer, "train", "control_accuracy", float(train["accuracy"][i, 1]), seed, cfg.name))
                if ends:
                    rows.append(_row(task, role, layer, "train", "mdl", float(mdl[i]), seed, cfg.name))
                    rows.append(_row(task, role, layer, "train", "compression", float(uniform / mdl[i]), seed, cfg.name))
            offset += len(layer_lists[role])
        if save_dir is not None and trainer.is_global_zero:  # one file, written by rank 0
            save_probe(module, save_dir / f"{task.name}__{'+'.join(roles)}.safetensors", task, roles, layer_lists)
    return rows


def _row(task, role, layer, split, metric, value, seed, probe):
    return {"task": task.name, "model": role, "layer": layer, "split": split, "metric": metric, "value": value,
            "seed": seed, "probe": probe}


def save_probe(module: ProbeModule, path: Path, task: TaskData, roles: list[str], layer_lists: dict) -> None:
    """Only what was trained (heads, feature statistics, selection) plus a description; never a backbone."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    kept = module.V * module.G  # the task and control heads; the MDL block heads were only for the codelength
    tensors = {f"heads.{k}": v.detach().narrow(StackedHeads.HEAD_DIM[k], 0, kept).cpu().contiguous()
               for k, v in module.heads.named_parameters()}
    tensors.update({"feature_mean": module.feature_mean.cpu(), "feature_std": module.feature_std.cpu(),
                    "selected_heads": module.selected_heads().cpu(), "weight_decays": module.wd[:kept].cpu()})
    meta = {"task": task.name, "label_names": task.label_names, "roles": roles, "layers": layer_lists,
            "kind": module.hparams.kind, "variants": ["labels", "control"][: module.V],
            "format": "layerprobe-probe-v1",
            "heads": "head k = variant k // len(weight_decays), weight decay k % len(weight_decays)"}
    save_file(tensors, str(path), metadata={"layerprobe": json.dumps(meta)})
