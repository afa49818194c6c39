"""Magnitude pruning, per weight matrix (one threshold per layer's matrix, not global).

    prune_unstructured(w, 0.9)   the 90 % smallest |w| of the matrix set to 0 -> packed as csr
    prune_2_4(w)                 in every 4 consecutive inputs the 2 smallest |w| set to 0 -> sparse24
"""
from __future__ import annotations

import numpy as np

from edgerun.errors import ConversionError


def prune_unstructured(w: np.ndarray, sparsity: float, name: str = "weight") -> np.ndarray:
    """A copy of w with round(sparsity * size) of its smallest-magnitude entries set to 0."""
    if not 0.0 <= sparsity < 1.0:
        raise ConversionError(f"{name}: sparsity must be in [0, 1), got {sparsity}")
    w = np.array(w, dtype=np.float32)
    k = int(round(sparsity * w.size))
    if k == 0:
        return w
    flat = w.reshape(-1)
    idx = np.argpartition(np.abs(flat), k - 1)[:k]
    flat[idx] = 0.0
    return w


def prune_2_4(w: np.ndarray, name: str = "weight") -> np.ndarray:
    """A copy of w keeping the 2 largest |w| of every group of 4 inputs (ties: the lower input)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % 4:
        raise ConversionError(f"{name}: 2:4 sparsity needs an input size that is a multiple of 4, "
                              f"got shape {tuple(w.shape)}")
    g = w.reshape(w.shape[0], -1, 4)
    drop = np.argsort(-np.abs(g), axis=2, kind="stable")[:, :, 2:]
    out = g.copy()
    np.put_along_axis(out, drop, 0.0, axis=2)
    return out.reshape(w.shape)


def sparsity_of(w: np.ndarray) -> float:
    return float((np.asarray(w) == 0).mean()) if np.asarray(w).size else 0.0
