"""The tuning stage: supervised fine-tuning of causal LMs, LoRA (peft) or full, inside Lightning.

    tune(base, prompts, answers, TuningConfig(...), cache_dir) -> ${cache_dir}/models/<fingerprint>/
    CausalLMTuning(model, lr, ..., lr_scale=...)   the LightningModule (also the demo's pre-training)
    SFTExamples(tokenizer, prompts, answers, spec, loss_on="answer"|"all")
    training_plan(...), plan_loader(...)            the fixed, resumable data order

layerprobe.tuning.controls makes the MOSSA models of a run: one control per task
(single-task) and the multi-task SFT model.
"""
from layerprobe.tuning.config import TuningConfig, TuningError, to_tuning_config
from layerprobe.tuning.data import SFTExamples, plan_loader, training_plan
from layerprobe.tuning.module import CausalLMTuning, warmup_cosine
from layerprobe.tuning.run import fit, read_manifest, tune

__all__ = ["TuningConfig", "TuningError", "to_tuning_config", "SFTExamples", "plan_loader", "training_plan", "CausalLMTuning",
           "warmup_cosine", "fit", "read_manifest", "tune"]
