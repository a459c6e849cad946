"""Similarity engine: CKA (linear, RBF, debiased), layer x layer matrices, streaming and statistics.

Library API (numpy arrays, memmaps or torch tensors on any device):
    cka, linear_cka, debiased_cka, rbf_cka     one pair of [n, d] representations
    cka_matrix                                 every layer pair of [n, La, da] x [n, Lb, db]
    svcca, pwcca, procrustes, mutual_knn       the other measures, one pair
    streaming_cka, minibatch_cka               n too large for n x n Grams
    bias_floor                                 sqrt(dx dy / ((n+dx)(n+dy))), biased CKA of unrelated data
    adjust_p_values, adjust_rows               Holm / Benjamini-Hochberg adjusted p-values
Pipeline API:
    similarity_rows   -> similarity.csv rows (ROW_KEYS)
    diagnostics_rows  -> similarity_diagnostics.csv rows (DIAGNOSTIC_KEYS)
    SimilarityConfig  <- conf/similarity/default.yaml
See docs/similarity.md for each measure's formula, estimator and when to use it.
"""

from ._arrays import SimilarityWarning
from .estimators import bias_floor, cka, cka_matrix, debiased_cka, linear_cka, rbf_cka
from .config import MEASURES, SimilarityConfig, SimilarityError
from .diagnostics import DIAGNOSTIC_KEYS, diagnostics_rows
from .measures import mutual_knn, procrustes, pwcca, svcca
from .rows import ROW_KEYS, adjust_p_values, adjust_rows, similarity_rows
from .stream import minibatch_cka, streaming_cka

__all__ = [
    "DIAGNOSTIC_KEYS",
    "MEASURES",
    "ROW_KEYS",
    "SimilarityConfig",
    "SimilarityError",
    "SimilarityWarning",
    "adjust_p_values",
    "adjust_rows",
    "bias_floor",
    "cka",
    "cka_matrix",
    "debiased_cka",
    "diagnostics_rows",
    "linear_cka",
    "minibatch_cka",
    "mutual_knn",
    "procrustes",
    "pwcca",
    "rbf_cka",
    "similarity_rows",
    "streaming_cka",
    "svcca",
]
