"""The tuning stage: supervised fine-tuning of causal LMs, LoRA (peft) or full, inside Lightning.

    tune(base, prompts, answers, TuningConfig(...), cache_dir) -> ${cache_dir}/models/<fingerprint>/
    CausalLMTuning(model, lr, ..., lr_scale=...)   the LightningModule (also the demo's pre-training)
    SFTExamples(tokenizer, prompts, answers, spec, loss_on="answer"|"all")
    training_plan(...), plan_loader(...)            the fixed, resumable data order

layerprobe.tuning.controls makes the MOSSA models of a run: one control per task
(single-task) and the multi-task SFT model.

Only the config is imported eagerly: the rest (torch, Lightning) loads on first use, so the
command-line checks that read TuningConfig before Hydra starts stay fast.
"""
import importlib

from layerprobe.tuning.config import TuningConfig, TuningError, to_tuning_config

_LAZY = {"SFTExamples": "data", "plan_loader": "data", "training_plan": "data", "CausalLMTuning": "module",
         "warmup_cosine": "module", "fit": "run", "read_manifest": "run", "tune": "run"}

__all__ = ["TuningConfig", "TuningError", "to_tuning_config", "SFTExamples", "plan_loader", "training_plan", "CausalLMTuning",
           "warmup_cosine", "fit", "read_manifest", "tune"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
