"""The runner's checks of what a plug-in returns. Each raises :class:`OutputError`, whose ``fix``
says what the plug-in should have returned; ``cellarena validate`` prints it under the failure."""

from __future__ import annotations

import numpy as np

from cellarena.errors import CellarenaError

NON_FINITE_FIX = ("the output holds NaN/inf/None: look for a division by zero (e.g. normalising an all-zero "
                  "cell), a log of 0, or a failed fit; every value must be finite")


class OutputError(CellarenaError, ValueError):
    """A plug-in returned something the task cannot score."""


def check_labels(pred, n_expected: int) -> np.ndarray:
    """Annotation predictions: one label per test cell, none missing; returned as strings."""
    arr = np.asarray(pred)
    if arr.ndim != 1 or arr.shape[0] != n_expected:
        raise OutputError(f"predict returned shape {arr.shape}, expected ({n_expected},): one label per test cell",
                          fix="predict must return one label per row of `test`: a 1-d array of length test.n_obs")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise OutputError("predict returned NaN labels", fix=NON_FINITE_FIX)
    if any(v is None for v in arr.tolist()):
        raise OutputError("predict returned None labels", fix=NON_FINITE_FIX)
    return arr.astype(str)


def check_known_labels(pred: np.ndarray, known: set) -> None:
    """Annotation predictions name only labels the model was given."""
    unknown = sorted(set(pred) - known)
    if unknown:
        raise OutputError(f"predict returned labels that fit() never received, e.g. {unknown[:3]}: return the "
                          "label strings passed to fit (not class indices)",
                          fix="return the label strings passed to fit (map class indices back, e.g. with "
                              "classes_[codes])")


def _finite_numbers(arr: np.ndarray, who: str, dtype) -> np.ndarray:
    """``arr`` as ``dtype`` if it holds numbers, none of them NaN or inf; else an OutputError naming ``who``."""
    if arr.dtype.kind not in "fiu":
        raise OutputError(f"{who} returned dtype {arr.dtype}, expected a numeric array",
                          fix="return a numeric numpy array (float32 or float64)")
    arr = arr.astype(dtype)
    if not np.isfinite(arr).all():
        raise OutputError(f"{who} returned {int((~np.isfinite(arr)).sum())} non-finite values (NaN or inf)",
                          fix=NON_FINITE_FIX)
    return arr


def check_embedding(emb, n_expected: int) -> np.ndarray:
    """Embeddings: (n_cells, d), numeric, finite; returned as float32."""
    arr = np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] != n_expected or arr.shape[1] < 1:
        raise OutputError(f"embed returned shape {arr.shape}, expected ({n_expected}, d) with d >= 1",
                          fix="embed must return an array (n_cells, d): one row per cell of `adata`, d >= 1")
    return _finite_numbers(arr, "embed", np.float32)


def check_profiles(pred, n_queries: int, n_genes: int) -> np.ndarray:
    """Perturbation predictions: (n_queries, n_genes), finite; returned as float64."""
    arr = np.asarray(pred)
    if arr.ndim != 2 or arr.shape != (n_queries, n_genes):
        raise OutputError(f"predict_perturbation returned shape {arr.shape}, expected ({n_queries}, {n_genes}): "
                          "one profile over the panel genes per query",
                          fix="predict_perturbation must return an array (n_queries, n_genes): one profile per "
                              "row of `queries` over the genes of the training data, in their order")
    return _finite_numbers(arr, "predict_perturbation", np.float64)
