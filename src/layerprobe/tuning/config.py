"""The tuning recipe (`tuning.*`, conf/tuning/): what makes a control or SFT model.

Every field that changes the trained weights enters the model-cache fingerprint
(`recipe_fingerprint`); the Lightning plumbing (`logger`, `save_every_n_steps`) does not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

from layerprobe.errors import LayerprobeError


class TuningError(LayerprobeError):
    """A tuning request that cannot work; the message names the key or the data and the fix."""


PRECISIONS = {"32": "32-true", "32-true": "32-true", "16": "16-mixed", "16-mixed": "16-mixed", "bf16": "bf16-mixed",
              "bf16-mixed": "bf16-mixed"}
# Not part of the recipe: how the run is logged and checkpointed.
PLUMBING = ("logger", "save_every_n_steps", "log_every_n_steps")


@dataclass
class TuningConfig:
    method: str = "lora"  # lora (peft adapter on the frozen base) | full (every weight trained)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # share of the optimizer steps spent in linear warmup
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    epochs: int = 3
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs (the data is cycled, reshuffled each pass)
    batch_size: int = 4  # per device
    grad_accum: int = 4
    precision: str = "32"  # 32 | 16 | bf16 (mixed precision; 16 needs a GPU)
    max_length: int = 1024  # tokens of prompt + answer; the prompt is cut on the left
    loss_on: str = "answer"  # answer (prompt tokens masked) | all (every token, e.g. pre-training)
    answer_prefix: str = " "  # put between the rendered prompt and the answer
    chat: bool = False  # render prompts in the tokenizer's chat template (as extraction does for chat roles)
    system_prompt: Optional[str] = None
    chat_template: Optional[str] = None  # null = the tokenizer's own; llama2 = Llama-2-chat's; or jinja text
    max_per_cluster: Optional[int] = 50000  # multi-task (SFT) runs: examples per task cluster, shared by its tasks
    seed: int = 0
    save_every_n_steps: int = 50  # resume points (Lightning checkpoints of the trained weights only)
    log_every_n_steps: int = 10
    logger: Any = "csv"  # csv | tensorboard | null | a {_target_: ...} Lightning logger

    def __post_init__(self):
        def bad(key, value, allowed):
            raise TuningError(f"tuning.{key}={value!r} is not valid; use one of {', '.join(map(str, allowed))}")

        if self.method not in ("lora", "full"):
            bad("method", self.method, ["lora", "full"])
        if self.loss_on not in ("answer", "all"):
            bad("loss_on", self.loss_on, ["answer", "all"])
        self.precision = str(self.precision)
        if self.precision not in PRECISIONS:
            bad("precision", self.precision, ["32", "16", "bf16"])
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        for key in ("lora_r", "epochs", "batch_size", "grad_accum", "save_every_n_steps"):
            if getattr(self, key) < 1:
                raise TuningError(f"tuning.{key} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise TuningError("tuning.max_steps must be >= 1 (or null: tuning.epochs decides)")
        if self.max_length < 4:
            raise TuningError("tuning.max_length must be >= 4")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise TuningError("tuning.warmup_ratio must be in [0, 1) and tuning.min_lr_ratio in [0, 1]")

    def recipe(self) -> dict:
        """What changes the weights (the model-cache fingerprint's recipe part)."""
        out = {k: v for k, v in asdict(self).items() if k not in PLUMBING}
        out["precision"] = PRECISIONS[self.precision]
        if self.method == "full":
            for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules"):
                out.pop(k)
        return out


def to_tuning_config(node) -> TuningConfig:
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    known = set(TuningConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise TuningError(f"unknown key(s) {unknown} for tuning; valid: {sorted(known)}")
    return TuningConfig(**data)
