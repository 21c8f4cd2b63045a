"""Bootstrap replicates of a metric within one split: resample the test units with replacement.

A unit is what a metric averages over or counts: a test cell for annotation, a query (one held-out
perturbation in one context) for perturbation. Every model scored on the same split gets the **same
resamples** (:func:`resamples` draws them from the split's hash, the unit count and the replicate
count only), so replicate ``b`` of two models is the same test set drawn twice, and their
difference replicate by replicate is a paired bootstrap of the difference (Efron & Tibshirani 1993,
ch. 6; Bouthillier et al. 2021 for why the test sample is one of the variance sources of a
benchmark). How the replicates of several seeds combine into one interval is
:mod:`cellarena.analysis.intervals`.

Pure functions on arrays; the drivers in ``cellarena/run`` call them, and the replicates travel in
the results table's ``bootstrap_json`` column (:func:`encode`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_REPLICATES = 200
UNITS = ("cells", "queries")


def resamples(n_units: int, key: str, replicates: int = DEFAULT_REPLICATES) -> np.ndarray:
    """``replicates`` x ``n_units`` indices drawn with replacement from ``range(n_units)``.

    Seeded by ``key`` (the split's hash and seed: every model of one split shares it) and
    ``n_units``, so the same split always gives the same resamples, on every machine.
    """
    if n_units < 1:
        raise ValueError(f"cannot resample {n_units} units")
    digest = hashlib.sha256(f"{key}|{n_units}|{replicates}".encode()).digest()
    rng = np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))
    return rng.integers(0, n_units, size=(replicates, n_units))


def replicate(fn: Callable[..., float], arrays: Sequence[np.ndarray], index: np.ndarray) -> np.ndarray:
    """``fn`` on every resample: ``fn(*(a[i] for a in arrays))`` for each row ``i`` of ``index``."""
    arrays = [np.asarray(a) for a in arrays]
    return np.array([fn(*(a[i] for a in arrays)) for i in index], dtype=float)


def replicate_mean(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The mean of per-unit ``values`` on every resample, non-finite units left out (as the point
    value leaves them out); NaN for a resample with no finite unit."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    picked, weight = np.where(finite, values, 0.0)[index], finite[index]
    count = weight.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, picked.sum(axis=1) / np.maximum(count, 1), np.nan)


def encode(unit: str, n_units: int, values: np.ndarray) -> str:
    """The replicates as canonical JSON for the ``bootstrap_json`` column (7 significant digits:
    enough for an interval, a fifth of the text of full precision)."""
    if unit not in UNITS:
        raise ValueError(f"unknown bootstrap unit {unit!r}; choose one of {UNITS}")
    vals = [None if not np.isfinite(v) else float(f"{v:.7g}") for v in np.asarray(values, dtype=float)]
    return json.dumps({"unit": unit, "n_units": int(n_units), "values": vals}, separators=(",", ":"))


def decode(text: str) -> tuple[str, int, np.ndarray]:
    """``(unit, n_units, values)`` of a ``bootstrap_json`` cell; ``("", 0, empty)`` when the row has
    none (a metric that does not split into units, a failed run, a submitted result)."""
    record = json.loads(text or "{}")
    if not record:
        return "", 0, np.empty(0)
    values = np.array([np.nan if v is None else v for v in record["values"]], dtype=float)
    return record["unit"], int(record["n_units"]), values
