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
import random
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from cellarena.errors import NotApplicable

__all__ = ["BaseModel", "RunContext", "NotApplicable", "require_batches", "one_hot"]


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the runner tells a plug-in about the run."""

    seed: int
    threads: int
    device: str  # "cpu" or "cuda" (the row's `device` column holds the GPU's name)
    work_dir: Path  # a scratch folder for this run
    checkpoint: Path | None = None  # pretrained weights the workflow made for this model, if any
    checkpoints_dir: Path | None = None  # where published releases are (adapters); None: the default place
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the plug-in reports about how it ran (attention kernel, precision, batch size used...);
    stored with the result rows as ``runtime_json``."""

    @property
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


class BaseModel:
    """Subclass and implement the methods of the tasks your ``model.yaml`` declares.

    - annotation: ``fit(train, labels)`` then ``predict(test) -> labels`` (1-d, one per test cell)
    - integration / zero_shot: ``embed(adata) -> array (n_cells, d)``; ``adata.obs`` has ``batch``
      when the dataset has one, never ``cell_type``. A control whose card sets ``uses_solution``
      also receives the true cell types: ``embed(adata, solution=labels)``.
    - perturbation: ``fit_perturbation(train)`` then ``predict_perturbation(queries) -> array
      (n_queries, n_genes)``: the mean log-normalized expression (``X`` of the training view) of
      each query's cells. ``train.obs`` has ``perturbation`` (``ctrl`` or targets joined by ``+``)
      and ``context`` (cell type, or ``all``); ``queries`` is a DataFrame with the same two
      columns. A query's context always has control cells in ``train``. A control whose card sets
      ``uses_solution`` receives, per query, the log-normalized matrix of its true cells.
    - tuning for integration (optional): ``held_out_loss(train, held_out) -> float``, lower is
      better: fit on ``train`` (counts and ``obs["batch"]`` only) and return a label-free loss on
      the ``held_out`` cells, e.g. scVI's negative ELBO per cell. Annotation tuning needs nothing
      more than ``fit``/``predict``.
    Raise :class:`NotApplicable` with a reason when the input does not fit the model
    (organism, gene IDs, ...).

    An adapter of published weights subclasses its family's plug-in in cellarena/zoo/adapters/,
    which finds the release in ``context.checkpoints_dir``; ``cellarena validate`` runs it on a
    random-weight release in the official file layout (cellarena/zoo/adapters/random_weights.py)
    when the real checkpoint is absent.
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

    def held_out_loss(self, train: ad.AnnData, held_out: ad.AnnData) -> float:
        raise NotImplementedError

    def fit_perturbation(self, train: ad.AnnData) -> None:
        raise NotImplementedError

    def predict_perturbation(self, queries, *, solution: list | None = None) -> np.ndarray:
        raise NotImplementedError


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and (where installed) torch's generators: done before each plug-in
    instance is constructed, so that a plug-in that forgets to use ``context.seed`` is still repeatable."""
    random.seed(seed)
    np.random.seed(seed)  # for libraries that still read the global state
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return
    torch.manual_seed(seed)


def require_batches(adata: ad.AnnData, who: str) -> np.ndarray:
    """``obs["batch"]`` as strings; :class:`NotApplicable` unless there are at least two batches."""
    if "batch" not in adata.obs:
        raise NotApplicable(f"{who} needs a batch (obs['batch']) and this dataset has none")
    batch = adata.obs["batch"]
    if batch.isna().any():
        raise NotApplicable("obs['batch'] has missing values")
    batch = batch.astype(str).to_numpy()
    if np.unique(batch).size < 2:
        raise NotApplicable(f"{who} needs at least two batches; obs['batch'] has one")
    return batch


def one_hot(values, n_expected: int) -> np.ndarray:
    """One column per distinct value (sorted), 1.0 where a cell has that value."""
    values = np.asarray(values).astype(str)
    if values.ndim != 1 or values.shape[0] != n_expected:
        raise ValueError(f"expected {n_expected} labels, one per cell; got shape {values.shape}")
    levels, codes = np.unique(values, return_inverse=True)
    out = np.zeros((values.shape[0], levels.size))
    out[np.arange(values.shape[0]), codes.reshape(-1)] = 1.0
    return out
