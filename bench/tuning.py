"""LoRA training step throughput: layerprobe's tuning stage vs a bare peft + torch loop.

Same model (a Llama built from a config, 4 blocks x 256, vocab 4096), same LoRA (q_proj,
v_proj, r=8), same batches (the tuning stage's plan: batch 8, sequences of ~96 tokens),
same AdamW + warmup/cosine schedule, 32-bit on the CPU. Ours: CausalLMTuning inside a
Lightning Trainer fed by the plan loader (what `tune()` runs). Baseline: the loop a user
would write by hand. Steps 0..WARM are not timed in either. Prints both rates and the final
losses (they must agree), then a JSON line: ratio = our tokens/s / baseline tokens/s
(target >= 0.9).
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("PYTHONWARNINGS", "ignore")
STEPS, WARM, BATCH, SEQ = 60, 5, 8, 96


def build(seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def batches(n=STEPS * BATCH, seed=0):
    import numpy as np
    import torch

    from layerprobe.tuning.data import training_plan

    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        length = int(rng.integers(SEQ - 16, SEQ + 16))
        ids = rng.integers(5, 4096, length).tolist()
        cut = length // 2
        items.append((ids, [-100] * cut + ids[cut:]))  # loss on the "answer" half
    plan = training_plan(n, BATCH, 1, 1, 1, STEPS, seed)

    def collate(idx):
        rows = [items[i] for i in idx]
        width = max(len(r[0]) for r in rows)
        x = torch.zeros((len(rows), width), dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        m = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (ids, lab) in enumerate(rows):
            x[j, : len(ids)], y[j, : len(lab)], m[j, : len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
        return {"input_ids": x, "attention_mask": m, "labels": y}

    return [collate(step[0][0].tolist()) for step in plan]


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def tokens(data):
    return sum(int(b["attention_mask"].sum()) for b in data[WARM:])


def baseline(data):
    import torch

    from layerprobe.tuning.module import warmup_cosine

    torch.manual_seed(1)
    model = lora(build()).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, STEPS, 3, 0.0))
    for i, batch in enumerate(data):
        if i == WARM:
            t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, float(loss)


def ours(data):
    import lightning as L
    import torch

    from layerprobe.tuning.module import CausalLMTuning

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            if idx == WARM:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.t1 = time.perf_counter()

    torch.manual_seed(1)
    module = CausalLMTuning(lora(build()).train(), lr=1e-3, total_steps=STEPS, warmup_steps=3)
    clock = Clock()
    trainer = L.Trainer(max_steps=STEPS, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, callbacks=[clock], use_distributed_sampler=False,
                        num_sanity_val_steps=0)
    from torch.utils.data import DataLoader

    loader = DataLoader(data, batch_size=None, shuffle=False, collate_fn=lambda b: b)  # the same batches, in order
    trainer.fit(module, loader)
    return clock.t1 - clock.t0, float(trainer.callback_metrics["loss"])


def main():
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    data = batches()
    n = tokens(data)
    base_s, base_loss = baseline(data)
    our_s, our_loss = ours(data)
    base_s2, _ = baseline(data)  # again: the first pass also warms the allocator
    base_s = min(base_s, base_s2)
    print(f"bare peft + torch loop: {n / base_s:,.0f} tokens/s ({base_s:.2f} s), final loss {base_loss:.5f}", file=sys.stderr)
    print(f"layerprobe tuning:      {n / our_s:,.0f} tokens/s ({our_s:.2f} s), final loss {our_loss:.5f}", file=sys.stderr)
    print(json.dumps({"name": "tuning_lora_step_vs_bare_peft_loop", "ratio": round(base_s / our_s, 3), "target": ">= 0.9",
                      "ours_tokens_per_s": round(n / our_s), "baseline_tokens_per_s": round(n / base_s),
                      "final_loss_ours": round(our_loss, 5), "final_loss_baseline": round(base_loss, 5), "steps_timed": STEPS - WARM,
                      "tokens_timed": n, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
