"""Section detection: planted boundaries in noisy synthetic curves are recovered.

Expectations are the planted boundaries and an exhaustive search over all boundary
pairs, never the code under test.
"""

from __future__ import annotations

import itertools

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
