"""Several devices, sweeps and clusters: how one run spans ranks, and how jobs share a machine.

`train.py trainer.devices=N` (DDP) runs like this; every step uses Lightning's own machinery:

    ranks = launch(trainer_cfg)   # Lightning starts ranks 1..N-1 (they re-run train.py) or
                                  # finds them (SLURM, torchrun), then joins one process group
    extraction                    # rank 0 holds the store's file lock for all ranks and decides
                                  # which shards are missing; rank r extracts shards r, r+N, ...;
                                  # rank 0 consolidates the store after every rank has finished
    probe fits                    # every rank; each global batch of the one-device run is split
                                  # over the ranks (RankSliceBatchSampler) and the loss rescaled,
                                  # so DDP's gradient average is the one-device gradient
    similarity, CSVs, report      # rank 0 only; ranks > 0 return once the last fit is done

A later `lightning.Trainer` in the same processes finds the process group and `LOCAL_RANK`
already set, so it neither launches processes again nor builds a new group.

`trainer.strategy=fsdp` (GPUs only) shards the tuning stage (layerprobe.tuning.run) with
Lightning's FSDPStrategy. The ranks are started and joined exactly as for DDP; extraction
and probes, which train nothing large, run data-parallel (DDP) on those same ranks, and
only the tuning stage's Trainer gets FSDP (`Ranks.tuning_strategy`).

Policy for `-m` with more than one rank: only where the cluster creates the processes
(SLURM through hydra/launcher=slurm, torchrun). A local sweep (basic or joblib
launcher) refuses, because Lightning re-executes the command line, which for a sweep
would re-run the whole sweep in every rank. docs/scaling.md has the details.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock, Timeout

from layerprobe.errors import LayerprobeError

log = logging.getLogger(__name__)

LOCK_POLL_S = 5.0  # how often a waiting rank 0 re-tries a lock; all ranks meet in a broadcast each time
# Ranks wait for rank 0 in collectives only while it consolidates a store: far shorter than this.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


class DistributedError(LayerprobeError):
    """A trainer / launcher combination layerprobe cannot run; the message names the fix."""


@dataclass
class Ranks:
    """The processes of one run: rank 0 alone unless `launch` started a process group.

    `trainer_cfg` is the `trainer` section to pass to every `lightning.Trainer` of the run
    (in a local parallel sweep, `devices` names the GPU leased to this job).
    """

    trainer_cfg: dict = field(default_factory=dict)
    fabric: Any = None
    lease: Optional[FileLock] = None
    # the strategy for the tuning stage's Trainer when it differs from trainer_cfg's ("fsdp"), else None
    tuning_strategy: Any = None

    @property
    def rank(self) -> int:
        return self.fabric.global_rank if self.fabric is not None else 0

    @property
    def world_size(self) -> int:
        return self.fabric.world_size if self.fabric is not None else 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object)."""
        return obj if self.fabric is None else self.fabric.broadcast(obj, src=0)

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def on_zero(self, fn: Callable[[], Any]):
        """Run `fn` on rank 0 only; every rank returns its result, or raises its error."""
        if self.fabric is None:
            return fn()
        outcome = None
        if self.is_zero:
            try:
                outcome = ("ok", fn())
            except LayerprobeError as err:
                self.broadcast(("error", err))
                raise
            except BaseException as err:
                self.broadcast(("crash", f"rank 0 failed: {err!r}"))
                raise
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        if outcome[0] == "crash":
            raise RuntimeError(outcome[1])
        return outcome[1]

    @contextmanager
    def hold(self, lock_path: str, what: str = "", wait: bool = True):
        """An OS file lock, taken by rank 0 on behalf of every rank of this run; yields True.

        Other runs wait for it (the OS releases it if its holder dies). Only rank 0 touches
        the lock, so ranks of one run cannot deadlock on it; while rank 0 waits, all ranks
        meet in a broadcast every few seconds so no collective times out. With wait=False a
        lock held elsewhere yields False at once (on every rank) and nothing is held.
        """
        lock = FileLock(lock_path) if self.is_zero else None

        def attempt(timeout: float) -> bool:
            if lock is None:
                return False
            try:
                lock.acquire(timeout=timeout)
                return True
            except Timeout:
                return False

        if not self.broadcast(attempt(0)):
            if not wait:
                yield False
                return
            log.info("waiting for %s: another job holds its lock (it will be reused when that job is done)",
                     what or lock_path)
            start = time.time()
            while not self.broadcast(attempt(LOCK_POLL_S)):
                pass
            log.info("got %s after %.0f s", what or lock_path, time.time() - start)
        try:
            yield True
        finally:
            if lock is not None:
                lock.release()

    def close(self) -> None:
        """Give back the GPU leased to this job (a local parallel sweep), if any."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None


# --- launching ---------------------------------------------------------------------------


def _fabric(trainer_cfg: dict, strategy=None):
    from lightning.fabric import Fabric

    return Fabric(accelerator=trainer_cfg.get("accelerator", "auto"), devices=trainer_cfg.get("devices", "auto"),
                  num_nodes=trainer_cfg.get("num_nodes", 1), strategy=strategy or trainer_cfg.get("strategy", "auto"))


def _one_device(trainer_cfg: dict) -> bool:
    devices = trainer_cfg.get("devices", "auto")
    single = devices in (1, "1") or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    return single and int(trainer_cfg.get("num_nodes", 1)) == 1


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def is_fsdp(strategy) -> bool:
    """`trainer.strategy` names Lightning's FSDP: "fsdp" (any case) or an FSDPStrategy instance."""
    if isinstance(strategy, str):
        return strategy.strip().lower() == "fsdp"
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def check_strategy(trainer_cfg: dict) -> None:
    """trainer.strategy=fsdp on a machine or accelerator without GPUs: one line naming the fix.

    Lightning runs FSDP on CUDA devices only (it refuses FSDPStrategy with accelerator=cpu),
    so this is refused before any model is loaded rather than deep inside the first Trainer.
    """
    if not is_fsdp(trainer_cfg.get("strategy", "auto")):
        return
    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    if accelerator == "auto":
        import torch

        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator not in ("gpu", "cuda"):
        raise DistributedError(
            f"trainer.strategy=fsdp needs GPUs (Lightning runs FSDP on CUDA devices only), but the accelerator is "
            f"{accelerator}; use trainer.accelerator=gpu on a machine with GPUs, or trainer.strategy=ddp on the CPU")


