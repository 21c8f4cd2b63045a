"""Deterministic, seeded train/test splits stored as files with a content hash.

A split file is JSON: the split id, the dataset id and version it was made for, the scheme and its
parameters, the seed, the list of train and test cell IDs, and ``hash`` — the sha256 of the
assignment (dataset id, version and every ``cell<TAB>fold`` line in the prepared file's cell order).
Same prepared data + same scheme + same seed gives the same hash.

Schemes:

- ``stratified``: a random ``test_fraction`` of cells, stratified by cell type when labels exist.
  Cell types with fewer than two cells stay in train.
- ``all``: every cell is evaluated and none is used for training (embedding tasks: integration
  and zero-shot score an embedding of the whole dataset).
- ``heldout``: every cell whose ``role`` (batch / donor / condition) is one of ``test_values`` is
  test; the rest is train (e.g. train on control cells, annotate stimulated ones).

``max_cells`` (any scheme) first draws at most that many cells, stratified by cell type with the
split's seed (each seed draws its own cells; every split of a dataset with the same seed and cap
draws the same ones), and applies the scheme to those; the other cells are in neither list (fold
``unused`` in the hash). The default plan caps its splits so that three seeds run in minutes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from cellarena.errors import DataError


class SplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["stratified", "heldout", "all"]
    test_fraction: float = Field(0.3, gt=0, lt=1)
    role: Literal["batch", "donor", "condition"] | None = None
    test_values: list[str] = Field(default_factory=list)
    max_cells: int | None = Field(None, ge=10)

    def required_role(self) -> str | None:
        return self.role if self.scheme == "heldout" else None

    def applies_to(self, card) -> bool:
        """A held-out split needs its role in the dataset card; the other schemes fit every dataset."""
        role = self.required_role()
        return role is None or role in card.role_columns()


def split_id(name: str, seed: int) -> str:
    return f"{name}_seed{seed}"


def assignment_hash(dataset_id: str, version: int, cells, folds) -> str:
    h = hashlib.sha256(f"{dataset_id}\t{version}\n".encode())
    for c, f in zip(cells, folds):
        h.update(f"{c}\t{f}\n".encode())
    return h.hexdigest()[:16]


def _cell_types(obs: pd.DataFrame) -> np.ndarray:
    if "cell_type" in obs:
        return obs["cell_type"].astype(str).to_numpy()
    return np.zeros(len(obs), dtype=object)


def subsample(obs: pd.DataFrame, max_cells: int, seed: int) -> np.ndarray:
    """A boolean mask of ``max_cells`` cells of ``obs`` (all of them when it has no more), stratified
    by cell type: each type keeps its share (rounded, at least one cell); the largest types take or
    give up what rounding left over.
    Its own generator (seed, cap), so that the scheme's draws do not change which cells are kept."""
    n = len(obs)
    keep = np.zeros(n, dtype=bool)
    if n <= max_cells:
        keep[:] = True
        return keep
    rng = np.random.default_rng([seed, max_cells])
    groups = _cell_types(obs)
    types, counts = np.unique(groups, return_counts=True)
    quota = np.maximum(np.round(counts * max_cells / n).astype(int), 1)
    for i in np.argsort(-counts, kind="stable"):  # the largest types first
        gap = max_cells - int(quota.sum())
        if gap == 0:
            break
        quota[i] = min(max(quota[i] + gap, 1), counts[i])
    for g, k in zip(types, quota):
        idx = np.flatnonzero(groups == g)
        keep[rng.permutation(idx)[:k]] = True
    return keep


def assign(obs: pd.DataFrame, spec: SplitSpec, seed: int) -> np.ndarray:
    """Return an array of 'train' / 'test' (and 'unused', under ``max_cells``) for each row of
    ``obs`` (prepared obs)."""
    if spec.max_cells is not None and len(obs) > spec.max_cells:
        keep = subsample(obs, spec.max_cells, seed)
        folds = np.full(len(obs), "unused", dtype=object)
        folds[keep] = assign(obs[keep], spec.model_copy(update={"max_cells": None}), seed)
        return folds
    n = len(obs)
    folds = np.full(n, "train", dtype=object)
    if spec.scheme == "all":
        folds[:] = "test"
        return folds
    if spec.scheme == "heldout":
        if spec.role not in obs:
            raise DataError(f"split needs role {spec.role!r}, which this dataset does not have")
        values = obs[spec.role].astype(str).to_numpy()
        folds[np.isin(values, spec.test_values)] = "test"
        return folds
    rng = np.random.default_rng(seed)
    groups = _cell_types(obs)
    for g in sorted(set(groups)):
        idx = np.flatnonzero(groups == g)
        if idx.size < 2:
            continue
        n_test = int(round(spec.test_fraction * idx.size))
        n_test = min(max(n_test, 1), idx.size - 1)
        folds[rng.permutation(idx)[:n_test]] = "test"
    return folds


def make_split(obs: pd.DataFrame, *, dataset_id: str, dataset_version: int, name: str,
               spec: SplitSpec, seed: int) -> dict:
    folds = assign(obs, spec, seed)
    cells = obs.index.astype(str).to_numpy()
    return {
        "split_id": split_id(name, seed),
        "dataset_id": dataset_id,
        "dataset_version": int(dataset_version),
        "scheme": spec.model_dump(mode="json"),
        "seed": int(seed),
        "status": "ok",
        "reason": "",
        "hash": assignment_hash(dataset_id, dataset_version, cells, folds),
        "n_train": int((folds == "train").sum()),
        "n_test": int((folds == "test").sum()),
        "train": cells[folds == "train"].tolist(),
        "test": cells[folds == "test"].tolist(),
    }


def failed_split(*, dataset_id: str, dataset_version: int, name: str, spec: SplitSpec, seed: int,
                 reason: str) -> dict:
    return {"split_id": split_id(name, seed), "dataset_id": dataset_id,
            "dataset_version": int(dataset_version), "scheme": spec.model_dump(mode="json"),
            "seed": int(seed), "status": "failed", "reason": reason, "hash": "",
            "n_train": 0, "n_test": 0, "train": [], "test": []}


def write_split(split: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(split))
    tmp.replace(path)
    return path


def read_split(path: str | Path) -> dict:
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read split file: {exc}", where=path,
                        fix="re-create it with `cellarena split`") from None
    if split.get("status") == "ok":
        cells = list(split["train"]) + list(split["test"])
        if len(set(cells)) != len(cells):
            raise DataError("a cell is in both train and test", where=path)
    return split
