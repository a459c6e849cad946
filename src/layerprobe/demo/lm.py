"""A small Lightning module that trains a causal LM on (prompt, answer) sequences.

Used twice by the demo: next-token pre-training on raw texts (loss on every token) and
instruction tuning (loss on the answer only, as in supervised fine-tuning).
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import Dataset


class LMExamples(Dataset):
    """Token ids with labels; prompt tokens get label -100 when only the answer is trained."""

    def __init__(self, tokenizer, prompts: list[str], answers: list[str] | None, max_length: int = 64):
        self.items = []
        for i, prompt in enumerate(prompts):
            prompt_ids = tokenizer(prompt)["input_ids"]
            if answers is None:
                ids, labels = prompt_ids + [tokenizer.eos_token_id], None
            else:
                answer_ids = tokenizer(" " + answers[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                ids = prompt_ids + answer_ids
                labels = [-100] * len(prompt_ids) + answer_ids
            ids = ids[:max_length]
            self.items.append((ids, (labels or ids)[:max_length]))
        self.pad_id = tokenizer.pad_token_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, batch):
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class CausalLMTraining(L.LightningModule):
    """AdamW with warmup + cosine decay; `lr_scale` gives each parameter group its own factor."""

    def __init__(self, model, lr: float, max_steps: int, lr_scale=None):
        super().__init__()
        self.model = model
        self.lr, self.max_steps = lr, max_steps
        self.lr_scale = lr_scale  # callable(param name) -> factor, or None

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        groups: dict[float, list] = {}
        for name, param in self.model.named_parameters():
            scale = self.lr_scale(name) if self.lr_scale else 1.0
            if scale == 0:
                param.requires_grad_(False)
                continue
            groups.setdefault(scale, []).append(param)
        opt = torch.optim.AdamW([{"params": p, "lr": self.lr * s} for s, p in groups.items()], lr=self.lr, weight_decay=0.0)
        warmup = max(1, self.max_steps // 20)

        def schedule(step):
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, self.max_steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}