def launch(trainer_cfg: dict) -> Ranks:
    """Start (or join) the ranks that `trainer_cfg` asks for; one device: nothing happens.

    On a single machine Lightning re-executes the Hydra command for ranks > 0 with
    `hydra.run.dir` set to this run's dir (and `hydra.output_subdir=null`), so every rank
    works in the same run dir; only rank 0 writes outputs.

    trainer.strategy=fsdp: the ranks are launched as for DDP; the returned `trainer_cfg` (what
    extraction and probes get) says ddp (auto on one device) and `tuning_strategy` keeps fsdp.
    """
    trainer_cfg = dict(trainer_cfg)
    check_strategy(trainer_cfg)
    tuning_strategy = None
    if is_fsdp(trainer_cfg.get("strategy", "auto")):
        tuning_strategy = trainer_cfg["strategy"]
        trainer_cfg["strategy"] = "auto" if _one_device(trainer_cfg) else "ddp"
        log.info("trainer.strategy=fsdp: the tuning stage trains sharded (FSDP); feature extraction and probes run "
                 "data-parallel (%s) on the same devices", trainer_cfg["strategy"])
    if _one_device(trainer_cfg):
        return Ranks(trainer_cfg, lease=lease_gpu(trainer_cfg), tuning_strategy=tuning_strategy)
    from lightning.fabric.strategies import DDPStrategy
    from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        requested = _fabric(trainer_cfg)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        raise DistributedError(f"trainer settings rejected by Lightning: {err}") from None
    strategy = requested.strategy
    world = getattr(strategy, "num_processes", 1) * getattr(strategy, "num_nodes", 1)
    if world == 1:
        return Ranks(trainer_cfg, tuning_strategy=tuning_strategy)
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.launcher, _SubprocessScriptLauncher):
        raise DistributedError(
            f"trainer.strategy={trainer_cfg.get('strategy')} is not supported with {world} processes; "
            "use trainer.strategy=ddp (or auto), or fsdp to shard the tuning stage on GPUs")
    external = strategy.cluster_environment.creates_processes_externally
    if _in_sweep() and not external:
        raise DistributedError(sweep_policy_message(world))
    # The process group is built once here; the Trainers of the run reuse it.
    fabric = _fabric(trainer_cfg, DDPStrategy(timeout=PROCESS_GROUP_TIMEOUT))
    fabric.launch()
    ranks = Ranks(trainer_cfg, fabric, tuning_strategy=tuning_strategy)
    if not ranks.is_zero:
        rank_logging(ranks.rank)
    log.info("rank %d of %d (%s)", ranks.rank, ranks.world_size, type(strategy.cluster_environment).__name__)
    return ranks


def sweep_policy_message(world: int | str) -> str:
    return (f"-m with {world} processes per job needs a launcher whose cluster creates the processes: "
            "hydra/launcher=slurm (tasks_per_node = gpus_per_node = trainer.devices). Locally, sweep with "
            "trainer.devices=1 and hydra/launcher=joblib (jobs run side by side, one GPU each), or run the "
            "multi-device jobs one by one without -m; see docs/scaling.md")


# launcher presets -> the plugin package they need (pip install 'layerprobe[launchers]')
LAUNCHER_PLUGINS = {"joblib": "hydra_joblib_launcher", "local": "hydra_joblib_launcher", "slurm": "hydra_submitit_launcher",
                    "submitit_slurm": "hydra_submitit_launcher", "submitit_local": "hydra_submitit_launcher"}


