"""Error rates of section detection (analysis/sections.py), by simulation: the figures in docs/analysis.md.

    python bench/sections_calibration.py [--reps 400] [--resamples 200]

Data: T tasks x 33 layers (0..32). Each task's curve is a mean shape times a per-task
amplitude (uniform 0.5-1.5 for the null shapes, 0.3-0.6 for the plant) plus noise that is
correlated across layers (AR(1), rho = 0.7, SD 0.05 per layer) - the same for every scenario.

* false-positive rate: share of structureless data sets where sections are ``found``
  (flat, linear, quadratic, saturating 1 - exp(-3x), logistic with slope 6 over the depth);
* detection: planted sections shared 0-9 / transition 10-15 / refinement 16-32 (the study's
  map): share found, share with 3 sections, share with both boundaries within one layer;
* boundary CI coverage: share of 95% task-bootstrap intervals holding the planted boundary,
  among the found 3-section fits.
The last line is JSON with every rate.
"""

import argparse
import json

import numpy as np

from layerprobe.analysis.sections import boundary_bootstrap, count_sections

LAYERS = np.arange(33)


def noise(rng, t):
    e = rng.normal(0, 0.05, (t, len(LAYERS)))
    for i in range(1, len(LAYERS)):
        e[:, i] = 0.7 * e[:, i - 1] + np.sqrt(1 - 0.49) * e[:, i]
    return e


def null_data(kind, t, rng):
    x = LAYERS / LAYERS.max()
    shape = {"flat": 0 * x, "linear": 0.01 * LAYERS, "quadratic": 0.3 * x**2, "saturating": 0.3 * (1 - np.exp(-3 * x)),
             "logistic": 0.3 / (1 + np.exp(-6 * (x - 0.5)))}[kind]
    return rng.uniform(0.5, 1.5, (t, 1)) * shape + noise(rng, t)


def planted(t, rng, start=10, end=16):
    rise = np.clip((LAYERS - (start - 1)) / (end - start + 1), 0, 1)
    return 0.02 + rng.uniform(0.3, 0.6, (t, 1)) * rise + noise(rng, t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--tasks", default="8,16,64")
    args = ap.parse_args()
    rng = np.random.default_rng(2024)
    result = {}
    for t in [int(v) for v in args.tasks.split(",")]:
        for kind in ("flat", "linear", "quadratic", "saturating", "logistic"):
            found = [count_sections(LAYERS, null_data(kind, t, rng), resamples=args.resamples, seed=int(rng.integers(1 << 31)))[0] > 1
                     for _ in range(args.reps)]
            rate = float(np.mean(found))
            result[f"fpr_{kind}_T{t}"] = rate
            print(f"T={t:3d} {kind:11s} false-positive rate {rate:.3f}  (binomial SE {np.sqrt(rate * (1 - rate) / args.reps + 1e-12):.3f})", flush=True)
        found = three = close = 0
        covered = [0, 0]
        for _ in range(args.reps):
            values = planted(t, rng)
            k, _, fits = count_sections(LAYERS, values, resamples=args.resamples, seed=int(rng.integers(1 << 31)))
            found += k > 1
            if k != 3:
                continue
            three += 1
            b = fits["3_sections"]["boundaries"]
            close += abs(b[0] - 10) <= 1 and abs(b[1] - 16) <= 1
            boots, _ = boundary_bootstrap(LAYERS, values, "ramp", 3, 2, 500, int(rng.integers(1 << 31)))
            for col, truth in enumerate((10, 16)):
                lo, hi = np.quantile(boots[:, col], 0.025, method="lower"), np.quantile(boots[:, col], 0.975, method="higher")
                covered[col] += lo <= truth <= hi
        result.update({f"detect_T{t}": found / args.reps, f"three_T{t}": three / args.reps, f"within1_T{t}": close / max(three, 1),
                       f"ci_cover_transition_T{t}": covered[0] / max(three, 1), f"ci_cover_refinement_T{t}": covered[1] / max(three, 1)})
        print(f"T={t:3d} planted     found {found / args.reps:.3f}  3 sections {three / args.reps:.3f}  both boundaries within 1 layer "
              f"{close / max(three, 1):.3f}  95% CI coverage transition {covered[0] / max(three, 1):.3f} refinement {covered[1] / max(three, 1):.3f}",
              flush=True)
    print(json.dumps({"name": "sections_calibration", **result}))


if __name__ == "__main__":
    main()
