"""Options of the analysis report; the fields mirror ``conf/analyze.yaml``.

Validated in ``__post_init__``: a bad value raises :class:`ConfigError` with one line
that names the field and how to fix it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

SIGNALS = ("auto", "cka_distance", "accuracy_delta", "control_cka")
SEGMENT_MODELS = ("ramp", "linear", "constant")
FIGURE_FORMATS = ("png", "svg", "pdf")


@dataclass
class AnalysisConfig:
    """How to read run outputs and what to put in the report.

    runs: run or multirun directories to analyze; ``None`` = the newest one under
        ``search_roots`` (by modification time of its ``probes.csv``).
    search_roots: where ``runs=None`` looks (relative to the working directory).
    pair: the two model roles compared (reference first), e.g. ``[base, tuned]``.
    signal: per-layer curve the sections are fitted to: ``cka_distance``
        (1 - CKA(pair)), ``accuracy_delta`` (pair[1] - pair[0] probe metric) or
        ``control_cka`` (CKA(pair[1], control:<task>)); ``auto`` = control_cka when the
        results hold control models (the study's MOSSA signal), else cka_distance.
    measure: similarity measure for CKA figures and signals; ``auto`` prefers
        debiased_cka (no n/d floor), then linear_cka, rbf_cka, any other ``*cka``.
    metric: probe metric for heatmaps, curves and ``accuracy_delta``.
    probe: probe head to report (``linear``, ``mlp``...); ``auto`` prefers linear.
    split: evaluation split of ``probes.csv`` to report.
    segment_model: piecewise least-squares model of the sections: ``ramp`` (a flat
        shared level, then a line per later section), ``linear`` (a line per section)
        or ``constant`` (a level per section).
    min_section_layers: fewest layers a section may have.
    section_alpha: level of the section tests: sections are reported only when the
        3-section fit beats a smooth curve at this level (sign-flip test over tasks, docs/analysis.md).
    section_null_degree: degree of the polynomial that stands for "no sections".
    section_test_resamples: sign flips of each section test, at most (all distinct ones when fewer; else
        rounded down so that section_alpha x (flips + 1) is whole: 999 at the defaults).
    include_embedding: fit sections over layer 0 (embeddings) too.
    bootstrap: bootstrap resamples over tasks for the boundary CIs (0 = none).
    ci: confidence level of every interval in the report.
    seed: seed of the bootstrap.
    figure_format: extra figure format; PNG is always written (the HTML embeds it).
    dpi: resolution of PNG figures.
    overtake_margin: pair[1] overtakes pair[0] at the first layer from which
        pair[1] - pair[0] > margin at every later layer.
    title: report title; ``None`` = derived from the inputs.
    """

    runs: list[str] | None = None
    search_roots: list[str] = field(default_factory=lambda: ["outputs", "multirun"])
    pair: list[str] = field(default_factory=lambda: ["base", "tuned"])
    signal: str = "auto"
    measure: str = "auto"
    metric: str = "accuracy"
    probe: str = "auto"
    split: str = "test"
    segment_model: str = "ramp"
    min_section_layers: int = 2
    section_alpha: float = 0.05
    section_null_degree: int = 5
    section_test_resamples: int = 1000
    include_embedding: bool = True
    bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    figure_format: str = "png"
    dpi: int = 150
    overtake_margin: float = 0.0
    title: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.runs, str):
            self.runs = [self.runs]
        if self.runs is not None:
            self.runs = [str(r) for r in self.runs]
            _check(len(self.runs) > 0, "runs", self.runs, "give a directory, a list [dir1,dir2] or null for the latest run")
        if isinstance(self.search_roots, str):
            self.search_roots = [self.search_roots]
        self.search_roots = [str(r) for r in self.search_roots]
        self.pair = [str(p) for p in self.pair]
        _check(len(self.pair) == 2 and self.pair[0] != self.pair[1], "pair", self.pair, "give two different model roles, e.g. pair=[base,tuned]")
        _check_choice("signal", self.signal, SIGNALS)
        _check_choice("segment_model", self.segment_model, SEGMENT_MODELS)
        _check_choice("figure_format", self.figure_format, FIGURE_FORMATS)
        for name in ("measure", "metric", "probe", "split"):
            value = getattr(self, name)
            _check(isinstance(value, str) and value != "", name, value, f"set {name}=<name> (a non-empty string)")
        low = 1 if self.segment_model == "constant" else 2
        _check(_is_int(self.min_section_layers) and self.min_section_layers >= low, "min_section_layers", self.min_section_layers,
               f"use an integer >= {low} (segment_model={self.segment_model} needs sections of >= {low} layer(s))")
        _check(isinstance(self.section_alpha, (int, float)) and 0 < self.section_alpha < 1, "section_alpha", self.section_alpha,
               "use a level in (0, 1), e.g. section_alpha=0.05")
        _check(_is_int(self.section_null_degree) and 0 <= self.section_null_degree <= 6, "section_null_degree", self.section_null_degree,
               "use an integer polynomial degree in 0..6, e.g. 3")
        _check(_is_int(self.section_test_resamples) and self.section_test_resamples >= 99, "section_test_resamples",
               self.section_test_resamples, "use an integer >= 99 (p-values need resolution below alpha), e.g. 1000")
        _check(_is_int(self.bootstrap) and self.bootstrap >= 0, "bootstrap", self.bootstrap, "use an integer >= 0 (0 disables the CIs)")
        _check(isinstance(self.ci, (int, float)) and 0.5 <= self.ci < 1, "ci", self.ci, "use a level in [0.5, 1), e.g. ci=0.95")
        _check(_is_int(self.seed), "seed", self.seed, "use an integer")
        _check(_is_int(self.dpi) and 30 <= self.dpi <= 600, "dpi", self.dpi, "use an integer between 30 and 600")
        _check(isinstance(self.overtake_margin, (int, float)) and self.overtake_margin >= 0, "overtake_margin", self.overtake_margin, "use a number >= 0")
        _check(isinstance(self.include_embedding, bool), "include_embedding", self.include_embedding, "use true or false")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "AnalysisConfig":
        """Build from a plain mapping (e.g. the Hydra config without its ``hydra`` node)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown analysis option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"analysis option {name}={value!r} is invalid; {fix}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, value, f"use one of: {', '.join(choices)}")