def check_sweep_argv(argv: list[str]) -> None:
    """Before Hydra starts: a launcher whose plugin is missing, or a local sweep whose jobs
    ask for several devices on the command line, is one line naming the fix."""
    import importlib.util

    launcher = next((a.partition("=")[2] for a in argv if a.lstrip("+").startswith("hydra/launcher=")), "basic")
    plugin = LAUNCHER_PLUGINS.get(launcher)
    if plugin and importlib.util.find_spec(f"hydra_plugins.{plugin}") is None:
        raise DistributedError(f"hydra/launcher={launcher} needs the {plugin.replace('_', '-')} plugin: "
                               "pip install 'layerprobe[launchers]'")
    if not {"-m", "--multirun"} & set(argv) or "slurm" in launcher or _cluster_creates_processes():
        return
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("trainer.devices", "trainer.num_nodes"):
            for choice in (c.strip() for c in value.split(",")):
                if choice == "-1" or (choice.isdigit() and int(choice) > 1):
                    raise DistributedError(sweep_policy_message(f"{key}={choice}"))


def _cluster_creates_processes() -> bool:
    """Inside `srun` or `torchrun` (the checks Lightning's SLURM / TorchElastic environments make)."""
    slurm = "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    return slurm or "TORCHELASTIC_RUN_ID" in os.environ


def rank_logging(rank: int) -> None:
    """Ranks > 0: warnings only on the console, and a log file of their own.

    Ranks that Lightning started already log to `train_ddp_process_<k>.log`; ranks the
    cluster started (SLURM) would share the job's `train.log`, so they move to
    `train_rank<k>.log` beside it.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            path = Path(handler.baseFilename)
            if "_ddp_process_" in path.stem:
                continue
            own = logging.FileHandler(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"))
            own.setFormatter(handler.formatter)
            own.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(own)
        elif isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)


def current_rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def rank_zero_reports(fn: Callable[[], Any]):
    """Run `fn`; on ranks > 0 a user error is rank 0's to report: exit with status 2, quietly."""
    try:
        return fn()
    except LayerprobeError as err:
        if current_rank() == 0:
            raise
        log.info("rank %d stops: %s (rank 0 reports it)", current_rank(), err)
        sys.exit(2)


# --- one GPU per job in a local parallel sweep ---------------------------------------------


def _gpu_lock_dir() -> Path:
    # Machine-local on purpose: the feature cache may be shared by several machines.
    return Path(tempfile.gettempdir()) / f"layerprobe-gpus-{os.getuid()}"


def lease_gpu(trainer_cfg: dict, gpu_count: int | None = None, poll_s: float = 2.0) -> Optional[FileLock]:
    """In a sweep on a machine with several GPUs, give this one-device job a GPU of its own.

    The job takes an OS lock per GPU (first free one, waiting if all are taken) and sets
    `trainer_cfg["devices"] = [i]`; the lock goes when the job ends or dies. Elsewhere
    (no sweep, CPU, one GPU, explicit device ids) it returns None and changes nothing.
    """
    if gpu_count is None:
        if not _in_sweep() or str(trainer_cfg.get("accelerator", "auto")) not in ("auto", "gpu", "cuda"):
            return None
        import torch

        gpu_count = torch.cuda.device_count()
    if gpu_count < 2 or trainer_cfg.get("devices", "auto") not in (1, "1", "auto"):
        return None
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    names = visible[:gpu_count] if len(visible) >= gpu_count else [str(i) for i in range(gpu_count)]
    _gpu_lock_dir().mkdir(parents=True, exist_ok=True)
    locks = [FileLock(str(_gpu_lock_dir() / f"gpu{name}.lock"), thread_local=False) for name in names]
    waited = False
    while True:
        for i, lock in enumerate(locks):
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            trainer_cfg["devices"] = [i]
            log.info("this job uses GPU %d (of %d)", i, gpu_count)
            return lock
        if not waited:
            log.info("all %d GPUs are taken by other jobs of the sweep; waiting for one", gpu_count)
            waited = True
        time.sleep(poll_s)


# --- probe training under DDP ---------------------------------------------------------------


class RankSliceBatchSampler:
    """The shuffled batches of the one-device loader, each split over the ranks.

    Every rank draws the same permutation (a `RandomSampler` on the global torch RNG, which
    `seed_everything` set alike on every rank), cuts it into the same global batches as the
    one-device loader (`BatchSampler(RandomSampler(rows), B)`) and keeps every world-th row.
    A global batch smaller than the world size (the last one) goes whole to every rank, so
    no rank ever gets an empty batch. Yields index lists (use with `batch_size=None`).
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        from torch.utils.data import BatchSampler, RandomSampler

        self.batches = BatchSampler(RandomSampler(range(n)), batch_size, drop_last=False)
        self.rank, self.world = rank, world_size

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.rank :: self.world] if len(batch) >= self.world else batch

    def __len__(self) -> int:
        return len(self.batches)


def rescale_for_ranks(module, loss, n_local: int):
    """A per-example mean loss on this rank's slice -> its share of the global batch mean.

    DDP averages gradients over ranks, so scaling by n_local * world / n_global makes the
    averaged gradient the gradient of the mean over the whole global batch. One device: as is.
    """
    trainer = module.trainer
    if trainer is None or trainer.world_size == 1:
        return loss
    import torch

    n_global = trainer.strategy.reduce(torch.tensor(float(n_local), device=loss.device), reduce_op="sum")
    return loss * (n_local * trainer.world_size / n_global)
