"""Error rates of section detection (analysis/sections.py), by simulation: the figures in docs/analysis.md.

    python bench/sections_calibration.py --part fpr --tasks 8 --reps 8000 --out fpr_T8.json      # one chunk
    python bench/sections_calibration.py --part planted --tasks 8,16,64 --reps 400 --out planted.json
    python bench/sections_calibration.py --merge fpr_T8.json fpr_T16.json fpr_T64.json planted.json

Data: T tasks x 33 layers (0..32). Each task's curve is a mean shape times a per-task
amplitude (uniform 0.5-1.5 for the null shapes, 0.3-0.6 for the plant) plus noise that is
correlated across layers (AR(1), rho = 0.7, SD 0.05 per layer) - the same for every scenario.

* false-positive rate (``--part fpr``): share of structureless data sets where sections are
  ``found`` (flat, linear, quadratic, saturating 1 - exp(-3x), logistic with slope 6 over the
  depth), at the library defaults (section_alpha 0.05, 1000 resamples). ``found`` is decided by
  the smooth-vs-3-sections sign-flip test alone, so the data sets of a cell are tested in
  batches through the same function ``count_sections`` uses (``KinkModels.smooth_test_stats``
  with ``distinct_flips`` drawn per data set). Each rate comes with its Clopper-Pearson 95%
  interval and with the exact size of the test, the rate a calibrated test must show: for
  continuous data P(p < alpha) = (ceil(alpha K) - 1) / K with K = 2^(T-1) distinct flips
  (all enumerated) or K = B + 1 (B random flips; B = ``flip_count(resamples, alpha)``, 999 at the
  defaults).
* detection (``--part planted``): planted sections shared 0-9 / transition 10-15 / refinement
  16-32 (the study's map) through ``count_sections``: share found, share with 3 sections, share
  with both boundaries within one layer; boundary CI coverage: share of 95% task-bootstrap
  intervals holding the planted boundary, among the found 3-section fits.

Chunks (``--tasks``, ``--kinds``, seeds derived from ``--seed`` and the cell) write JSON with
the counts; ``--merge`` pools them and prints the table rows and the pooled rate. Every chunk
also prints its wall time and ``os.getloadavg()``.
"""

import argparse
import json
import math
import os
import time
import zlib

import numpy as np
from layerprobe.analysis.sections import (
    KinkModels, boundary_bootstrap, count_sections, distinct_flips, flip_count, flip_p_value, null_degree,
)

LAYERS = np.arange(33)
KINDS = ("flat", "linear", "quadratic", "saturating", "logistic")
ALPHAS = (0.01, 0.05, 0.10)


def noise(rng, t, size=()):
    e = rng.normal(0, 0.05, size + (t, len(LAYERS)))
    for i in range(1, len(LAYERS)):
        e[..., i] = 0.7 * e[..., i - 1] + np.sqrt(1 - 0.49) * e[..., i]
    return e


def null_data(kind, t, rng, size=()):
    x = LAYERS / LAYERS.max()
    shape = {"flat": 0 * x, "linear": 0.01 * LAYERS, "quadratic": 0.3 * x**2, "saturating": 0.3 * (1 - np.exp(-3 * x)),
             "logistic": 0.3 / (1 + np.exp(-6 * (x - 0.5)))}[kind]
    return rng.uniform(0.5, 1.5, size + (t, 1)) * shape + noise(rng, t, size)


def planted(t, rng, start=10, end=16):
    rise = np.clip((LAYERS - (start - 1)) / (end - start + 1), 0, 1)
    return 0.02 + rng.uniform(0.3, 0.6, (t, 1)) * rise + noise(rng, t)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    i = np.arange(1, k + 1)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((n - i + 1) / i))])
    j = np.arange(k + 1)
    logpmf = log_choose + j * math.log(p) + (n - j) * math.log1p(-p)
    top = logpmf.max()
    return float(min(1.0, math.exp(top) * np.exp(logpmf - top).sum()))


def _solve(f, target: float) -> float:
    """p in (0, 1) with f(p) = target for f decreasing in p (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial rate: each tail holds (1 - level) / 2."""
    a = (1 - level) / 2
    low = 0.0 if k == 0 else _solve(lambda p: _binom_cdf(k - 1, n, p), 1 - a)
    high = 1.0 if k == n else _solve(lambda p: _binom_cdf(k, n, p), a)
    return low, high


