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

Only the config is imported eagerly: the estimators (torch) load on first use, so the
command-line checks that read SimilarityConfig before Hydra starts stay fast.
"""
import importlib

from .config import MEASURES, SimilarityConfig, SimilarityError

_LAZY = {"SimilarityWarning": "_arrays", "bias_floor": "estimators", "cka": "estimators", "cka_matrix": "estimators",
         "debiased_cka": "estimators", "linear_cka": "estimators", "rbf_cka": "estimators",
         "DIAGNOSTIC_KEYS": "diagnostics", "diagnostics_rows": "diagnostics", "mutual_knn": "measures",
         "procrustes": "measures", "pwcca": "measures", "svcca": "measures", "ROW_KEYS": "rows",
         "adjust_p_values": "rows", "adjust_rows": "rows", "similarity_rows": "rows", "minibatch_cka": "stream",
         "streaming_cka": "stream"}

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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
