"""Backbone -> feature store, through Lightning's predict loop.

Each task's examples are cut into fixed shards (the unit of resume). The predict loop
hands one shard per step to `FeatureExtractor`, which runs the backbone in length-sorted
micro-batches (less padding) with every layer captured in one forward; `ShardWriter`
writes the shard atomically as soon as it is done, so nothing accumulates in RAM and an
interrupted run resumes from the finished shards. Under DDP, rank r of N extracts the
missing shards r, r+N, r+2N, ... into the same store.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from layerprobe.models.capture import LayerCapture
from layerprobe.models.load import check_checkpoint, checkpoint_identity, load_backbone
from layerprobe.distributed import Ranks
from layerprobe.config import ConfigError
from layerprobe.features.store import LEGACY, DamagedShards, FeatureError, FeatureStore, fingerprint
from layerprobe.models.prompting import PromptEncoder, PromptSpec
from layerprobe.tasks import TaskData

log = logging.getLogger(__name__)

# Settings that change the numbers; everything else (batch size, shard size) does not.
FINGERPRINT_KEYS = ("pooling", "max_length", "truncation_side", "dtype", "final_norm", "store_dtype")


class ShardDataset(Dataset):
    def __init__(self, shards: list[tuple[int, list[str]]]):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i):
        return self.shards[i]


class FeatureExtractor(L.LightningModule):
    """Wraps a frozen backbone; predict_step turns a shard of prompts into [n, L+1, d].

    Prompts are rendered (plain or chat template, per `prompt`) and pooled over the user's
    prompt tokens by layerprobe.models.prompting.PromptEncoder. A backbone placed by accelerate
    (model.device_map) is kept out of the module tree, so Lightning never moves it.
    """

    def __init__(self, backbone, tokenizer, cfg, prompt: PromptSpec | None = None, placed: bool = False):
        super().__init__()
        self._placed = (backbone,) if placed or getattr(backbone, "hf_device_map", None) else ()
        if not self._placed:
            self.backbone = backbone
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.tokenizer.truncation_side = cfg.truncation_side
        self.encoder = PromptEncoder(tokenizer, prompt, cfg.max_length, cfg.truncation_side)
        self.truncated = 0

    def predict_step(self, batch, batch_idx):
        shard_index, texts = batch
        rows = self.encoder.encode(texts)
        self.truncated += sum(r.truncated for r in rows)
        order = np.argsort([len(r.ids) for r in rows], kind="stable")  # similar lengths together: little padding
        backbone = self._placed[0] if self._placed else self.backbone
        device = backbone.get_input_embeddings().weight.device if self._placed else self.device
        out = torch.empty(0)
        with LayerCapture(backbone, self.cfg.pooling, self.cfg.final_norm) as capture:
            for start in range(0, len(texts), self.cfg.batch_size):
                idx = order[start : start + self.cfg.batch_size]
                ids, attention, prompt_tokens = (t.to(device) for t in self.encoder.pad([rows[i] for i in idx]))
                feats = capture(ids, attention, prompt_tokens)
                if out.numel() == 0:
                    out = torch.empty((len(texts),) + feats.shape[1:], dtype=torch.float32)
                out[torch.as_tensor(idx)] = feats.float().cpu()
        return shard_index, out.numpy().astype(self.cfg.store_dtype, copy=False)


class ShardWriter(BasePredictionWriter):
    def __init__(self, store: FeatureStore):
        super().__init__(write_interval="batch")
        self.store = store

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        shard_index, features = prediction
        self.store.write_shard(shard_index, features)


def _single_item(batch):
    return batch[0]


def extraction_settings(cfg) -> dict:
    return {k: getattr(cfg, k) for k in FINGERPRINT_KEYS}


def store_for(cache_dir: Path, identity: dict, task: TaskData, cfg, prompt: PromptSpec | None = None) -> FeatureStore:
    fp = fingerprint({"checkpoint": identity, "task": task.content_hash(), "settings": extraction_settings(cfg),
                      "prompt": (prompt or PromptSpec()).fingerprint()})
    return FeatureStore(Path(cache_dir) / "features" / fp)


def make_trainer(trainer_cfg: dict, callbacks: list, progress: bool = True, **extra) -> L.Trainer:
    """A Trainer from the user's `trainer` config, for extraction and probe fits alike: no
    logger, checkpoints or summary (nothing here is worth saving but the outputs), and no
    distributed sampler (under DDP, shards and probe batches are split over ranks by us)."""
    options = {k: v for k, v in trainer_cfg.items() if k not in {"max_epochs"}}
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=callbacks,
        use_distributed_sampler=False,
        **extra,
        **options,
    )


def check_trainer(trainer_cfg: dict) -> None:
    """Build a Trainer from the user's settings once, before any model is loaded or built, so a
    setting Lightning rejects (no GPU for trainer.accelerator=gpu, an unknown option, a bad
    precision) is one line. Several devices: checked on one device here, the rest by
    layerprobe.distributed.launch."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    cfg = dict(trainer_cfg)
    if cfg.get("devices", "auto") not in (1, "1", "auto") or int(cfg.get("num_nodes", 1) or 1) != 1:
        cfg.update(devices=1, num_nodes=1, strategy="auto")
    names = ("lightning.pytorch", "lightning.fabric")  # its device banner belongs to the first real Trainer
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        make_trainer(cfg, [], progress=False)
    except (MisconfigurationException, TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(trainer_error(trainer_cfg, err)) from None
    finally:
        for n, level in zip(names, levels):
            logging.getLogger(n).setLevel(level)


def trainer_error(trainer_cfg: dict, err: Exception) -> str:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    unknown = re.search(r"unexpected keyword argument '(\w+)'", first)
    if unknown:
        return f"trainer.{unknown.group(1)} is not a lightning.Trainer option; remove it or fix its name"
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator not in ("auto", "cpu") and isinstance(err, MisconfigurationException):
        return (f"trainer.accelerator={accelerator} cannot run on this machine ({first}); "
                "use trainer.accelerator=auto (or cpu)")
    return f"the trainer settings are rejected by Lightning ({first}); fix the trainer.* value"


def run_extraction(extractor: FeatureExtractor, task: TaskData, store: FeatureStore, cfg, trainer_cfg: dict, role: str, meta: dict,
                   ranks: Ranks | None = None):
    """Extract the shards not on disk yet, then consolidate the store.

    Under DDP rank 0 plans (which shards are missing, in the store's recorded layout) and
    every rank gets the plan; each rank extracts its share of the shards into the same
    store, and rank 0 consolidates once all ranks are done.
    """
    ranks = ranks or Ranks(trainer_cfg)
    texts = [ex.text for ex in task.examples]

    def plan():
        size = store.shard_layout(len(texts), cfg.shard_size, ranks.world_size)  # a partial store keeps its layout
        done = store.finished_shards()
        return size, [i for i in range(-(-len(texts) // size)) if i not in done]

    def finalize():
        try:
            store.finalize(task.ids, num_shards, meta, role)
            return {}
        except DamagedShards as err:  # deleted by finalize; returned so that every rank extracts them again
            return err.shards

    for attempt in (1, 2):
        shard_size, todo = ranks.on_zero(plan)
        num_shards = -(-len(texts) // shard_size)
        if attempt == 1 and len(todo) < num_shards:
            log.info("resuming %s/%s: %d of %d shards already on disk", role, task.name, num_shards - len(todo), num_shards)
        if todo:
            # this rank's shards; with fewer shards than ranks, a rank redoes one (same bytes, atomic
            # writes), since Lightning needs a batch on every rank
            mine = todo[ranks.rank :: ranks.world_size] or [todo[ranks.rank % len(todo)]]
            shards = [(i, texts[i * shard_size : (i + 1) * shard_size]) for i in mine]
            loader = DataLoader(ShardDataset(shards), batch_size=1, collate_fn=_single_item, shuffle=False)
            trainer = make_trainer(trainer_cfg, [ShardWriter(store)])
            trainer.predict(extractor, loader, return_predictions=False)
            if extractor.truncated:
                log.warning("%s/%s: %d prompts longer than extract.max_length=%d were cut on the %s", role, task.name,
                            extractor.truncated, cfg.max_length, cfg.truncation_side)
                extractor.truncated = 0
        ranks.barrier()  # every rank's shards are on disk
        damaged = ranks.on_zero(finalize)
        if not damaged:
            return
        details = "; ".join(f"shard {i}: {why}" for i, why in sorted(damaged.items()))
        if attempt == 1 and ranks.is_zero:
            log.warning("features %s/%s: %d damaged shard(s) in %s (%s): extracting them again", role, task.name,
                        len(damaged), store.root, details)
    raise FeatureError(f"feature store {store.root}: shards fail their checksum right after being written ({details}); "
                       "check the disk under paths.cache_dir and rerun")


def ensure_features(role: str, checkpoint: str, tasks: list[TaskData], cfg, trainer_cfg: dict, cache_dir: Path,
                    revision=None, trust_remote_code: bool = False, prompt: PromptSpec | None = None,
                    device_map=None, ranks: Ranks | None = None, identity: dict | None = None,
                    backbone=None, cached: list | None = None) -> dict[str, FeatureStore]:
    """Make sure every task has a complete store for this model; run the backbone only if needed.

    The stores already on disk are logged as one line for the role (:func:`log_cached`), or,
    with ``cached`` (a list), appended to it as ``(role, task, store)`` for the caller to
    summarize (the pipeline gives all control models one line).

    identity / backbone: for roles that are not a plain checkpoint (a LoRA adapter on a base,
    layerprobe.models.load.AdapterSet): the identity for the fingerprint, and a callable
    returning (backbone, tokenizer), called only when a store is missing.

    A file lock per store lets concurrent jobs share the cache: one extracts, the others
    wait and then read. The lock is an OS lock, released if its holder dies. Under DDP
    (`ranks` from layerprobe.distributed.launch) rank 0 decides and holds the lock for all ranks.
    """
    ranks = ranks or Ranks(trainer_cfg)
    if identity is None:
        check_checkpoint(checkpoint, role)
        identity = checkpoint_identity(checkpoint, revision)
    stores = {t.name: store_for(cache_dir, identity, t, cfg, prompt) for t in tasks}
    verify = bool(getattr(cfg, "verify", False))  # extract.verify=true: every checksum, not only the sizes

    def usable(store: FeatureStore) -> bool:
        return store.complete and store.damage(verify) is None

    complete = ranks.on_zero(lambda: [usable(stores[t.name]) for t in tasks])  # rank 0's view, on every rank
    missing = [t for t, done in zip(tasks, complete) if not done]
    on_disk = [(role, t.name, stores[t.name]) for t in tasks if t not in missing]
    if cached is None:
        log_cached(f"features {role}", on_disk, len(tasks), "task")
    else:
        cached.extend(on_disk)
    if not missing:
        return stores
    if backbone is not None:
        backbone, tokenizer = backbone()
    else:
        backbone, tokenizer = load_backbone(checkpoint, cfg.dtype, "cpu", trust_remote_code, revision, device_map)
    extractor = FeatureExtractor(backbone, tokenizer, cfg, prompt, placed=bool(device_map))
    # First the stores no other job is extracting (concurrent jobs split the work), then wait for the rest.
    for wait in (False, True):
        for task in list(missing):
            store = stores[task.name]
            store.root.mkdir(parents=True, exist_ok=True)
            with ranks.hold(str(store.root) + ".lock", f"features {role}/{task.name}", wait=wait) as held:
                if not held:
                    continue
                missing.remove(task)
                if ranks.on_zero(lambda: usable(store)):  # another job finished (or rebuilt) it while we waited
                    log.info("features %s/%s: extracted by another job, reused", role, task.name)
                    continue
                ranks.on_zero(lambda: discard_if_damaged(store, role, task.name, verify))
                log.info("extracting %s/%s: %d examples -> %s", role, task.name, len(task.examples), store.root)
                meta = {"role": role, "task": task.name, "checkpoint": identity, "settings": extraction_settings(cfg),
                        "prompt": (prompt or PromptSpec()).fingerprint(),
                        "fingerprint": store.root.name, "extract_config": asdict(cfg)}
                run_extraction(extractor, task, store, cfg, trainer_cfg, role, meta, ranks)
    del extractor, backbone
    return stores


def log_cached(what: str, on_disk: list[tuple[str, str, FeatureStore]], total: int, unit: str) -> None:
    """One console line for the stores already on disk, e.g. `features base: 10 tasks cached in
    <cache>/features, backbone not run` (each store's path at DEBUG: `hydra.verbose=layerprobe.features.extract`);
    the stores still to make get their own `extracting <role>/<task>` line."""
    for role, task, store in on_disk:
        log.debug("features %s/%s: cached at %s", role, task, store.root)
    if not on_disk:
        return
    n = len(on_disk)
    count = f"{n} {unit}{'s' if n != 1 else ''}" if n == total else f"{n} of {total} {unit}s"
    rest = "backbone not run" if n == total else f"extracting the other {total - n}"
    log.info("%s: %s cached in %s, %s", what, count, on_disk[0][2].root.parent, rest)


def discard_if_damaged(store: FeatureStore, role: str, task: str, verify: bool = False) -> None:
    """A complete store whose files do not match its manifest: one warning, then its files go (manifest first)."""
    problem = store.damage(verify) if store.complete else None
    if problem == LEGACY:  # not damage: a store from before the manifest recorded sizes and checksums
        log.info("features %s/%s: %s is from an older layerprobe (no checksums): extracting it again", role, task, store.root)
        store.discard()
    elif problem:
        log.warning("features %s/%s: %s; rebuilding it", role, task, store.damaged_message(problem).split("; rerun")[0])
        store.discard()
