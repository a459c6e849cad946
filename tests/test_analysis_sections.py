"""Section detection: planted boundaries in noisy synthetic curves are recovered.

Expectations are the planted boundaries and an exhaustive search over all boundary
pairs, never the code under test.
"""

from __future__ import annotations

import itertools

import pandas as pd

import numpy as np
import pytest

from layerprobe.analysis import AnalysisConfig, detect_sections, fit_sections, load_runs
from layerprobe.analysis.synthetic import Planted, make_run, task_table
from layerprobe.analysis.views import Views


def planted_curves(num_layers: int, transition: int, refinement: int, n_tasks: int, noise: float, seed: int) -> np.ndarray:
    """tasks x layers: 0 on shared layers, a linear rise through the transition, flat from refinement on."""
    rng = np.random.default_rng(seed)
    layers = np.arange(num_layers + 1)
    rise = np.clip((layers - (transition - 1)) / (refinement - transition + 1), 0, 1)
    amplitude = rng.uniform(0.3, 0.6, size=(n_tasks, 1))
    drift = rng.uniform(-0.002, 0.002, size=(n_tasks, 1)) * np.maximum(layers - refinement, 0)  # refinement may drift
    return 0.02 + amplitude * rise + drift + rng.normal(0, noise, size=(n_tasks, len(layers)))


@pytest.mark.parametrize("model", ["ramp", "linear"])
@pytest.mark.parametrize(
    "num_layers, transition, refinement, seed",
    [(32, 10, 16, 0), (32, 6, 22, 1), (24, 4, 9, 2), (8, 3, 6, 3), (40, 15, 31, 4), (12, 2, 10, 5)],
)
def test_fit_recovers_planted_boundaries_within_one_layer(num_layers, transition, refinement, seed, model):
    curves = planted_curves(num_layers, transition, refinement, n_tasks=20, noise=0.05, seed=seed)
    start_t, start_r, _ = fit_sections(np.arange(num_layers + 1), curves.mean(axis=0), model, 2)
    assert abs(start_t - transition) <= 1
    assert abs(start_r - refinement) <= 1


@pytest.mark.parametrize("model", ["ramp", "linear"])
def test_noise_free_ramp_is_recovered_exactly(model):
    layers = np.arange(33)
    curve = np.clip((layers - 9) / 7, 0, 1)  # shared 0-9, transition 10-15, refinement 16-32
    assert fit_sections(layers, curve, model, 2)[:2] == (10, 16)


def test_ramp_keeps_a_rising_start_out_of_the_shared_section():
    """Rise right after the first layers, plateau, then a last-layer bump (as a final norm can give)."""
    curve = np.array([0.0, 0.01, 0.13, 0.29, 0.55, 0.56, 0.55, 0.54, 0.61])
    # flat 0-1, rising 2-3, at the high level from 4 on
    assert fit_sections(np.arange(9), curve, "ramp", 2)[:2] == (2, 4)


def test_single_noisy_task_is_recovered_within_one_layer():
    curve = planted_curves(32, 10, 16, n_tasks=1, noise=0.02, seed=7)[0]
    start_t, start_r, _ = fit_sections(np.arange(33), curve, "ramp", 2)
    assert abs(start_t - 10) <= 1 and abs(start_r - 16) <= 1


def test_constant_model_recovers_planted_steps():
    rng = np.random.default_rng(0)
    layers = np.arange(25)
    curve = np.select([layers < 7, layers < 15], [0.0, 0.5], 1.0) + rng.normal(0, 0.05, len(layers))
    assert fit_sections(layers, curve, "constant", 1)[:2] == (7, 15)


def _line_sse(x: np.ndarray, y: np.ndarray) -> float:
    coef = np.polyfit(x, y, 1)
    return float(((np.polyval(coef, x) - y) ** 2).sum())


def _level_sse(x: np.ndarray, y: np.ndarray) -> float:
    return float(((y - y.mean()) ** 2).sum())


