"""K LoRA control models: features by adapter swap on one base vs loading K merged checkpoints.

A Llama built from a config (8 blocks x 512, vocab 8192; ~45 M parameters) is saved as the
base; K=6 LoRA adapters (q_proj, v_proj, r=8, random non-zero B) are saved beside it, and
each is also merged into a full checkpoint (not timed). Timed, per side: everything from
the saved dirs to the features of 64 prompts per control (reading weights, building the
model, one capture pass). Ours: layerprobe.models.load.AdapterSet (base read once, each
adapter loaded on it, `set_adapter` per control). Baseline: `load_backbone` of each merged
checkpoint. Checks that both give the same features (max abs diff printed), then a JSON
line: ratio = merged time / swap time.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTHONWARNINGS", "ignore")
K, PROMPTS = 6, 64


def setup(root: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(8188)]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, max_position_embeddings=256, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for k in range(K):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(k))
        model.save_pretrained(root / f"adapter{k}")
        tokenizer.save_pretrained(root / f"adapter{k}")
        model.merge_and_unload().save_pretrained(root / f"merged{k}")
        tokenizer.save_pretrained(root / f"merged{k}")
    import numpy as np

    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(24, 40)))) for _ in range(PROMPTS)]


def capture(backbone, tokenizer, prompts):
    from layerprobe.models import LayerCapture, PromptEncoder

    enc = PromptEncoder(tokenizer)
    ids, attention, pool = enc.pad(enc.encode(prompts))
    with LayerCapture(backbone) as cap:
        return cap(ids, attention, pool)


def main():
    import torch

    from layerprobe.models import load_backbone
    from layerprobe.models.load import AdapterSet

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = setup(root)
        t0 = time.perf_counter()
        merged = []
        for k in range(K):
            model, tok = load_backbone(str(root / f"merged{k}"))
            merged.append(capture(model, tok, prompts))
            del model
        merged_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        swap = AdapterSet(str(root / "base"))
        for k in range(K):
            swap.add(f"c{k}", str(root / f"adapter{k}"))
        swapped = [capture(*swap.activate(f"c{k}"), prompts) for k in range(K)]
        swap_s = time.perf_counter() - t0
    diff = max(float((a - b).abs().max()) for a, b in zip(swapped, merged))
    print(f"{K} merged checkpoints: {merged_s:.2f} s; adapter swap on one base: {swap_s:.2f} s; max |diff| {diff:.2e}", file=sys.stderr)
    print(json.dumps({"name": "controls_adapter_swap_vs_merged_checkpoints", "ratio": round(merged_s / swap_s, 2),
                      "merged_s": round(merged_s, 2), "swap_s": round(swap_s, 2), "controls": K, "prompts": PROMPTS,
                      "max_abs_feature_diff": diff, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