def exact_size(t: int, resamples: int, alpha: float) -> float:
    """P(p < alpha) of the smooth test under a continuous null (see the module docstring)."""
    b = flip_count(resamples, 0.05)  # the flips count_sections draws at the default section_alpha
    k = 2 ** (t - 1) if 2 ** (t - 1) <= b + 1 else b + 1
    return (math.ceil(alpha * k - 1e-12) - 1) / k


def cell_seed(seed: int, *parts) -> int:
    return zlib.crc32("/".join(str(p) for p in (seed, *parts)).encode())


def fpr_cell(kind: str, t: int, reps: int, resamples: int, seed: int, batch: int = 100) -> dict:
    """Rejections of the smooth null at each of ALPHAS over ``reps`` data sets (counts)."""
    rng = np.random.default_rng(cell_seed(seed, "fpr", kind, t))
    models = KinkModels(LAYERS.astype(float), "ramp", 2, null_degree(len(LAYERS), 5))
    hits = {a: 0 for a in ALPHAS}
    done = 0
    while done < reps:
        d = min(batch, reps - done)
        values = null_data(kind, t, rng, (d,))
        flips = [distinct_flips(t, rng, flip_count(resamples, 0.05)) for _ in range(d)]  # as count_sections draws them
        exact = flips[0][1]
        signs = flips[0][0] if exact else np.stack([s for s, _ in flips])  # exact: the same complete set for all
        observed, stats = models.smooth_test_stats(values, signs, 3)
        p = flip_p_value(stats, observed, exact)
        for a in ALPHAS:
            hits[a] += int(np.sum(p < a))
        done += d
    return {"kind": kind, "tasks": t, "reps": reps, "resamples": resamples, "found": {str(a): hits[a] for a in ALPHAS}}


def planted_cell(t: int, reps: int, resamples: int, seed: int) -> dict:
    rng = np.random.default_rng(cell_seed(seed, "planted", t))
    found = three = close = 0
    covered = [0, 0]
    for _ in range(reps):
        values = planted(t, rng)
        k, _, fits = count_sections(LAYERS, values, resamples=resamples, seed=int(rng.integers(1 << 31)))
        found += k > 1
        if k != 3:
            continue
        three += 1
        b = fits["3_sections"]["boundaries"]
        close += abs(b[0] - 10) <= 1 and abs(b[1] - 16) <= 1
        boots, _ = boundary_bootstrap(LAYERS, values, "ramp", 3, 2, 500, int(rng.integers(1 << 31)))
        for col, truth in enumerate((10, 16)):
            lo, hi = np.quantile(boots[:, col], 0.025, method="lower"), np.quantile(boots[:, col], 0.975, method="higher")
            covered[col] += bool(lo <= truth <= hi)
    return {"tasks": t, "reps": reps, "resamples": resamples, "found": found, "three": three, "within1": int(close),
            "cover_transition": covered[0], "cover_refinement": covered[1]}


def fmt(k: int, n: int) -> str:
    lo, hi = clopper_pearson(k, n)
    return f"{k / max(n, 1):.3f} [{lo:.3f}, {hi:.3f}]"


def merge(paths: list[str]) -> None:
    chunks = []
    for path in paths:
        with open(path) as f:
            chunks.append(json.load(f))
    report(chunks)


