"""Capturing, pooling and writing every layer vs a bare forward pass over the same batches.

Model: a randomly initialised Llama (12 blocks, d=512) built from a config; 1024 prompts.
Ours: the full extraction path (Lightning predict loop, hooks on every block, pooling,
atomic shard writes, consolidation into the memory-mapped store). Baseline: the same
model called on the same micro-batches with no hooks and nothing kept.
Prints a JSON line: ratio = our time / bare forward time (target <= 1.10).
"""
from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    from conftest import WORDS, word_tokenizer
    from transformers import LlamaConfig, LlamaModel

    from layerprobe.config import ExtractConfig
    from layerprobe.features.extract import FeatureExtractor, run_extraction
    from layerprobe.features.store import FeatureStore
    from layerprobe.tasks import finalize_task

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = word_tokenizer()
    model = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=12,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)).eval()
    model.requires_grad_(False)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(1024)]
    task = finalize_task("bench", "bench", "", ["a", "b"], [(f"b:{i}", t, i % 2) for i, t in enumerate(texts)], (0.6, 0.2, 0.2), 0)
    cfg = ExtractConfig(batch_size=32, shard_size=256, max_length=128)
    trainer = {"accelerator": "cpu", "devices": 1}

    # The same micro-batches the extractor forms: length-sorted within each shard.
    batches = []
    for start in range(0, len(texts), cfg.shard_size):
        shard = texts[start : start + cfg.shard_size]
        order = np.argsort([len(ids) for ids in tok(shard)["input_ids"]], kind="stable")
        for b in range(0, len(shard), cfg.batch_size):
            batches.append(tok([shard[i] for i in order[b : b + cfg.batch_size]], padding=True, truncation=True,
                               max_length=cfg.max_length, return_tensors="pt"))

    def bare():
        with torch.no_grad():
            for enc in batches:
                model(**enc, use_cache=False)

    def ours():
        with tempfile.TemporaryDirectory() as tmp:
            store = FeatureStore(Path(tmp) / "store")
            run_extraction(FeatureExtractor(model, tok, cfg), task, store, cfg, trainer, "bench", {"task": "bench"})
            assert store.load()[0].shape == (len(texts), 13, 512)

    bare()  # warm-up
    times = {"bare": [], "ours": []}
    for _ in range(3):  # interleaved repeats; report the best of each
        for name, fn in (("bare", bare), ("ours", ours)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    b, o = min(times["bare"]), min(times["ours"])
    print(f"bare forward {b:.2f} s, capture+pool+write {o:.2f} s (best of 3)", file=sys.stderr)
    print(json.dumps({"name": "extraction_vs_bare_forward", "ratio": round(o / b, 3), "target": "<= 1.10",
                      "bare_s": round(b, 3), "ours_s": round(o, 3), "examples": len(texts), "layers": 13, "d": 512}))


if __name__ == "__main__":
    main()
