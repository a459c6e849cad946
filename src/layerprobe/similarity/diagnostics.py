"""Diagnostics for similarity.csv: rogue dimensions and outlier examples -> similarity_diagnostics.csv.

A CKA value can be carried by one feature of enormous variance (the "rogue dimensions" of
Timkey & van Schijndel 2021, common in LLM residual streams) or by a handful of examples
with huge norms. Two checks make that visible:

- `top_dim_variance_share` (per model and layer): the share of the layer's total variance
  held by its single highest-variance dimension (`dim` = that dimension). Near 1 means
  linear CKA there mostly measures that one coordinate.
- `norm_ratio`, `loo_delta_linear_cka`, `loo_delta_debiased_cka` (per model pair and matched
  layer, for the `diagnostics_top_k` examples with the largest centred norm in either
  model): the example's squared centred norm over the layer's mean, and how much CKA
  changes when that example alone is left out (value without it minus value with it).

Leaving one example out is exact and cheap: CKA is a function of the Grams (GramStats),
and dropping example i removes row and column i, so the statistics are updated with
K's row i (one matrix-vector product) instead of being recomputed.
"""

import warnings
from typing import Optional

import torch

from ._arrays import SimilarityWarning
from .estimators import GramStats, centred_with_scale, feature_stats
from .rows import as_config, prepare_run

DIAGNOSTIC_KEYS = ("task", "model_a", "model_b", "layer", "diagnostic", "value", "example_id", "dim")


def diagnostics_rows(task: str, features: dict, pairs, cfg, ids=None, layers=None, rows=None) -> list:
    """Rows of similarity_diagnostics.csv; same inputs as `similarity_rows`.

    Columns: task, model_a, model_b (None for per-model rows), layer, diagnostic, value,
    example_id (the example's id, or its row number without ids; None for per-model rows),
    dim (the dimension for top_dim_variance_share, else None).
    """
    cfg = as_config(cfg)
    run = prepare_run(features, pairs, cfg, ids, layers, rows)
    out = []
    roles = list(dict.fromkeys(r for p in run.pairs for r in p))
    for role in roles:
        for layer in run.layers[role]:
            c, _ = centred_with_scale(run.features[role], layer, run.device, run.rows)
            var = c.square().sum(0)
            top = int(var.argmax())
            share = float(var[top] / var.sum()) if float(var.sum()) > 0 else float("nan")
            out.append(_row(task, role, None, layer, "top_dim_variance_share", share, None, top))
    if cfg.diagnostics_top_k == 0:
        return out
    with warnings.catch_warnings():  # NaN CKA of constant layers is reported by similarity_rows already
        warnings.simplefilter("ignore", SimilarityWarning)
        for a, b in run.pairs:
            if a == b or len(run.layers[a]) != len(run.layers[b]):
                continue
            for la, lb in zip(run.layers[a], run.layers[b]):
                out += _leave_one_out(task, run, a, b, la, lb, cfg.diagnostics_top_k)
    return out


def _leave_one_out(task, run, a, b, layer_a, layer_b, top_k) -> list:
    xa, raw_a = centred_with_scale(run.features[a], layer_a, run.device, run.rows)
    xb, raw_b = centred_with_scale(run.features[b], layer_b, run.device, run.rows)
    st = feature_stats([xa], [xb], True, raw_a[None], raw_b[None])
    full = {"linear_cka": float(st.cka(False)[0]), "debiased_cka": float(st.cka(True)[0])}
    ratio = torch.fmax(st.diag_a[0] / st.diag_a[0].mean(), st.diag_b[0] / st.diag_b[0].mean())  # fmax: a constant layer gives 0/0
    rows = []
    for i in ratio.argsort(descending=True)[: min(top_k, run.n)].tolist():
        example = run.ids[i] if run.ids is not None else i
        rows.append(_row(task, a, b, layer_a, "norm_ratio", float(ratio[i]), example, None))
        if run.n - 1 < 4:
            continue
        loo = without_example(st, xa @ xa[i], xb @ xb[i], i)
        for measure, debiased in (("linear_cka", False), ("debiased_cka", True)):
            rows.append(_row(task, a, b, layer_a, f"loo_delta_{measure}", float(loo.cka(debiased)[0]) - full[measure], example, None))
    return rows


def without_example(st: GramStats, k_row: torch.Tensor, l_row: torch.Tensor, i: int) -> GramStats:
    """GramStats of the same (paired, single-layer) Grams with example i's row and column removed.

    k_row, l_row: row i of K and L (any translation of the features gives the same result).
    """
    keep = torch.ones(st.n, dtype=torch.bool, device=k_row.device)
    keep[i] = False
    ki, li = k_row[keep], l_row[keep]  # K_ij for j != i
    return GramStats(
        n=st.n - 1,
        cross=st.cross - 2 * (ki * li).sum(),
        self_a=st.self_a - 2 * (ki * ki).sum(),
        self_b=st.self_b - 2 * (li * li).sum(),
        diag_a=st.diag_a[:, keep],
        diag_b=st.diag_b[:, keep],
        rows_a=st.rows_a[:, keep] - ki,
        rows_b=st.rows_b[:, keep] - li,
        zero_a=st.zero_a,
        zero_b=st.zero_b,
        paired=True,
    )


def _row(task, model_a, model_b, layer, diagnostic, value, example_id: Optional[object], dim: Optional[int]) -> dict:
    return dict(zip(DIAGNOSTIC_KEYS, (task, model_a, model_b, int(layer), diagnostic, value, example_id, dim)))
