"""Peak memory of extraction at n = 1k, 10k and 50k examples: it should be flat.

Each n runs in a fresh subprocess: a randomly initialised Llama (3 blocks, d=128, built
from a config and saved with save_pretrained) goes through the full extraction path
(`ensure_features`: Lightning predict loop, hooks, shard writes, consolidation into
features.npy). The features are [n, 4, 128] float32: 2 MB at 1k, 102 MB at 50k, so an
extraction that kept them in RAM would show it. Reported per n: the process's peak RSS
(VmHWM), its RSS just before extraction (interpreter, torch, model, the task's prompts),
and the growth between the two.

The last line is JSON: name, ratio = peak RSS at 50k / peak RSS at 1k (flat = about 1.0).
    python bench/memory.py            # about a minute on 2 CPU cores
    python bench/memory.py --quick    # n = 500, 2k, 5k
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(n: int, model_dir: str, cache_dir: str) -> None:
    import torch

    from conftest import WORDS
    from layerprobe.config import ExtractConfig
    from layerprobe.features.extract import ensure_features
    from layerprobe.tasks import finalize_task

    torch.set_num_threads(2)
    rng = random.Random(n)
    rows = [(f"m:{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))), i % 2) for i in range(n)]
    task = finalize_task("memory", "bench", "", ["a", "b"], rows, (0.6, 0.2, 0.2), 0)
    del rows
    cfg = ExtractConfig(batch_size=64, shard_size=512, max_length=64)
    trainer = {"accelerator": "cpu", "devices": 1}
    # Load the backbone once outside the measurement window: its weights are not data-dependent.
    from layerprobe.models import load_backbone

    load_backbone(model_dir)
    before = _status_mb("VmRSS")
    store = ensure_features("base", model_dir, [task], cfg, trainer, Path(cache_dir))["memory"]
    feats, _ = store.load()
    assert feats.shape[0] == n
    print(json.dumps({"n": n, "peak_mb": _status_mb("VmHWM"), "before_mb": before, "shape": list(feats.shape)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("N", "MODEL", "CACHE"))
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), args.child[1], args.child[2])

    from conftest import tiny_llama

    ns = [500, 2000, 5000] if args.quick else [1000, 10000, 50000]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama(Path(tmp) / "model", layers=3, hidden=128)
        for n in ns:
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(model), str(Path(tmp) / f"cache{n}")],
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"n={n} failed:\n{proc.stderr[-3000:]}")
            results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[n]
            print(f"n={n:>6}: peak RSS {r['peak_mb']:7.1f} MB, before extraction {r['before_mb']:7.1f} MB, "
                  f"growth {r['peak_mb'] - r['before_mb']:6.1f} MB, features {r['shape']}", file=sys.stderr)
    lo, hi = results[ns[0]], results[ns[-1]]
    print(json.dumps({
        "name": "extraction_peak_rss",
        "ratio": round(hi["peak_mb"] / lo["peak_mb"], 3),
        "target": "about 1.0 (flat in n)",
        "n": ns,
        "peak_mb": [round(results[n]["peak_mb"], 1) for n in ns],
        "growth_mb": [round(results[n]["peak_mb"] - results[n]["before_mb"], 1) for n in ns],
        "features_mb_at_max_n": round(hi["shape"][0] * hi["shape"][1] * hi["shape"][2] * 4 / 2**20, 1),
    }))


if __name__ == "__main__":
    main()
