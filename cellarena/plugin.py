"""The model plug-in interface.

A plug-in is ``models/<id>/model.py`` defining a class ``Model`` that subclasses :class:`BaseModel`.
It only computes: the runner owns seeds, threads, device choice, timing, memory and output checks.

What a plug-in receives is the model's view of the data only. For annotation, ``fit`` gets the
training cells with their labels and ``predict`` gets the test cells *without* labels; the true test
labels (the solution) go to the metrics, and to nothing else — except a ``control`` whose card sets
``uses_solution: true`` (a positive control), which receives them through ``predict(solution=...)``.

AnnData objects passed in hold integer counts in ``layers["counts"]`` and the canonical obs roles.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from cellarena.errors import NotApplicable

__all__ = ["BaseModel", "RunContext", "NotApplicable"]


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the runner tells a plug-in about the run."""

    seed: int
    threads: int
    device: str  # "cpu" or e.g. "cuda"
    work_dir: Path  # a scratch folder for this run

    @property
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


class BaseModel:
    """Subclass and implement the methods of the tasks your ``model.yaml`` declares.

    - annotation: ``fit(train, labels)`` then ``predict(test) -> labels`` (1-d, one per test cell)
    - integration / zero_shot: ``embed(adata) -> array (n_cells, d)``; ``adata.obs`` has ``batch``
      when the dataset has one, never ``cell_type``. A control whose card sets ``uses_solution``
      also receives the true cell types: ``embed(adata, solution=labels)``.
    Raise :class:`NotApplicable` with a reason when the input does not fit the model
    (organism, gene IDs, ...).
    """

    def __init__(self, params: dict[str, Any], context: RunContext):
        self.params = dict(params)
        self.context = context

    def fit(self, train: ad.AnnData, labels: np.ndarray) -> None:
        raise NotImplementedError

    def predict(self, test: ad.AnnData, *, solution: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def embed(self, adata: ad.AnnData, *, solution: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError
