"""Train and evaluate the probes of one task for every model, and describe them as rows."""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np

from layerprobe.errors import LayerprobeError

from layerprobe.features.extract import make_trainer
from layerprobe.probes.module import CachedFeatureData, ProbeModule
from layerprobe.tasks import SPLITS, TaskData


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


def control_labels(labels: np.ndarray, seed: int) -> np.ndarray:
    """The control task: the same label multiset, shuffled across examples with a fixed seed."""
    return labels[np.random.default_rng(seed).permutation(len(labels))]


def majority_baseline(labels: np.ndarray, split_idx: dict[str, np.ndarray]) -> float:
    majority = np.bincount(labels[split_idx["train"]]).argmax()
    return float((labels[split_idx["test"]] == majority).mean())


def fit_probes(task: TaskData, features: dict[str, np.ndarray], cfg, trainer_cfg: dict, seed: int,
               save_dir: Path | None = None) -> list[dict]:
    """Probe every (model, layer) of one task; returns probes.csv rows.

    Models whose features have the same width are trained in ONE fit, their layers side by
    side, since they share examples and labels. Under DDP (`use_distributed_sampler=False`)
    each rank trains on its slice of every one-device batch, with the loss rescaled so the
    averaged gradient is the one-device gradient (layerprobe.distributed); every rank
    evaluates the whole (small) val and test sets, so metrics match one device.
    """
    labels = task.labels()
    variants = [labels, control_labels(labels, cfg.control_seed)] if cfg.control else [labels]
    targets = np.stack(variants, axis=1)
    split_idx = {s: task.indices(s) for s in SPLITS}
    baseline = majority_baseline(labels, split_idx)

    groups: dict[int, list[str]] = defaultdict(list)
    for role, feats in features.items():
        groups[feats.shape[2]].append(role)
    rows = []
    for dim, roles in groups.items():
        layer_lists = {r: resolve_layers(cfg.layers, features[r].shape[1], r) for r in roles}
        stacked = np.concatenate([np.asarray(features[r][:, layer_lists[r]]) for r in roles], axis=1)
        L.seed_everything(seed, workers=True, verbose=False)
        data = CachedFeatureData(stacked, targets, split_idx, cfg.batch_size)
        module = ProbeModule(stacked.shape[1], dim, task.num_classes, len(variants), list(cfg.weight_decays),
                             kind=cfg.name, hidden=cfg.hidden_size, lr=cfg.lr, patience=cfg.patience,
                             mean=data.mean, std=data.std)
        with quiet_lightning():
            trainer = make_trainer(trainer_cfg, [], progress=False, max_epochs=cfg.max_epochs,
                                   num_sanity_val_steps=0, log_every_n_steps=1)
            trainer.fit(module, datamodule=data)
            trainer.test(module, datamodule=data, verbose=False)
        res = module.results
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
    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in module.heads.state_dict().items()}
    tensors.update({"feature_mean": module.feature_mean.cpu(), "feature_std": module.feature_std.cpu(),
                    "selected_heads": module.selected_heads().cpu(), "weight_decays": module.wd.cpu()})
    meta = {"task": task.name, "label_names": task.label_names, "roles": roles, "layers": layer_lists,
            "kind": module.hparams.kind, "variants": ["labels", "control"][: module.V], "format": "layerprobe-probe-v1"}
    save_file(tensors, str(path), metadata={"layerprobe": json.dumps(meta)})
