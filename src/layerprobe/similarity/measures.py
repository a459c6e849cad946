"""Similarity measures beyond CKA that users compare against: SVCCA, PWCCA, Procrustes, mutual k-NN.

All of them start from each layer's thin SVD Xc = U S V' (centred, float64) or, for mutual
k-NN, from each layer's neighbour lists; a layer is decomposed once and reused for every
layer it is compared with and for every permutation of the other model's rows
(permuting rows of U keeps it orthonormal, so no SVD is redone).

Sources:
- SVCCA: Raghu, Gilmer, Yosinski & Sohl-Dickstein, "SVCCA", NeurIPS 2017.
- PWCCA: Morcos, Raghu & Bengio, "Insights on representational similarity in neural
  networks with canonical correlation", NeurIPS 2018.
- Orthogonal Procrustes distance: Ding, Denain & Steinhardt, "Grounding representation
  similarity with statistical testing", NeurIPS 2021 (also Williams et al. 2021).
- Mutual k-NN alignment: Huh, Cheung, Wang & Isola, "The Platonic Representation
  Hypothesis", ICML 2024.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ._arrays import SimilarityWarning, check_pair, device_of, read_layer
from .config import SimilarityError
from .estimators import centred_with_scale, zero_variance

# Singular values below this fraction of the largest are numerical zeros (rank deficiency).
_RANK_RTOL = 1e-10
# Morcos et al.'s code keeps neurons with variance >= epsilon (their examples use 1e-10): dead
# neurons do not count; here relative to the layer's largest neuron variance, so units do not matter.
_NEURON_RTOL = 1e-10


@dataclass
class Spectrum:
    """Thin SVD of one centred layer: Xc = u diag(s) v', numerically zero directions dropped."""

    u: torch.Tensor  # [n, r]
    s: torch.Tensor  # [r]
    v: torch.Tensor  # [d, r]
    zero: bool = False  # a constant layer: every measure of it is NaN
    neurons: int = 0  # neurons (columns) whose variance survives the filter of Morcos et al.'s code

    def rows(self, idx: torch.Tensor) -> "Spectrum":
        """The same layer with its examples reordered (a permutation): still an exact SVD."""
        return Spectrum(self.u[idx], self.s, self.v, self.zero, self.neurons)

    def top_variance(self, share: float) -> int:
        """Fewest leading directions holding `share` of the variance (SVCCA's truncation)."""
        var = self.s**2
        cum = torch.cumsum(var, 0) / var.sum()
        return int(torch.searchsorted(cum, torch.tensor(share - 1e-12, dtype=cum.dtype, device=cum.device)).item()) + 1


def spectrum(centred: torch.Tensor, raw_scale: torch.Tensor) -> Spectrum:
    """SVD of a centred layer; `raw_scale` (sum of squares before centring) tells zero variance from small."""
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    zero = bool(zero_variance(centred.square().sum(), raw_scale, centred.shape[0]))
    rank = 0 if zero or not s.numel() else int((s > _RANK_RTOL * s[0]).sum())
    var = centred.square().sum(0)
    neurons = 0 if zero else int((var > _NEURON_RTOL * var.max()).sum())
    return Spectrum(u[:, :rank], s[:rank], vh[:rank].T, zero, neurons)


def _undefined(name: str, *sides) -> Optional[torch.Tensor]:
    """NaN, with a warning, when a side has zero variance: never a silent 0 or 1."""
    if not any(side is None or getattr(side, "zero", False) for side in sides):
        return None
    warnings.warn(f"{name} is NaN for a layer with zero variance (a constant representation)", SimilarityWarning, stacklevel=3)
    return torch.tensor(math.nan, dtype=torch.float64)


def canonical_correlations(ua: torch.Tensor, ub: torch.Tensor):
    """CCA of two column spaces given orthonormal bases: rho = svd(ua' ub). Returns (rho, P, Q)."""
    p, rho, qh = torch.linalg.svd(ua.T @ ub, full_matrices=False)
    return rho.clamp(0.0, 1.0), p, qh.T


def _warn_degenerate(ra: int, rb: int, n: int, name: str) -> None:
    # Two subspaces of the (n-1)-dim centred space share at least ra + rb - (n-1) directions,
    # so that many canonical correlations are 1 whatever the data.
    forced = ra + rb - (n - 1)
    if forced > 0:
        warnings.warn(
            f"{name}: ranks {ra} + {rb} exceed n-1 = {n - 1} examples, so {forced} canonical correlations are 1 by construction; "
            "compare more examples than dimensions (or lower svcca_variance)",
            SimilarityWarning,
            stacklevel=3,
        )


def svcca_value(a: Spectrum, b: Spectrum, share: float) -> torch.Tensor:
    """Mean canonical correlation after keeping the top-`share` variance directions of each side."""
    if (nan := _undefined("svcca", a, b)) is not None:
        return nan
    ka, kb = a.top_variance(share), b.top_variance(share)
    _warn_degenerate(ka, kb, a.u.shape[0], "svcca")
    rho, _, _ = canonical_correlations(a.u[:, :ka], b.u[:, :kb])
    return rho.mean()


