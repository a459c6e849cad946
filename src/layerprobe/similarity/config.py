"""Options of the similarity engine; the fields mirror ``conf/similarity/default.yaml``.

Validated in ``__post_init__``: a bad value raises ``ValueError`` with one line that
names the field and the fix. docs/similarity.md explains every measure.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from layerprobe.errors import LayerprobeError


class SimilarityError(LayerprobeError):
    """Bad similarity input or options (mismatched examples, too few rows...); one line with the fix."""

# Measures computed from one n x n Gram matrix per layer (or, for the linear kernel,
# from d x d feature moments): they share one pass over the features.
CKA_MEASURES = ("linear_cka", "debiased_cka", "rbf_cka")
# Measures computed from an SVD / neighbour graph per layer.
OTHER_MEASURES = ("svcca", "pwcca", "procrustes", "procrustes_sq", "procrustes_angular", "mutual_knn")
# Measures whose value changes when model_a and model_b swap: rows are never merged across orders.
ASYMMETRIC_MEASURES = ("pwcca",)
# Distances: smaller = more similar.
DISTANCE_MEASURES = ("procrustes", "procrustes_sq", "procrustes_angular")
P_ADJUST = ("holm", "bh", "none")
# Nguyen, Raghu & Kornblith (2021) minibatch CKA: the only full-matrix estimate that
# needs no n x n Gram, so it is what streaming (`stream_batch_size`) offers off the diagonal.
STREAM_MEASURES = ("linear_cka", "debiased_cka", "minibatch_cka")
MEASURES = CKA_MEASURES + OTHER_MEASURES + ("minibatch_cka",)
NAN_POLICIES = ("error", "mask")
GRAM_DTYPES = ("float32", "float64")


@dataclass
class SimilarityConfig:
    """What `similarity_rows` computes and how.

    measures: any of linear_cka, debiased_cka, rbf_cka, svcca, pwcca, procrustes
        (metric form), procrustes_sq (squared), procrustes_angular, mutual_knn,
        minibatch_cka (the last needs stream_batch_size).
    cross_layer: also write every (layer_a, layer_b) cell, not only layer_a == layer_b.
    within_model: with cross_layer, also write the layer x layer matrix of each model
        against itself (pairs (m, m) for every model named in the pairs).
    split: which split's examples are compared (the pipeline slices the arrays).
    bootstrap: subsamples (without replacement) at each of two sizes, n//2 and 3n//4,
        for confidence intervals (0 = off); see docs/similarity.md, Statistics.
    permutations: permutation-null resamples for p-values (0 = off). CKA measures
        always report the exact permutation-null mean, which needs no resampling.
    ci: confidence level of the intervals.
    rbf_threshold: RBF bandwidth = rbf_threshold x median pairwise distance.
    nan_policy: ``error`` fails on the first NaN/inf naming layer and example;
        ``mask`` drops the example from both models with a warning.
    seed: seed of every resampling.
    stream_batch_size: examples per batch on the streaming path (nothing n x n is
        formed); null = in-memory Gram/feature path.
    gram_dtype: precision of the products over features inside one Gram entry
        (float32 is 2x faster on CPU; measured CKA error ~2e-9 at n=500, d=1024); every
        sum over examples is float64.
    svcca_variance: SVCCA keeps the top singular directions holding this share of variance.
    knn_k: neighbours per example for mutual_knn.
    diagnostics_top_k: highest-norm examples checked by leave-one-out in diagnostics.
    device: torch device for the computation (``cpu``, ``cuda``, ``cuda:1``).
    p_adjust: multiplicity adjustment of p_value into p_adjusted: ``holm`` (Holm 1979,
        family-wise error), ``bh`` (Benjamini-Hochberg 1995, false discovery rate) or
        ``none``; one family per (model_a, model_b, measure) across tasks and cells.
    """

    measures: List[str] = field(default_factory=lambda: ["linear_cka", "debiased_cka"])
    cross_layer: bool = False
    within_model: bool = False
    split: str = "test"
    bootstrap: int = 0
    permutations: int = 0
    ci: float = 0.95
    rbf_threshold: float = 1.0
    nan_policy: str = "error"
    seed: int = 0
    stream_batch_size: Optional[int] = None
    gram_dtype: str = "float32"
    svcca_variance: float = 0.99
    knn_k: int = 10
    diagnostics_top_k: int = 5
    device: str = "cpu"
    p_adjust: str = "holm"

    def __post_init__(self) -> None:
        if isinstance(self.measures, str):
            self.measures = [self.measures]
        self.measures = [str(m) for m in self.measures]
        _check(len(self.measures) > 0, "measures", self.measures, f"list at least one of {list(MEASURES)}")
        for m in self.measures:
            _check(m in MEASURES, "measures", m, f"use any of {list(MEASURES)}")
        _check(len(set(self.measures)) == len(self.measures), "measures", self.measures, "list each measure once")
        _check(self.bootstrap >= 0, "bootstrap", self.bootstrap, "use 0 (off) or a number of resamples such as 1000")
        _check(self.permutations >= 0, "permutations", self.permutations, "use 0 (off) or a number of resamples such as 1000")
        _check(0.0 < self.ci < 1.0, "ci", self.ci, "use a level between 0 and 1, e.g. 0.95")
        _check(self.rbf_threshold > 0, "rbf_threshold", self.rbf_threshold, "use a positive multiple of the median distance, e.g. 1.0")
        _check(self.nan_policy in NAN_POLICIES, "nan_policy", self.nan_policy, f"use one of {list(NAN_POLICIES)}")
        _check(self.p_adjust in P_ADJUST, "p_adjust", self.p_adjust, f"use one of {list(P_ADJUST)}")
        _check(self.gram_dtype in GRAM_DTYPES, "gram_dtype", self.gram_dtype, f"use one of {list(GRAM_DTYPES)}")
        _check(0.0 < self.svcca_variance <= 1.0, "svcca_variance", self.svcca_variance, "use a share of variance in (0, 1], e.g. 0.99")
        _check(self.knn_k >= 1, "knn_k", self.knn_k, "use at least 1 neighbour, e.g. 10")
        _check(self.diagnostics_top_k >= 0, "diagnostics_top_k", self.diagnostics_top_k, "use 0 (off) or a few examples, e.g. 5")
        if self.stream_batch_size is not None:
            # An unbiased HSIC needs 4 distinct examples per batch.
            _check(self.stream_batch_size >= 4, "stream_batch_size", self.stream_batch_size, "use null (in-memory) or a batch of at least 4 examples, e.g. 512")
            for m in self.measures:
                _check(m in STREAM_MEASURES, "measures", m, f"with stream_batch_size only {list(STREAM_MEASURES)} stream; drop {m} or set stream_batch_size=null")
            if self.cross_layer:
                _check("minibatch_cka" in self.measures, "cross_layer", True,
                       "streaming has exact CKA only on the diagonal: add minibatch_cka to measures for the layer x layer matrix, or set stream_batch_size=null")
        else:
            _check("minibatch_cka" not in self.measures, "measures", "minibatch_cka", "minibatch_cka needs stream_batch_size (e.g. 512); drop it or set the batch size")
        _check(not self.within_model or self.cross_layer, "within_model", True, "within-model matrices are layer x layer: also set cross_layer=true")

    @property
    def cka_measures(self) -> list:
        return [m for m in self.measures if m in CKA_MEASURES]

    @property
    def other_measures(self) -> list:
        return [m for m in self.measures if m in OTHER_MEASURES]


def _check(ok: bool, name: str, value, fix: str) -> None:
    if not ok:
        raise SimilarityError(f"similarity.{name}={value!r} is invalid: {fix}")
