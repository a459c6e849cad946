"""Reading feature arrays (numpy, numpy memmap, torch on any device) one layer at a time.

Every similarity computation starts here: a layer is read as `[n, d]`, moved to the
compute device and centred in float64 before anything is multiplied, so fp16/bf16
stores cannot overflow and the mean cannot swamp the signal.
"""

import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from .config import SimilarityError


class SimilarityWarning(UserWarning):
    """A result is NaN on purpose (zero variance, too few examples) or examples were dropped."""


def is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def num_examples(x) -> int:
    return int(x.shape[0])


def read_layer(x, layer: Optional[int], device, rows: Optional[np.ndarray] = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One layer of `x` ([n, L, d], or [n, d] when layer is None) as `dtype` on `device`.

    A memmap is sliced before conversion, so only this layer's rows are read into memory.
    """
    part = x if layer is None else x[:, layer]
    if is_torch(x):
        if rows is not None:
            part = part[torch.as_tensor(rows, device=part.device)]
        return part.to(device=device, dtype=dtype)
    if rows is not None:
        part = part[rows]
    return torch.from_numpy(np.asarray(part, dtype=torch.empty((), dtype=dtype).numpy().dtype)).to(device)


def input_bits(x) -> int:
    """Bits per value of the stored features (16 for fp16/bf16, 32, 64)."""
    return 8 * (x.element_size() if is_torch(x) else x.dtype.itemsize)


def resolve_layers(x, layers: Optional[Sequence[int]], name: str) -> list:
    """Layer indices into `x` ([n, L+1, d]); negative indices count from the last layer."""
    total = int(x.shape[1])
    if layers is None:
        return list(range(total))
    out = []
    for layer in layers:
        idx = int(layer) + total if int(layer) < 0 else int(layer)
        if not 0 <= idx < total:
            raise SimilarityError(f"layer {layer} is out of range for {name}, which has layers 0..{total - 1}; pick layers in that range")
        out.append(idx)
    return out


def check_stack(x, name: str, ndim: int) -> None:
    if len(x.shape) != ndim:
        want = "[n, d]" if ndim == 2 else "[n, layers, d]"
        raise SimilarityError(f"{name} has shape {tuple(x.shape)}; expected {want}")


def check_pair(a, b, ndim: int, names=("a", "b")):
    """Two representations of the same examples ([n, d] or [n, L, d]); b=None means a again."""
    b = a if b is None else b
    check_stack(a, names[0], ndim)
    check_stack(b, names[1], ndim)
    check_same_examples(a, b, *names)
    return b


def device_of(x, device=None) -> torch.device:
    """The requested device, else the input's (torch), else the CPU (numpy)."""
    if device is not None:
        return torch.device(device)
    return x.device if is_torch(x) else torch.device("cpu")


def check_same_examples(a, b, name_a: str, name_b: str) -> None:
    """Two stores compare example by example: their counts must agree."""
    na, nb = num_examples(a), num_examples(b)
    if na != nb:
        raise SimilarityError(f"{name_a} has {na} examples but {name_b} has {nb}; compare both models on the same example ids")


def check_same_ids(ids_a: list, ids_b: list, name_a: str, name_b: str) -> None:
    """The ids of two stores' compared rows must agree, row by row."""
    if len(ids_a) != len(ids_b):
        raise SimilarityError(f"{name_a} has {len(ids_a)} ids but {name_b} has {len(ids_b)}; compare both models on the same example ids")
    if list(ids_a) != list(ids_b):
        i = next(i for i, (p, q) in enumerate(zip(ids_a, ids_b)) if p != q)
        raise SimilarityError(
            f"example ids differ between {name_a} and {name_b} at row {i} ({ids_a[i]!r} vs {ids_b[i]!r}); "
            "align both stores on the same example ids"
        )


def finite_rows(x, layers: Sequence[int], select: Optional[np.ndarray] = None, chunk: int = 4096) -> np.ndarray:
    """Boolean per compared example (all store rows, or `select`): finite at every one of `layers`.

    Reads `chunk` rows at a time, so a memmap is never loaded whole.
    """
    n = num_examples(x) if select is None else len(select)
    ok = np.ones(n, dtype=bool)
    for start in range(0, n, chunk):
        block = x[start : start + chunk] if select is None else x[select[start : start + chunk]]
        block = block[:, list(layers)]
        good = torch.isfinite(block).flatten(1).all(1).cpu().numpy() if is_torch(block) else np.isfinite(block).reshape(len(block), -1).all(1)
        ok[start : start + chunk] = good
    return ok


def joint_rows(feats: dict, layers: dict, nan_policy: str, ids=None, select: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Positions (among the compared examples: all store rows, or `select`) that are finite in every model.

    NaN/inf anywhere drops the example from all models together (``mask``) or is an
    error naming model, layer and example (``error``); one model never loses rows alone.
    Returns None when nothing is dropped. `ids` follow the compared examples.
    """
    n = num_examples(next(iter(feats.values()))) if select is None else len(select)
    keep = np.ones(n, dtype=bool)
    for role, x in feats.items():
        ok = finite_rows(x, layers[role], select)
        if not ok.all() and nan_policy == "error":
            i = int(np.flatnonzero(~ok)[0])
            row = x[i if select is None else int(select[i])][list(layers[role])]
            row = row.cpu().numpy() if is_torch(row) else np.asarray(row)
            layer = layers[role][int(np.argwhere(~np.isfinite(row))[0][0])]
            example = ids[i] if ids is not None else i
            raise SimilarityError(
                f"model '{role}' has NaN/inf at layer {layer} for example {example!r} ({int((~ok).sum())} examples affected); "
                "fix the features, or use nan_policy='mask' (similarity.nan_policy=mask) to drop those examples from every model"
            )
        keep &= ok
    if keep.all():
        return None
    warnings.warn(
        f"dropped {int((~keep).sum())} of {n} examples with NaN/inf from every model ({', '.join(feats)}) jointly",
        SimilarityWarning,
        stacklevel=3,
    )
    return np.flatnonzero(keep)


def as_output(values: torch.Tensor, like):
    """Results come back in the kind of array the caller gave: numpy, or torch on its device."""
    if is_torch(like):
        return values.to(like.device)
    return values.cpu().numpy()
