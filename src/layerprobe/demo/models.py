"""Build the demo pair offline: a word-level tokenizer, a tiny Llama pre-trained on the raw
demo texts, and that base instruction-tuned on the seen demo tasks.

Pre-training (next-token loss on every token) reads the task inputs without instructions
or answers, plus short statements of the lexicon's facts ("the hawk is a bird", "awful is a
negative word"): like a real pre-trained model, the base knows the categories but has never
been asked a question. Instruction tuning (loss on the answer tokens only) then teaches it
to answer each seen task's instruction from that knowledge, at the prompt's last token.

Tuning uses a learning rate that grows with depth (embeddings frozen, block l of L at
lr * (l/L)^p): instruction tuning is known to leave early layers nearly unchanged and move
later ones (the study's sections), and the demo makes that property explicit so the
pipeline has a real, known pattern to recover. All training data comes from other seeds
than the probe data, so probes are never scored on examples the models were trained on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock
from torch.utils.data import DataLoader

from layerprobe.models.load import quiet_transformers
from layerprobe.progress import StepsProgressBar
from layerprobe.tuning.data import SFTExamples
from layerprobe.tuning.module import CausalLMTuning
from layerprobe.tasks.demo import DEMO_TASKS, demo_examples, knowledge_texts, render

log = logging.getLogger(__name__)
DEMO_VERSION = 2
SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def demo_key(cfg) -> str:
    blob = json.dumps({"version": DEMO_VERSION, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def demo_corpus(cfg) -> tuple[list[str], list[str], list[str]]:
    """(raw pre-training texts, tuning prompts, tuning answers), from seeds the probe data never uses."""
    raw, prompts, answers = [], [], []
    for task in DEMO_TASKS.values():
        for text, answer in demo_examples(task, cfg.examples_per_task, seed=10_000 + cfg.seed):
            raw.append(text)
            if task.seen:
                prompts.append(render(task, text))
                answers.append(answer)
    raw += knowledge_texts(cfg.knowledge_texts, seed=10_000 + cfg.seed)
    return raw, prompts, answers


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values())))
    bos = SPECIAL["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **SPECIAL)


def _train(model, dataset: SFTExamples, steps: int, cfg, lr_scale=None, desc: str = "") -> float:
    """The tuning stage's module (layerprobe.tuning): warmup over 5% of the steps, cosine to 0.1 x lr."""
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=dataset.collate, drop_last=True)
    module = CausalLMTuning(model, cfg.lr, total_steps=steps, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1,
                            lr_scale=lr_scale)
    log.info("demo model: %s (%d steps)", desc, steps)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=10, callbacks=[StepsProgressBar()])
    trainer.fit(module, loader)
    return float(trainer.callback_metrics.get("loss", torch.tensor(float("nan"))))


def depth_lr_scale(num_layers: int, power: float):
    def scale(name: str) -> float:
        if "embed_tokens" in name:
            return 0.0
        m = re.search(r"layers\.(\d+)\.", name)
        if m:
            return ((int(m.group(1)) + 1) / num_layers) ** power
        return 1.0  # final norm and LM head

    return scale


def build_demo_pair(cfg, cache_dir: Path) -> tuple[Path, Path]:
    """Return (base_dir, tuned_dir), building them on first use; later calls return at once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(cache_dir) / "demo_models" / demo_key(cfg)
    base_dir, tuned_dir = root / "base", root / "tuned"
    if (root / "build_info.json").exists():
        return base_dir, tuned_dir
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "build_info.json").exists():  # built by a concurrent job while we waited
            return base_dir, tuned_dir
        log.info("building the demo model pair once into %s", root)
        L.seed_everything(cfg.seed, verbose=False)
        raw, prompts, answers = demo_corpus(cfg)
        tokenizer = build_tokenizer(raw + prompts + answers)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
            max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
        for stale in root.parent.glob(f".{root.name}.*.tmp"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
        pretrain_texts = SFTExamples(tokenizer, raw, None, max_length=64, loss_on="all", truncation="right")
        base_loss = _train(model, pretrain_texts, cfg.pretrain_steps, cfg, desc="pre-training the base on raw texts")
        with quiet_transformers():
            model.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
        tune_loss = _train(model, SFTExamples(tokenizer, prompts, answers, max_length=64), cfg.tune_steps, cfg,
                           depth_lr_scale(cfg.num_layers, cfg.depth_lr_power), desc="instruction-tuning on the seen tasks")
        with quiet_transformers():
            model.save_pretrained(tmp / "tuned")
            tokenizer.save_pretrained(tmp / "tuned")
        info = {"config": asdict(cfg), "version": DEMO_VERSION, "pretrain_loss": base_loss, "tune_answer_loss": tune_loss,
                "seen_tasks": [t.name for t in DEMO_TASKS.values() if t.seen]}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)  # the pair appears complete or not at all
    return base_dir, tuned_dir
