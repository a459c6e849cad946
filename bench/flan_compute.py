"""The compute `experiment=layer_by_layer` needs, from a measured per-example cost scaled by FLOPs.

Measures the full extraction path (prompt encoding, Lightning predict loop, hooks on every
block, pooling, shard writes) on a randomly initialised model with SmolLM2-135M's shape
(30 blocks, d=576) on this machine's CPU, at a fixed prompt length. The per-example cost is
turned into achieved FLOP/s, then scaled to the experiment's model pair by FLOPs per example
(2 x non-embedding parameters x tokens + attention). GPU hours need one assumption, the
sustained bf16 throughput of a forward pass (default: 40% of an A100's 312 TFLOP/s).
Prints one JSON line; docs/models.md quotes it.

    python bench/flan_compute.py [--tokens 256] [--examples 64] [--gpu-tflops 125]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ROOT = Path(__file__).resolve().parents[1]


def flops_per_example(non_embedding_params: float, layers: int, d: int, tokens: int) -> float:
    """Forward FLOPs of one prompt: 2 per weight per token, plus QK^T and AV over the causal context."""
    return 2 * non_embedding_params * tokens + 2 * layers * tokens * tokens * d


def non_embedding_parameters(config) -> int:
    from layerprobe.models import count_parameters

    return count_parameters(config) - config.vocab_size * config.hidden_size


def measure(tokens: int, examples: int) -> dict:
    from conftest import WORDS, word_tokenizer
    from transformers import LlamaConfig, LlamaModel

    from layerprobe.config import ExtractConfig
    from layerprobe.features.extract import FeatureExtractor, run_extraction
    from layerprobe.features.store import FeatureStore
    from layerprobe.tasks import finalize_task

    torch.manual_seed(0)
    tok = word_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=tokens + 8)
    model = LlamaModel(config).eval().requires_grad_(False)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(tokens - 1)) for _ in range(examples)]  # + BOS = tokens
    task = finalize_task("bench", "bench", "", ["a", "b"], [(f"b:{i}", t, i % 2) for i, t in enumerate(texts)], (0.6, 0.2, 0.2), 0)
    cfg = ExtractConfig(batch_size=16, shard_size=examples, max_length=tokens, store_dtype="float16")
    trainer = {"accelerator": "cpu", "devices": 1}
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(Path(tmp) / "store")
        run_extraction(FeatureExtractor(model, tok, cfg), task, store, cfg, trainer, "bench", {"task": "bench"})  # warm-up
        store = FeatureStore(Path(tmp) / "store2")
        t0 = time.perf_counter()
        run_extraction(FeatureExtractor(model, tok, cfg), task, store, cfg, trainer, "bench", {"task": "bench"})
        seconds = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in store.root.rglob("features.npy"))
    flops = flops_per_example(non_embedding_parameters(config), 30, 576, tokens)
    return {"seconds_per_example": seconds / examples, "flops_per_example": flops,
            "cpu_flops_per_s": flops * examples / seconds, "disk_bytes_per_example": disk / examples,
            "threads": torch.get_num_threads()}


def experiment_examples() -> tuple[int, int]:
    """(probe examples, extra task_id/cluster_id contrast examples) per model for experiment=layer_by_layer,
    assuming every task has at least its cap of rows in the data."""
    from hydra import compose, initialize_config_dir

    from layerprobe.config import TaskConfig, register_configs, to_dataclass
    from layerprobe.tasks.flan import FLAN_TASKS, _caps

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_dataclass(TaskConfig, compose("train", overrides=["experiment=layer_by_layer"]).task)
    caps = _caps(list(FLAN_TASKS), cfg)
    own = sum(caps.values())
    contrast = sum(n for name, n in caps.items() if FLAN_TASKS[name].target in ("task_id", "cluster_id"))
    return own, contrast


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256, help="mean prompt length in tokens (Flan prompts, cut at 512)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--gpu-tflops", type=float, default=125.0, help="sustained bf16 forward throughput of one GPU")
    args = parser.parse_args()

    m = measure(args.tokens, args.examples)
    # Llama-2-7B: 32 blocks, d=4096, ffn 11008, vocab 32000 (AutoModel: no LM head)
    from transformers import LlamaConfig

    llama2 = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    big_flops = flops_per_example(non_embedding_parameters(llama2), 32, 4096, args.tokens)
    own, contrast = experiment_examples()
    per_model = own + contrast
    forwards = 2 * per_model  # base and tuned
    scale = big_flops / m["flops_per_example"]
    gpu_hours = forwards * big_flops / (args.gpu_tflops * 1e12) / 3600
    cache_bytes = forwards * 33 * 4096 * 2  # [L+1, d] float16 per example and model
    print(json.dumps({
        "name": "layer_by_layer_compute", "tokens_per_example": args.tokens,
        "measured": {"model": "SmolLM2-135M shape, random init", "seconds_per_example_cpu": round(m["seconds_per_example"], 4),
                     "cpu_gflops_per_s": round(m["cpu_flops_per_s"] / 1e9, 1), "threads": m["threads"],
                     "disk_bytes_per_example": int(m["disk_bytes_per_example"])},
        "llama2_7b": {"flops_per_example": f"{big_flops:.3e}", "flops_ratio_to_measured": round(scale, 1),
                      "cpu_seconds_per_example": round(m["seconds_per_example"] * scale, 1)},
        "experiment": {"examples_per_model": per_model, "of_which_contrast": contrast, "forward_passes": forwards,
                       "gpu_tflops_assumed": args.gpu_tflops, "gpu_hours": round(gpu_hours, 2),
                       "cpu_core_hours_at_measured_rate": round(forwards * m["seconds_per_example"] * scale * m["threads"] / 3600),
                       "feature_cache_gib": round(cache_bytes / 1024**3, 1),
                       "model_download_gib": round(2 * 6.74e9 * 2 / 1024**3, 1)},
    }))


if __name__ == "__main__":
    main()