@pytest.mark.parametrize("model, first_piece", [("linear", _line_sse), ("ramp", _level_sse)])
def test_dynamic_programming_matches_exhaustive_search(model, first_piece):
    """Pieces on 0..k1, k1..k2, k2..n-1 (shared knots); sections of >= 2 layers."""
    rng = np.random.default_rng(11)
    for _ in range(25):
        n = int(rng.integers(6, 16))
        x, y = np.arange(n, dtype=float), rng.normal(size=n)
        candidates = [
            (first_piece(x[: k1 + 1], y[: k1 + 1]) + _line_sse(x[k1 : k2 + 1], y[k1 : k2 + 1]) + _line_sse(x[k2:], y[k2:]), k1 + 1, k2)
            for k1, k2 in itertools.combinations(range(n), 2)
            if k1 + 1 >= 2 and k2 - k1 - 1 >= 2 and n - k2 >= 2
        ]
        best = min(candidates)
        start_t, start_r, sse = fit_sections(x, y, model, 2)
        assert sse == pytest.approx(best[0], abs=1e-9)
        assert (start_t, start_r) == best[1:]


def test_every_section_respects_the_minimum_length():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.normal(size=15)
        start_t, start_r, _ = fit_sections(np.arange(15), y, "ramp", 3)
        assert start_t >= 3 and start_r - start_t >= 3 and 15 - start_r >= 3


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("planted") / "run"
    return make_run(run, task_table(12, 4), Planted(num_layers=20, transition_start=7, refinement_start=13), noise=0.01)


def test_detect_sections_on_a_run_recovers_the_plant_with_bootstrap_cis(planted_run):
    cfg = AnalysisConfig(bootstrap=200, seed=1)
    fit, reason = detect_sections(Views.build(load_runs([planted_run]), cfg), cfg)
    assert reason == ""
    assert abs(fit.transition_start - 7) <= 1 and abs(fit.refinement_start - 13) <= 1
    assert fit.sections["shared"][0] == 0 and fit.sections["refinement"][1] == 20
    assert fit.ci["transition_start"][0] <= 7 <= fit.ci["transition_start"][1]
    assert fit.ci["refinement_start"][0] <= 13 <= fit.ci["refinement_start"][1]
    assert 0 < fit.agreement <= 1


@pytest.mark.parametrize("signal", ["accuracy_delta", "cka_distance"])
def test_other_signals_and_no_embedding_layer(planted_run, signal):
    cfg = AnalysisConfig(signal=signal, include_embedding=False, bootstrap=0)
    fit, _ = detect_sections(Views.build(load_runs([planted_run]), cfg), cfg)
    assert fit.layers[0] == 1
    assert abs(fit.transition_start - 7) <= 1 and abs(fit.refinement_start - 13) <= 1
    assert fit.ci == {}


def test_too_few_layers_gives_a_reason_not_an_error(tmp_path):
    run = make_run(tmp_path / "run", task_table(3, 1), Planted(num_layers=3, transition_start=1, refinement_start=2))
    cfg = AnalysisConfig(bootstrap=0)
    fit, reason = detect_sections(Views.build(load_runs([run]), cfg), cfg)
    assert fit is None and "min_section_layers" in reason


# ---------------------------------------------------------------------------- model selection


from layerprobe.analysis import write_report  # noqa: E402
from layerprobe.analysis.sections import (  # noqa: E402
    KinkModels, count_sections, distinct_flips, fit_pieces, flip_count, flip_p_value, min_tasks, sign_flips,
)