def pwcca_value(a: Spectrum, b: Spectrum) -> torch.Tensor:
    """Projection-weighted mean canonical correlation, sum_i alpha_i rho_i.

    alpha_i ~ sum_j |<h_i, z_j>| over the neurons z_j (columns) of the side whose canonical
    variates h_i are used; as in Morcos et al.'s code (``compute_pwcca``) that is the side with
    fewer neurons surviving the variance filter (dead neurons do not count; model a on ties),
    so PWCCA is not symmetric.
    """
    if (nan := _undefined("pwcca", a, b)) is not None:
        return nan
    _warn_degenerate(a.u.shape[1], b.u.shape[1], a.u.shape[0], "pwcca")
    rho, p, q = canonical_correlations(a.u, b.u)
    side, rot = (a, p) if a.neurons <= b.neurons else (b, q)
    k = rho.numel()
    # h_i = U rot_i, z = U S V', so <h_i, z_j> = (rot' S V')_ij without touching the n rows.
    weights = (rot[:, :k].T @ (side.s[:, None] * side.v.T)).abs().sum(1)
    return (weights / weights.sum() * rho).sum()


PROCRUSTES_FORMS = {"procrustes": "metric", "procrustes_sq": "squared", "procrustes_angular": "angular"}


def procrustes_value(a: Spectrum, b: Spectrum, form: str = "metric") -> torch.Tensor:
    """Orthogonal Procrustes distance of the unit-Frobenius-norm centred layers A, B.

    With r = |A'B|_* (nuclear norm, in [0, 1]): ``squared`` = min_Q |A - B Q|_F^2 = 2 - 2r;
    ``metric`` = sqrt(2 - 2r), the Euclidean distance between the shapes (a metric: the
    triangle inequality holds); ``angular`` = arccos(r), the Riemannian shape metric of
    Williams et al. (2021). 0 = same up to rotation, translation and scale.
    """
    if (nan := _undefined("procrustes", a, b)) is not None:
        return nan
    m = (a.s[:, None] * (a.u.T @ b.u)) * b.s[None, :]
    r = (torch.linalg.svdvals(m).sum() / (a.s.norm() * b.s.norm())).clamp(0.0, 1.0)
    if form == "squared":
        return 2.0 - 2.0 * r
    if form == "metric":
        return torch.sqrt(2.0 - 2.0 * r)
    if form == "angular":
        return torch.arccos(r)
    raise SimilarityError(f"procrustes form={form!r} is invalid; use 'metric', 'squared' or 'angular'")


def knn_indices(x: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """[n, k] nearest neighbours by cosine similarity, self excluded (Huh et al.: normalise, no centring).

    None for a layer with zero variance: all its examples are the same point, so "nearest" is
    only tie-breaking.
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise SimilarityError(f"mutual_knn needs 1 <= knn_k < n, got knn_k={k} with n={n} examples; lower similarity.knn_k")
    if bool(zero_variance((x - x.mean(0)).square().sum(), x.square().sum(), n)):
        return None
    xn = torch.nn.functional.normalize(x, dim=1)
    sims = xn @ xn.T
    sims.fill_diagonal_(-float("inf"))
    return sims.topk(k, dim=1).indices


def mutual_knn_value(na: Optional[torch.Tensor], nb: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over examples of |kNN_a(i) & kNN_b(i)| / k."""
    if (nan := _undefined("mutual_knn", na, nb)) is not None:
        return nan
    n, k = na.shape
    return (na[:, :, None] == nb[:, None, :]).sum().double() / (n * k)


def permuted_knn(nb: Optional[torch.Tensor], perm: torch.Tensor) -> Optional[torch.Tensor]:
    """Neighbour lists of model b after its rows are reordered by `perm` (row i <- old row perm[i])."""
    if nb is None:
        return None
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse[nb[perm]]


# ----------------------------------------------------------------------------------------
# Public single-pair functions: x [n, dx], y [n, dy], numpy or torch


def _spectra(x, y):
    check_pair(x, y, 2, ("x", "y"))
    dev = device_of(x)
    return [spectrum(*centred_with_scale(z, None, dev)) for z in (x, y)]


def svcca(x, y, variance: float = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): mean CCA correlation of the top-`variance` SVD subspaces."""
    return float(svcca_value(*_spectra(x, y), variance))


def pwcca(x, y) -> float:
    """PWCCA (Morcos et al. 2018): canonical correlations weighted by how much of the layer they explain."""
    return float(pwcca_value(*_spectra(x, y)))


def procrustes(x, y, form: str = "metric") -> float:
    """Orthogonal Procrustes distance between normalised centred x and y (Ding et al. 2021; Williams et al. 2021).

    form: ``metric`` (default) sqrt(2 - 2 |A'B|_*) in [0, sqrt 2], a metric; ``squared``
    2 - 2 |A'B|_* in [0, 2] (not a metric); ``angular`` arccos |A'B|_* in [0, pi/2], a metric.
    """
    return float(procrustes_value(*_spectra(x, y), form=form))


def mutual_knn(x, y, k: int = 10, device: Optional[str] = None) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): average share of common cosine neighbours."""
    check_pair(x, y, 2, ("x", "y"))
    dev = device_of(x, device)
    return float(mutual_knn_value(knn_indices(read_layer(x, None, dev), k), knn_indices(read_layer(y, None, dev), k)))
