"""Coverage of similarity.csv confidence intervals (similarity/rows.py), by simulation: the figures in docs/similarity.md.

    python bench/similarity_coverage.py [--reps 1000] [--n 200] [--d 16] [--bootstrap 200]

Y = c X + E with X, E ~ N(0, I_d): the population linear CKA is c^2 / (c^2 + 1) exactly. For
c = 2 (strong), 0.3 (weak) and 0 (none) it reports how often the nominal 95% interval of
debiased CKA holds the population value, how often biased CKA's holds its own mean at this
n (what it is documented to cover) and the population value, and the ratio of the mean
interval width to 2 x 1.96 x the simulated SD of the estimate. Also the old half-sample
interval (m = n/2 only) for comparison. The last line is JSON.
"""

import argparse
import json
import math

import numpy as np

from layerprobe.similarity import SimilarityConfig, similarity_rows
from layerprobe.similarity import rows as rows_mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    out = {}
    for name, c in (("strong", 2.0), ("weak", 0.3), ("null", 0.0)):
        population = c * c / (c * c + 1)
        rows = {"debiased_cka": [], "linear_cka": []}
        half = []
        for r in range(args.reps):
            x = rng.standard_normal((args.n, 1, args.d))
            y = c * x + rng.standard_normal((args.n, 1, args.d))
            cfg = SimilarityConfig(measures=["linear_cka", "debiased_cka"], bootstrap=args.bootstrap, seed=r, gram_dtype="float64")
            res = rows_mod.Resamples(args.n, cfg, rows_mod.torch.device("cpu"))
            for row in similarity_rows("t", {"a": x, "b": y}, [("a", "b")], cfg):
                rows[row["measure"]].append(row)
            # the previous interval: half-samples only, scaled by sqrt(m / (n - m))
            fam = rows_mod.LinearCKA(["debiased_cka"], True, False, "float64")
            run = rows_mod.prepare_run({"a": x, "b": y}, [("a", "b")], cfg)
            m = run.model("a", [0]), run.model("b", [0])
            pa, pb = fam.prepare(m[0]), fam.prepare(m[1])
            value = float(fam.evaluate(pa, pb)[0]["debiased_cka"][0])
            boots = fam.evaluate_many(pa, pb, res.subs[0], [])[0]["debiased_cka"][:, 0].numpy()
            dev = boots - boots.mean()
            scale = math.sqrt(res.sizes[0] / (args.n - res.sizes[0]))
            half.append((value + scale * np.quantile(dev, 0.025), value + scale * np.quantile(dev, 0.975)))
        deb = rows["debiased_cka"]
        vals = np.array([row["value"] for row in deb])
        width = np.mean([row["ci_high"] - row["ci_low"] for row in deb]) / (2 * 1.96 * vals.std(ddof=1))
        cover = np.mean([row["ci_low"] <= population <= row["ci_high"] for row in deb])
        half_cover = np.mean([lo <= population <= hi for lo, hi in half])
        half_width = np.mean([hi - lo for lo, hi in half]) / (2 * 1.96 * vals.std(ddof=1))
        lin = rows["linear_cka"]
        lin_mean = np.mean([row["value"] for row in lin])
        lin_cover_mean = np.mean([row["ci_low"] <= lin_mean <= row["ci_high"] for row in lin])
        lin_cover_pop = np.mean([row["ci_low"] <= population <= row["ci_high"] for row in lin])
        out.update({f"{name}_debiased_coverage": cover, f"{name}_debiased_width_ratio": width, f"{name}_halfsample_coverage": half_cover,
                    f"{name}_halfsample_width_ratio": half_width, f"{name}_linear_coverage_of_own_mean": lin_cover_mean,
                    f"{name}_linear_coverage_of_population": lin_cover_pop})
        print(f"{name:6s} population {population:.4f}: debiased coverage {cover:.3f} (width / 2x1.96 SD {width:.2f}); "
              f"old half-sample {half_cover:.3f} ({half_width:.2f}); linear: own mean {lin_mean:.4f} covered {lin_cover_mean:.3f}, "
              f"population covered {lin_cover_pop:.3f}", flush=True)
    print(json.dumps({"name": "similarity_coverage", "n": args.n, "d": args.d, "reps": args.reps, **{k: round(float(v), 4) for k, v in out.items()}}))


if __name__ == "__main__":
    main()