def _hinge_sse_bruteforce(x, y, degree, knot_sets, constant=False):
    """Independent: least squares on [1, t, ..., t^degree, basis at each knot], min over knot sets."""
    t = (x - x.mean()) / np.ptp(x)
    best = np.inf
    for knots in knot_sets:
        cols = [t**p for p in range(degree + 1)]
        cols += [(x >= x[k]).astype(float) if constant else np.maximum(0.0, x - x[k]) for k in knots]
        design = np.stack(cols, axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        best = min(best, float(((design @ coef - y) ** 2).sum()))
    return best


@pytest.mark.parametrize("model", ["ramp", "constant"])
def test_kink_models_match_bruteforce_least_squares(model):
    rng = np.random.default_rng(4)
    x = np.arange(14, dtype=float)
    kinks = KinkModels(x, model, 2, 3)
    for k in (2, 3):
        tuples, _ = kinks._knot_sets(k - 1)
        for _ in range(3):
            y = rng.normal(size=14)
            assert kinks.sse(k, y[None])[0] == pytest.approx(_hinge_sse_bruteforce(x, y, 3, tuples, model == "constant"), rel=1e-9, abs=1e-12)
    y = rng.normal(size=14)
    coef = np.polyfit(x, y, 3)
    assert kinks.sse("smooth", y[None])[0] == pytest.approx(float(((np.polyval(coef, x) - y) ** 2).sum()), rel=1e-9)


def test_kink_statistic_ignores_any_smooth_trend():
    """The smooth-vs-sections statistic depends only on the non-smooth part: exactness of the sign-flip test."""
    x = np.arange(20, dtype=float)
    kinks = KinkModels(x, "ramp", 2, 3)
    y = np.random.default_rng(0).normal(size=20)
    trend = 0.3 - 0.2 * x + 0.01 * x**2 - 0.0004 * x**3
    for k in (2, 3, 4):
        assert kinks.sse(k, (y + trend)[None])[0] == pytest.approx(kinks.sse(k, y[None])[0], rel=1e-8)


def test_sign_flips_enumerate_all_when_few_tasks():
    signs, exact = sign_flips(4, np.random.default_rng(0), 1000)
    assert exact and signs.shape == (16, 4) and len({tuple(s) for s in signs}) == 16
    assert min_tasks(0.05) == 6 and min_tasks(0.01) == 8  # 2^-(T-1) < alpha


def test_distinct_flips_give_the_full_enumeration_p_value():
    """Exact test: the 2^(T-1) flips with task 1 at +1 give the p-value of all 2^T flips of the mean curve (brute force)."""
    rng = np.random.default_rng(7)
    layers = np.arange(17, dtype=float)
    kinks = KinkModels(layers, "ramp", 2, 3)
    values = 0.02 * layers + rng.normal(0, 0.05, (7, 17))
    signs, exact = distinct_flips(7, rng, 1000)
    assert exact and signs.shape == (64, 7) and np.all(signs[:, 0] == 1) and len({tuple(s) for s in signs}) == 64
    curve = values.mean(axis=0)
    fitted = kinks.fitted("smooth", curve)
    z = values - fitted
    stat = lambda c: (kinks.sse("smooth", c) - np.minimum(kinks.sse("smooth", c), kinks.sse(3, c))) / kinks.sse(3, c)
    grid = np.array(list(itertools.product([-1.0, 1.0], repeat=7)))
    full = stat(fitted + grid @ z / 7)
    observed = float(stat(curve[None])[0])
    expected = float(np.mean(full >= observed * (1 - 1e-9)))
    test = kinks.compare("smooth", 3, curve, values, rng, 1000)
    assert test.resamples == 64 and test.p_value == pytest.approx(expected, abs=1e-12) and test.statistic == pytest.approx(observed, rel=1e-9)
    batched_obs, batched = kinks.smooth_test_stats(values[None], signs, 3)
    assert batched_obs[0] == pytest.approx(observed, rel=1e-9)
    assert float(flip_p_value(batched[0], batched_obs[0], True)) == pytest.approx(expected, abs=1e-12)


def test_random_flips_p_value_counts_the_observed():
    signs, exact = distinct_flips(20, np.random.default_rng(0), 99)
    assert not exact and signs.shape == (99, 20) and np.all(signs[:, 0] == 1)
    stats = np.arange(99, dtype=float)
    assert flip_p_value(stats, 89.0, False) == pytest.approx(11 / 100)  # (1 + 10 hits) / (1 + 99)
    assert flip_p_value(stats, 1000.0, False) == pytest.approx(1 / 100)
    assert flip_p_value(stats, 89.0, True) == pytest.approx(10 / 99)


def test_flip_count_makes_alpha_times_b_plus_one_whole():
    assert flip_count(1000, 0.05) == 999 and flip_count(199, 0.05) == 199 and flip_count(1000, 0.01) == 999
    assert flip_count(500, 0.05) == 499 and flip_count(1000, 0.1) == 999 and flip_count(10, 0.037) == 10  # none: kept
    # size of "p < alpha" with p = (1 + hits) / 1000 and hits ~ Binomial(999, u), u uniform: hits <= 48 of 0..999 equally likely
    b = flip_count(1000, 0.05)
    assert sum((1 + h) / (1 + b) < 0.05 for h in range(b + 1)) / (b + 1) == pytest.approx(0.049)


@pytest.mark.parametrize("k", [2, 4])
def test_k_piece_dp_matches_exhaustive_search(k):
    rng = np.random.default_rng(k)
    n = 13
    x, y = np.arange(n, dtype=float), rng.normal(size=n)
    best = np.inf
    for knots in itertools.combinations(range(n), k - 1):
        bounds = [0, *knots, n - 1]
        pieces = [(bounds[p], bounds[p + 1]) for p in range(k)]
        # ramp: level on the first piece, lines after; sections >= 2 (knot rules of section_starts)
        sections = [knots[0] + 1] + ([knots[1] - knots[0] - 1] if k > 2 else []) + [b - a for a, b in zip(knots[1:], knots[2:])] \
            + [n - knots[-1] - (1 if k == 2 else 0)]
        if min(sections) < 2:
            continue
        sse = _level_sse(x[: knots[0] + 1], y[: knots[0] + 1]) + sum(_line_sse(x[a : b + 1], y[a : b + 1]) for a, b in pieces[1:])
        best = min(best, sse)
    _, sse = fit_pieces(x, y, "ramp", k, 2)
    assert sse == pytest.approx(best, abs=1e-9)


def _null_curves(kind: str, n_tasks: int, layers: np.ndarray, rng) -> np.ndarray:
    """Structureless task x layer data: smooth mean, per-task amplitude, noise correlated across layers."""
    x = layers / layers.max()
    mean = {"flat": 0 * x, "linear": 0.01 * layers, "saturating": 0.3 * (1 - np.exp(-3 * x))}[kind]
    noise = rng.normal(0, 0.05, (n_tasks, len(layers)))
    for i in range(1, len(layers)):
        noise[:, i] = 0.7 * noise[:, i - 1] + np.sqrt(1 - 0.49) * noise[:, i]
    return rng.uniform(0.5, 1.5, (n_tasks, 1)) * mean + noise


@pytest.mark.parametrize("kind", ["flat", "linear", "saturating"])
def test_structureless_curves_rarely_give_sections(kind):
    """Rejections on 40 null data sets at alpha = 0.05: P(>= 7 of 40) < 0.01 for a calibrated test."""
    rng = np.random.default_rng({"flat": 1, "linear": 2, "saturating": 3}[kind])
    layers = np.arange(17)
    found = sum(count_sections(layers, _null_curves(kind, 12, layers, rng), resamples=199, seed=i)[0] > 1 for i in range(40))
    assert found <= 6


def test_linear_signal_over_64_tasks_has_no_sections():
    """The issue's case: 0.01 * layer plus noise used to give 'shared 0-1, transition 2-21'."""
    rng = np.random.default_rng(12)
    layers = np.arange(33)
    values = 0.01 * layers + rng.normal(0, 0.05, (64, 33))
    k, tests, fits = count_sections(layers, values, resamples=499, seed=0)
    assert k == 1 and tests[0].p_value >= 0.05 and set(fits) >= {"smooth", "2_sections", "3_sections", "4_sections"}


def test_planted_sections_are_found_with_three_sections():
    curves = planted_curves(32, 10, 16, n_tasks=20, noise=0.05, seed=0)
    k, tests, fits = count_sections(np.arange(33), curves, resamples=499, seed=0)
    assert k == 3 and tests[0].p_value < 0.01 and tests[1].p_value < 0.01
    assert abs(fits["3_sections"]["boundaries"][0] - 10) <= 1 and abs(fits["3_sections"]["boundaries"][1] - 16) <= 1


def test_a_hockey_stick_is_two_sections():
    rng = np.random.default_rng(5)
    layers = np.arange(25)
    values = 0.4 * np.maximum(0, layers - 12) / 12 + rng.normal(0, 0.03, (16, 25))
    k, _, fits = count_sections(layers, values, resamples=499, seed=0)
    assert k == 2 and abs(fits["2_sections"]["boundaries"][0] - 13) <= 1


def _run_with_signal(path, signal_of_layer, n_tasks=12, seed=0):
    """A synthetic run whose CKA(base, tuned) at layer l is 1 - signal_of_layer(l) + noise."""
    run = make_run(path, task_table(n_tasks, 3), Planted(num_layers=16, transition_start=5, refinement_start=10), cross_layer=False)
    sim = pd.read_csv(run / "similarity.csv")
    rng = np.random.default_rng(seed)
    noise = {t: rng.normal(0, 0.03, 17) for t in sim["task"].unique()}
    diag = sim["layer_a"] == sim["layer_b"]
    sim.loc[diag, "value"] = [1 - signal_of_layer(l) + noise[t][l] for t, l in zip(sim.loc[diag, "task"], sim.loc[diag, "layer_a"])]
    sim.to_csv(run / "similarity.csv", index=False)
    return run


def test_report_on_a_structureless_run_says_found_false(tmp_path):
    import json

    run = _run_with_signal(tmp_path / "run", lambda l: 0.01 * l)
    cfg = AnalysisConfig(bootstrap=50, dpi=40, measure="debiased_cka", signal="cka_distance", section_test_resamples=199)
    result = write_report([run], tmp_path / "report", cfg)
    sections = json.loads((tmp_path / "report" / "sections.json").read_text())
    assert sections["found"] is False and sections["n_sections"] == 1 and sections["p_value"] >= 0.05
    assert sections["shared"] is None and sections["boundaries"] == {} and sections["fit"] == {}
    assert [c["rich"] for c in sections["test"]["comparisons"]] == ["3 sections"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "No section structure" in text
    assert "cka_shared" not in pd.read_csv(result["tables"]["summary"]).columns


def test_a_section_pinned_at_the_minimum_is_flagged():
    curves = planted_curves(20, 2, 8, n_tasks=16, noise=0.02, seed=3)  # shared 0-1: exactly min_section_layers
    from layerprobe.analysis.sections import SectionFit

    start_t, start_r, _ = fit_sections(np.arange(21), curves.mean(axis=0), "ramp", 2)
    fit = SectionFit("cka_distance", "", "ramp", list(range(21)), [], [], [], 16, 0.95, 0, found=True, n_sections=3,
                     starts=[start_t, start_r], min_section_layers=2)
    assert fit.sections["shared"] == [0, 1] and fit.at_minimum == ["shared"]


def test_too_few_tasks_for_the_test_gives_a_reason(tmp_path):
    run = make_run(tmp_path / "run", task_table(5, 2), Planted(num_layers=12, transition_start=4, refinement_start=8))
    cfg = AnalysisConfig(bootstrap=0, signal="cka_distance")
    fit, reason = detect_sections(Views.build(load_runs([run]), cfg), cfg)
    assert fit is None and "6" in reason and "section_alpha" in reason