def report(chunks: list[dict]) -> None:
    """Pool chunk counts; print the table rows, the pooled rates with Clopper-Pearson bounds, and a JSON line."""
    fpr, plant = {}, {}
    for data in chunks:
        for c in data.get("fpr", []):
            key = (c["tasks"], c["kind"])
            old = fpr.setdefault(key, {"reps": 0, "found": {str(a): 0 for a in ALPHAS}, "resamples": c["resamples"]})
            old["reps"] += c["reps"]
            for a in old["found"]:
                old["found"][a] += c["found"][a]
        for c in data.get("planted", []):
            plant[c["tasks"]] = c
    out = {"name": "sections_calibration"}
    tasks = sorted({t for t, _ in fpr} | set(plant))
    print("| tasks T | data sets per shape | exact size | " + " | ".join(f"false positives: {k}" for k in KINDS)
          + " | planted: found | 3 sections | both boundaries within 1 layer | boundary-CI coverage transition / refinement |")
    for t in tasks:
        cells = [fpr.get((t, k)) for k in KINDS]
        reps = {c["reps"] for c in cells if c}
        size = exact_size(t, cells[0]["resamples"], 0.05) if cells[0] else float("nan")
        row = [str(t), "/".join(str(r) for r in sorted(reps)), f"{size:.4f}"]
        row += [fmt(c["found"]["0.05"], c["reps"]) if c else "-" for c in cells]
        for k, c in zip(KINDS, cells):
            if c:
                out[f"fpr_{k}_T{t}"] = c["found"]["0.05"] / c["reps"]
        p = plant.get(t)
        if p:
            row += [fmt(p["found"], p["reps"]), fmt(p["three"], p["reps"]), fmt(p["within1"], p["three"]),
                    f"{fmt(p['cover_transition'], p['three'])} / {fmt(p['cover_refinement'], p['three'])}"]
            out.update({f"detect_T{t}": p["found"] / p["reps"], f"three_T{t}": p["three"] / p["reps"],
                        f"within1_T{t}": p["within1"] / max(p["three"], 1),
                        f"ci_cover_transition_T{t}": p["cover_transition"] / max(p["three"], 1),
                        f"ci_cover_refinement_T{t}": p["cover_refinement"] / max(p["three"], 1)})
        else:
            row += ["-"] * 4
        print("| " + " | ".join(row) + " |")
    if fpr:
        for a in ALPHAS:
            k = sum(c["found"][str(a)] for c in fpr.values())
            n = sum(c["reps"] for c in fpr.values())
            size = sum(exact_size(t, c["resamples"], a) * c["reps"] for (t, _), c in fpr.items()) / n
            lo, hi = clopper_pearson(k, n)
            print(f"pooled over {len(fpr)} structureless cells, alpha {a}: {k}/{n} = {k / n:.4f}, Clopper-Pearson 95% "
                  f"[{lo:.4f}, {hi:.4f}], one-sided 95% upper {clopper_pearson(k, n, 0.90)[1]:.4f}; exact size of the test {size:.4f}")
            out[f"fpr_pooled_alpha{a}"] = k / n
            out[f"fpr_pooled_alpha{a}_cp95"] = [lo, hi]
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("fpr", "planted", "both"), default="both")
    ap.add_argument("--reps", type=int, default=400, help="data sets per cell")
    ap.add_argument("--resamples", type=int, default=1000, help="sign flips per test (the section_test_resamples default)")
    ap.add_argument("--tasks", default="8,16,64")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", help="write the counts of this chunk as JSON")
    ap.add_argument("--merge", nargs="+", help="pool chunk files and print the table")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge)
        return
    start = time.perf_counter()
    result = {"fpr": [], "planted": []}
    for t in [int(v) for v in args.tasks.split(",")]:
        if args.part in ("fpr", "both"):
            for kind in args.kinds.split(","):
                c = fpr_cell(kind, t, args.reps, args.resamples, args.seed)
                result["fpr"].append(c)
                print(f"T={t:3d} {kind:11s} false-positive rate {fmt(c['found']['0.05'], args.reps)}  "
                      f"(exact size {exact_size(t, args.resamples, 0.05):.4f})", flush=True)
        if args.part in ("planted", "both"):
            c = planted_cell(t, args.reps, args.resamples, args.seed)
            result["planted"].append(c)
            print(f"T={t:3d} planted found {fmt(c['found'], c['reps'])}  3 sections {fmt(c['three'], c['reps'])}  within 1 layer "
                  f"{fmt(c['within1'], c['three'])}  CI coverage {fmt(c['cover_transition'], c['three'])} / "
                  f"{fmt(c['cover_refinement'], c['three'])}", flush=True)
    print(f"wall {time.perf_counter() - start:.1f} s, load average {os.getloadavg()}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    if not args.out:
        report([result])


if __name__ == "__main__":
    main()
