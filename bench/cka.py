"""Benchmark: the full 25 x 25 debiased CKA matrix vs the study's one-pair-at-a-time loop.

Task: two models, n=2000 examples, 25 layers, d=1024 (float32 features, as the store keeps
them). Ours computes all 625 layer pairs of debiased CKA with `cka_matrix`; the reference
computes only the 25 matched pairs, one at a time, with a straightforward float64 numpy
feature-space linear CKA. ratio = our time / reference time (target <= 1.0). Each side runs
in its own fresh process (the reference without torch), alternating, best of --repeats.

Then the streaming path's peak memory at several n (subprocesses, anonymous RSS sampled
while it runs), to show that it does not grow with n.

The last line is JSON with `name` and `ratio`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def reference_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The study's way: float64, centre, feature-space Frobenius norms (Kornblith et al. 2019)."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def make_features(n: int, layers: int, d: int, seed: int = 0):
    """Two related 'models': b is a, its features shuffled and rescaled, plus noise; float32."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, layers, d), dtype=np.float32)
    b = 0.8 * a[:, :, rng.permutation(d)] + 0.6 * rng.standard_normal((n, layers, d), dtype=np.float32)
    return a, b


def _time_worker(which: str, path: str) -> None:
    """Time one side in a fresh process: the reference never imports torch, and neither side
    inherits the other's BLAS/OpenMP thread pools."""
    a, b = np.load(os.path.join(path, "a.npy")), np.load(os.path.join(path, "b.npy"))
    layers = a.shape[1]
    if which == "ours":
        from layerprobe.similarity import cka_matrix

        cka_matrix(a[:64], b[:64], debiased=True)  # warm-up: imports and thread pools
        t = time.perf_counter()
        out = cka_matrix(a, b, debiased=True)
        elapsed = time.perf_counter() - t
        assert out.shape == (layers, layers) and np.isfinite(out).all()
    else:
        reference_linear_cka(a[:64, 0], b[:64, 0])
        t = time.perf_counter()
        out = [reference_linear_cka(a[:, l], b[:, l]) for l in range(layers)]
        elapsed = time.perf_counter() - t
        assert len(out) == layers
    print(json.dumps({"seconds": elapsed}))


def time_matrix(n: int, layers: int, d: int, repeats: int) -> dict:
    """Best of `repeats` runs of each side, alternating, so load from elsewhere hits both alike."""
    times = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        a, b = make_features(n, layers, d)
        np.save(os.path.join(tmp, "a.npy"), a)
        np.save(os.path.join(tmp, "b.npy"), b)
        del a, b
        for _ in range(repeats):
            for which in times:
                cmd = [sys.executable, __file__, "--time-worker", which, tmp]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                times[which].append(json.loads(res.stdout.strip().splitlines()[-1])["seconds"])
    return {"ours_s": min(times["ours"]), "reference_s": min(times["reference"])}


# ----------------------------------------------------------------------------------------
# Streaming memory: one subprocess per n, so each peak is measured from a fresh process


def _peak_worker(path: str, n: int, layers: int, d: int, batch: int, mode: str) -> None:
    import torch

    from layerprobe.similarity.stream import minibatch_cka, streaming_cka

    torch.set_num_threads(2)
    a = np.load(os.path.join(path, "a.npy"), mmap_mode="r")[:n]
    b = np.load(os.path.join(path, "b.npy"), mmap_mode="r")[:n]
    peak = [0]
    base = _rss_anon()
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon() - base)
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    if mode == "moments":
        streaming_cka(a, b, batch_size=batch)
    else:
        minibatch_cka(a, b, batch_size=batch)
    done.set()
    watcher.join()
    print(json.dumps({"peak_mb": peak[0] / 2**20}))


def _rss_anon() -> int:
    # Anonymous memory only: pages of the memory-mapped store are file cache, not our allocation.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def streaming_peaks(ns, layers: int, d: int, batch: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        big = max(ns)
        for name, seed in (("a", 1), ("b", 2)):
            arr = np.lib.format.open_memmap(os.path.join(tmp, f"{name}.npy"), mode="w+", dtype=np.float16, shape=(big, layers, d))
            rng = np.random.default_rng(seed)
            for s in range(0, big, 4096):
                arr[s : s + 4096] = rng.standard_normal((min(4096, big - s), layers, d), dtype=np.float32)
            arr.flush()
            del arr
        for mode in ("moments", "minibatch"):
            for n in ns:
                cmd = [sys.executable, __file__, "--peak-worker", tmp, str(n), str(layers), str(d), str(batch), mode]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                out[f"{mode}_n{n}"] = round(json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-ns", type=int, nargs="*", default=[4000, 16000, 64000])
    parser.add_argument("--peak-worker", nargs=6, metavar=("DIR", "N", "LAYERS", "D", "BATCH", "MODE"))
    parser.add_argument("--time-worker", nargs=2, metavar=("WHICH", "DIR"))
    args = parser.parse_args()
    if args.time_worker:
        _time_worker(*args.time_worker)
        return
    if args.peak_worker:
        path, n, layers, d, batch, mode = args.peak_worker
        _peak_worker(path, int(n), int(layers), int(d), int(batch), mode)
        return

    t = time_matrix(args.n, args.layers, args.d, args.repeats)
    ratio = t["ours_s"] / t["reference_s"]
    pairs_ours, pairs_ref = args.layers**2, args.layers
    per_pair_speedup = (t["reference_s"] / pairs_ref) / (t["ours_s"] / pairs_ours)
    print(f"full {args.layers}x{args.layers} debiased CKA matrix (n={args.n}, d={args.d}): {t['ours_s']:.3f} s")
    print(f"reference loop, {args.layers} matched pairs, float64 numpy linear CKA: {t['reference_s']:.3f} s")
    print(f"ratio ours/reference: {ratio:.3f}   per-pair speedup: {per_pair_speedup:.1f}x")

    peaks = streaming_peaks(args.stream_ns, layers=4, d=256, batch=1024)
    for key, mb in peaks.items():
        print(f"streaming peak anonymous memory {key}: {mb} MB")
    print(json.dumps({
        "name": "cka_full_debiased_matrix_vs_diagonal_loop",
        "ratio": round(ratio, 4),
        "ours_s": round(t["ours_s"], 4),
        "reference_s": round(t["reference_s"], 4),
        "per_pair_speedup": round(per_pair_speedup, 2),
        "n": args.n,
        "layers": args.layers,
        "d": args.d,
        "stream_peak_mb": peaks,
    }))


if __name__ == "__main__":
    main()
