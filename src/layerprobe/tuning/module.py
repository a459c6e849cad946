"""The LightningModule that fine-tunes a causal LM: SFT (loss on the answer) or pre-training (every token).

AdamW over the trainable parameters only, linear warmup then cosine decay to
`lr * min_lr_ratio`, stepped per optimizer step. `lr_scale(name) -> factor` gives each
parameter its own learning-rate factor (parameter groups; 0 freezes it): the demo tunes
block l of L at lr * (l/L)^p with frozen embeddings. LoRA comes from peft
(`get_peft_model`), never written by hand; the checkpoints Lightning writes for resume
hold the trained parameters only, so a 7B base never lands in them.
"""
from __future__ import annotations

import math

import lightning as L
import torch

# Wrappers that FSDP (and its activation checkpointing) insert into parameter names; state dicts use the clean names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The lr factor at optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    # cos in float32, as torch computes it (the demo's original schedule; keeps its numerics bit-identical)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + torch.cos(torch.tensor(min(progress, 1.0) * math.pi)).item())


class CausalLMTuning(L.LightningModule):
    """Trains `model` (a causal LM, plain or a peft model) on batches with `labels` (-100 = no loss).

    total_steps: optimizer steps of the run (None: Lightning's estimate from the loader);
    warmup_steps overrides warmup_ratio.
    """

    def __init__(self, model, lr: float, total_steps: int | None = None, warmup_ratio: float = 0.0,
                 warmup_steps: int | None = None, min_lr_ratio: float = 0.0, weight_decay: float = 0.0, lr_scale=None):
        super().__init__()
        self.model = model
        self.lr, self.total_steps, self.weight_decay = lr, total_steps, weight_decay
        self.warmup_ratio, self.warmup_steps, self.min_lr_ratio = warmup_ratio, warmup_steps, min_lr_ratio
        self.lr_scale = lr_scale  # callable(param name) -> factor, or None
        self.strict_loading = False  # resume checkpoints hold the trained parameters only
        self.full_state = None  # set by layerprobe.tuning.run.fit under FSDP: the gathered weights (rank 0)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def trained_names(self) -> set[str]:
        """State-dict keys of the parameters this module trains: requires_grad and an lr factor other than 0
        (known before configure_optimizers freezes the factor-0 ones). Clean names: FSDP's wrappers rename parameters."""
        names = set()
        for name, param in self.model.named_parameters():
            name = clean_name(name)
            if param.requires_grad and (self.lr_scale is None or self.lr_scale(name) != 0):
                names.add(f"model.{name}")
        return names

    def configure_optimizers(self):
        groups: dict[float, list] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            scale = self.lr_scale(clean_name(name)) if self.lr_scale else 1.0
            if scale == 0:
                param.requires_grad_(False)
                continue
            groups.setdefault(scale, []).append(param)
        opt = torch.optim.AdamW([{"params": p, "lr": self.lr * s} for s, p in groups.items()], lr=self.lr,
                                weight_decay=self.weight_decay)
        total = self.total_steps or int(self.trainer.estimated_stepping_batches)
        warmup = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total)

        def schedule(step):
            return warmup_cosine(step, total, warmup, self.min_lr_ratio)

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trained = self.trained_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint:
            return  # FSDP: the strategy loaded the weights already (run.fit checked them first)
        missing = self.trained_names() - set(checkpoint["state_dict"])
        if missing:
            raise RuntimeError(f"resume checkpoint lacks trained parameters, e.g. {sorted(missing)[:3]}")
