"""The tuning stage: base checkpoint + (prompt, answer) pairs + recipe -> a cached model dir.

    ${paths.cache_dir}/models/<fingerprint>/     published atomically (tmp dir + rename)
        adapter_config.json, adapter_model.safetensors   (method=lora: peft's own files, adapter only)
        config.json, model.safetensors                   (method=full: the whole model)
        tokenizer files, logs/metrics.csv
        manifest.json                                    written last: base identity, data, recipe, losses
    ${paths.cache_dir}/models/.<fingerprint>.work/      Lightning resume checkpoints while training

fingerprint = base checkpoint identity + training data content + recipe (+ prompt
rendering, + world size). A second identical request trains nothing and logs that it
reused the model. A run killed at any point (kill -9 included) resumes from the last
Lightning checkpoint in the work dir and reproduces the same batches (data.training_plan).
Concurrent jobs share the cache: a file lock per fingerprint, one trains, the others wait.

trainer.devices=N trains data-parallel (DDP: each rank holds the whole model). With
trainer.strategy=fsdp (GPUs) Lightning's FSDPStrategy shards parameters, gradients and
optimizer state over the ranks (`fsdp_strategy`: one FSDP unit per decoder layer, found from
the model's `_no_split_modules`). The sharded weights are gathered once, after the last step,
into a full state dict on rank 0 (on the CPU), which is what gets published; resume
checkpoints are full state dicts as well (Lightning's `state_dict_type="full"`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from layerprobe.distributed import PROCESS_GROUP_TIMEOUT, is_fsdp
from layerprobe.features.store import atomic_write_bytes, fingerprint
from layerprobe.models.load import checkpoint_identity, check_checkpoint, quiet_transformers
from layerprobe.models.prompting import load_tokenizer, make_spec
from layerprobe.tuning.config import PRECISIONS, TuningConfig, TuningError
from layerprobe.tuning.data import SFTExamples, apply_chat_template_setting, pairs_hash, plan_loader, training_plan
from layerprobe.tuning.module import CausalLMTuning

log = logging.getLogger(__name__)
MODEL_VERSION = 1
TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy")


def _rank() -> int:
    from layerprobe.distributed import current_rank

    return current_rank()


def _world(trainer_cfg: dict) -> int:
    devices = trainer_cfg.get("devices", 1)
    n = len(devices) if isinstance(devices, (list, tuple)) else (1 if devices in ("auto", None) else int(devices))
    return n * int(trainer_cfg.get("num_nodes", 1))


def make_logger(setting, save_dir: Path, name: str):
    """tuning.logger: csv (default) | tensorboard | null | a {_target_: ...} node for hydra.utils.instantiate."""
    if setting in (None, False, "none", "null"):
        return False
    if setting == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir, name=name, version=0)
    if setting == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir, name=name, version=0)
    if isinstance(setting, dict) and "_target_" in setting:
        from hydra.utils import instantiate

        return instantiate(setting)
    raise TuningError(f"tuning.logger={setting!r} is not valid; use csv, tensorboard, null or a {{_target_: ...}} logger")


def precision_for(cfg: TuningConfig, trainer_cfg: dict) -> str:
    precision = PRECISIONS[cfg.precision]
    on_cpu = trainer_cfg.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if precision == "16-mixed" and on_cpu:
        log.warning("tuning.precision=16 needs a GPU; training in 32-bit on the CPU")
        return "32-true"
    return precision


def load_causal_lm(checkpoint: str, revision=None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(checkpoint, revision=revision, trust_remote_code=trust_remote_code,
                                                    dtype=torch.float32)


def add_lora(model, cfg: TuningConfig, revision=None):
    """peft's LoRA on `cfg.target_modules`; every other weight is frozen (bit-identical after training).
    `revision` (the base's, model.revision) is recorded in adapter_config.json, as peft does."""
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise TuningError(f"tuning.target_modules {missing} are not modules of {type(model).__name__} "
                          f"(it has e.g. {sorted(n for n in names if 'proj' in n or 'attn' in n)[:8]}); set tuning.target_modules")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM", bias="none")
    with quiet_transformers():
        return get_peft_model(model, lora, revision=revision)


def resume_point(work: Path | None) -> tuple[str | None, int]:
    """(checkpoint, optimizer steps done) of an interrupted run in `work`, or (None, 0)."""
    path = None if work is None else work / "checkpoints" / "last.ckpt"
    if path is None or not path.exists():
        return None, 0
    # mmap: every rank reads the step, and a full fine-tune's checkpoint is as big as the model
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return str(path), int(state["global_step"])


def decoder_layer_classes(model) -> set[type]:
    """The block classes of a Hugging Face model: those its `_no_split_modules` names (also through peft)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def fsdp_strategy(model, timeout=None) -> FSDPStrategy:
    """Lightning's FSDPStrategy with defaults for causal LMs.

    - one FSDP unit per decoder layer (ModuleWrapPolicy over the classes `_no_split_modules`
      names), so only one layer's full weights exist on a GPU at a time; the embeddings, final
      norm and LM head go into the root unit;
    - use_orig_params=True: peft puts frozen base weights and trainable LoRA weights in the same
      layer (one flat parameter), and the optimizer's parameter groups (lr_scale) name the
      original parameters;
    - no sync_module_states (DDP's broadcast of rank 0's weights): every rank loads the same
      checkpoint and seeds the LoRA init with tuning.seed before wrapping (`tune`), so the shards
      are cut from identical weights without a broadcast of the whole model;
    - state_dict_type="full": resume checkpoints are one file (gathered on rank 0), as without FSDP.
    Mixed precision is Lightning's `precision` flag (FSDPPrecision), set by `tuning.precision`.
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layers = decoder_layer_classes(model)
    if not layers:
        raise TuningError(f"trainer.strategy=fsdp: {type(model).__name__} names no decoder-layer class (_no_split_modules), "
                          "so FSDP cannot shard it layer by layer; use trainer.strategy=ddp, or pass an FSDPStrategy with "
                          "its own auto_wrap_policy as trainer_cfg['strategy'] (Python API)")
    return FSDPStrategy(auto_wrap_policy=ModuleWrapPolicy(layers), use_orig_params=True, state_dict_type="full",
                        timeout=timeout or PROCESS_GROUP_TIMEOUT)


def fit(module: CausalLMTuning, loader, max_steps: int, grad_accum: int, trainer_cfg: dict, precision: str,
        work: Path | None = None, logger=False, log_every_n_steps: int = 10, progress: bool = True,
        save_every_n_steps: int = 50) -> dict:
    """Run Lightning's fit loop over a plan loader; resumes from work/checkpoints/last.ckpt if present
    (the loader must start at that checkpoint's step: `resume_point`).

    trainer_cfg["strategy"] = "fsdp" trains with `fsdp_strategy(module.model)` (an FSDPStrategy
    instance is used as given). Under FSDP the trained weights are gathered after fit into
    `module.full_state` (rank 0: the full state dict, on the CPU; other ranks: None), since each
    rank's model then holds only its shard; without FSDP `module.full_state` is None."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from layerprobe.progress import StepsProgressBar

    callbacks, ckpt = [], None
    if work is not None:
        ckpt_dir = work / "checkpoints"
        # one file, rewritten every save_every_n_steps optimizer steps (monitor=None: top-1 = the latest)
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, every_n_train_steps=save_every_n_steps,
                                         save_on_train_epoch_end=False, enable_version_counter=False))
        ckpt, _ = resume_point(work)
    options = {k: trainer_cfg[k] for k in TRAINER_KEYS if k in trainer_cfg}
    fsdp = is_fsdp(options.get("strategy", "auto"))
    if fsdp and isinstance(options["strategy"], str):
        options["strategy"] = fsdp_strategy(module.model)
    if fsdp and ckpt:
        # Lightning's FSDP loads the weights itself, non-strictly (the checkpoint holds the trained ones only),
        # and hands on_load_checkpoint no state_dict: check here that none is missing
        saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
        missing = module.trained_names() - set(saved)
        if missing:
            raise RuntimeError(f"resume checkpoint {ckpt} lacks trained parameters, e.g. {sorted(missing)[:3]}")
    bar = [StepsProgressBar()] if progress else []  # Lightning refuses a bar callback with enable_progress_bar=False
    trainer = L.Trainer(max_epochs=-1, max_steps=max_steps, accumulate_grad_batches=grad_accum, precision=precision,
                        logger=logger, callbacks=callbacks + bar, enable_checkpointing=bool(callbacks), enable_model_summary=False,
                        use_distributed_sampler=False, log_every_n_steps=log_every_n_steps, enable_progress_bar=progress,
                        num_sanity_val_steps=0, **options)
    if ckpt:
        log.info("resuming tuning from %s", ckpt)
    with warnings.catch_warnings():
        # the plan loader starts at the checkpoint's step itself (resume_point), so the mid-epoch resume is exact
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        # peft keeps frozen base and trainable LoRA weights in one layer, so each FSDP unit mixes them; torch warns,
        # listing every parameter of every layer, that the unit's sharded gradient buffer then also spans the frozen
        # ones (1/N of the layer per GPU: the cost of use_orig_params=True, stated in docs/models.md)
        warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad=True and False")
        trainer.fit(module, loader, ckpt_path=ckpt)
    module.full_state = None
    if fsdp:
        # a collective: every rank sends its shards, rank 0 gets the full weights on the CPU (Lightning's own
        # gather for checkpoints: FULL_STATE_DICT, rank0_only, offload_to_cpu), the others get {}
        state = trainer.strategy.lightning_module_state_dict()
        module.full_state = {k.removeprefix("model."): v for k, v in state.items()} if trainer.is_global_zero else None
    loss = trainer.callback_metrics.get("loss")
    return {"steps": int(trainer.global_step), "final_loss": None if loss is None else float(loss), "resumed": bool(ckpt),
            "world_size": trainer.world_size, "strategy": getattr(trainer.strategy, "strategy_name", type(trainer.strategy).__name__)}


def tune(base: str, prompts: list[str], answers: list[str] | None, cfg: TuningConfig, cache_dir: Path, trainer_cfg: dict | None = None,
         name: str = "model", tasks: list[str] | None = None, revision=None, trust_remote_code: bool = False,
         lr_scale=None, ranks=None) -> Path:
    """Fine-tune `base` on the pairs with `cfg`; return the cached model dir (trained at most once)."""
    trainer_cfg = dict(trainer_cfg or {})
    if getattr(ranks, "tuning_strategy", None) is not None:
        trainer_cfg["strategy"] = ranks.tuning_strategy  # trainer.strategy=fsdp: launch() gave the rest of the run ddp
    check_checkpoint(base, name)
    identity = checkpoint_identity(base, revision)
    tokenizer = load_tokenizer(base, trust_remote_code, revision)
    apply_chat_template_setting(tokenizer, cfg.chat_template)
    spec = make_spec(tokenizer, cfg.chat, cfg.system_prompt, name, base)
    world = _world(trainer_cfg)
    data_hash = pairs_hash(prompts, answers)
    fp = fingerprint({"kind": "tuned-model", "model_version": MODEL_VERSION, "base": identity, "data": data_hash,
                      "recipe": cfg.recipe(), "prompt": spec.fingerprint(), "world_size": world,
                      "lr_scale": getattr(lr_scale, "fingerprint", None) if lr_scale else None})
    root = Path(cache_dir) / "models" / fp
    group = ranks is not None and ranks.world_size > 1  # under DDP every decision is rank 0's, broadcast

    def complete() -> bool:
        done = (root / "manifest.json").exists()
        return ranks.broadcast(done) if group else done

    if complete():
        log.info("model %s: cached at %s, reused (nothing trained)", name, root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    lock = FileLock(str(root) + ".lock") if _rank() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if complete():
            log.info("model %s: trained by another job at %s, reused (nothing trained)", name, root)
            return root
        start = time.time()
        examples = SFTExamples(tokenizer, prompts, answers, spec, cfg.max_length, cfg.loss_on, cfg.answer_prefix)
        if examples.cut:
            log.warning("model %s: %d of %d examples longer than tuning.max_length=%d had their prompt cut on the left",
                        name, examples.cut, len(examples), cfg.max_length)
        plan = training_plan(len(examples), cfg.batch_size, cfg.grad_accum, world, cfg.epochs, cfg.max_steps, cfg.seed)
        L.seed_everything(cfg.seed, verbose=False)  # the LoRA init
        model = load_causal_lm(base, revision, trust_remote_code)
        if cfg.method == "lora":
            model = add_lora(model, cfg, revision)
        model.train()
        module = CausalLMTuning(model, cfg.lr, len(plan), cfg.warmup_ratio, None, cfg.min_lr_ratio, cfg.weight_decay, lr_scale)
        work = root.with_name(f".{fp}.work")
        _, done = resume_point(work)
        loader = plan_loader(examples, plan, _rank(), done)
        log.info("tuning %s (%s, %d examples, %d optimizer steps of %d x %d x %d) -> %s", name, cfg.method, len(examples),
                 len(plan), cfg.batch_size, cfg.grad_accum, world, root)
        stats = fit(module, loader, len(plan), cfg.grad_accum, trainer_cfg, precision_for(cfg, trainer_cfg), work,
                    make_logger(cfg.logger, work / "logs", name), cfg.log_every_n_steps, save_every_n_steps=cfg.save_every_n_steps)
        if _rank() == 0:
            publish(model, tokenizer, root, work, module.full_state, {
                "kind": "layerprobe-model", "name": name, "method": cfg.method, "fingerprint": fp, "base": identity,
                "base_checkpoint": str(base), "data": {"hash": data_hash, "examples": len(examples), "tasks": tasks or [],
                                                      "answer_tokens": examples.answer_tokens()},
                "recipe": cfg.recipe(), "prompt": spec.fingerprint(), "chat": cfg.chat, "system_prompt": cfg.system_prompt,
                "train": {**stats, "seconds": round(time.time() - start, 2), "batch_size": cfg.batch_size,
                          "grad_accum": cfg.grad_accum},
            })
            log.info("model %s: trained in %.1f s (%d steps, final loss %s) -> %s", name, time.time() - start, stats["steps"],
                     stats["final_loss"], root)
    finally:
        if lock is not None:
            lock.release()
    if ranks is not None:
        ranks.barrier()
    return root


def publish(model, tokenizer, root: Path, work: Path, state: dict | None, manifest: dict) -> None:
    """Write weights (adapter only for LoRA), tokenizer and logs into a tmp dir, manifest last, then rename.

    state: the trained weights gathered from the ranks (FSDP; keys as in model.state_dict()), or None: the
    model's own weights (one device, DDP)."""
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        # a PeftModel saves the adapter alone (adapter_config.json + adapter_model.safetensors)
        if state is None:
            model.save_pretrained(tmp)
        else:
            skeleton(model).save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    if (work / "logs").exists():
        shutil.copytree(work / "logs", tmp / "logs")
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_bytes(tmp / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())
    shutil.rmtree(root, ignore_errors=True)  # a dir without manifest (never complete)
    os.replace(tmp, root)
    shutil.rmtree(work, ignore_errors=True)


def skeleton(model):
    """`model`'s structure on the meta device (no memory), without the FSDP wrappers that training left in it.

    save_pretrained takes the weights from the state_dict it is given, but peft finds the adapter's entries
    by walking the model's module names, which FSDP has changed (`..._fsdp_wrapped_module...`): saved from
    the trained model, the adapter would be empty. The skeleton has the original names, the same peft
    config (base, revision, target modules) and generation config."""
    import copy

    from peft import PeftModel, get_peft_model

    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    with torch.device("meta"):
        out = type(hf)._from_config(hf.config)
    out.generation_config = copy.deepcopy(hf.generation_config)
    if isinstance(model, PeftModel):
        out = get_peft_model(out, copy.deepcopy(model.peft_config[model.active_adapter]))
    return out


def read_manifest(path: str | Path) -> dict | None:
    p = Path(path).expanduser() / "manifest.json"
    if p.exists():
        try:
            meta = json.loads(p.read_text())
        except ValueError:
            return None
        return meta if meta.get("kind") == "layerprobe-model" else None
    return None
