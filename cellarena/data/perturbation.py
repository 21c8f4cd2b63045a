"""The perturbation-response task: splits, the gene panel, and what models and metrics see.

A *query* is (context, perturbation): predict the mean expression profile of the cells of
``perturbation`` in ``context`` (a cell type, or ``all`` for a single-context screen) from training
cells that never include them. Profiles are means of log-normalized expression
(``log1p(counts / total * 1e4)``) over the task's gene panel.

Split schemes (one split file can hold several *folds*, each with its own train cells and queries):

- ``heldout_context`` (stimulation, e.g. Kang 2018 IFN-beta): one fold per context (cell type);
  the fold's test cells are that context's perturbed cells, everything else is training, including
  the context's own control cells, which are the model's input. Each fold is one rotation.
- ``unseen_perturbations`` (genetic screens, as in GEARS' simulation split): a seeded fraction of
  single-target perturbations is held out; a double is held out when either of its targets is, and
  a seeded fraction of the doubles whose two singles are both seen is held out too. Query
  categories: ``single_unseen``, ``double_seen0``, ``double_seen1``, ``double_seen2`` (how many of
  its singles the model saw).

Control cells (``ctrl``) are always training cells.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from cellarena.cards.dataset import COMBO_SEPARATOR, CONTROL
from cellarena.errors import DataError
from cellarena.data.features import group_means, log_normalize, top_variable_genes
from cellarena.data.labels import UNASSIGNED
from cellarena.data.splits import SplitSpec, split_id

SINGLE_CONTEXT = "all"


class PerturbationSplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["heldout_context", "unseen_perturbations"]
    context_role: Literal["cell_type", "batch", "donor"] | None = Field(
        None, description="obs role that is the context; null: one context ('all')")
    min_cells: int = Field(20, ge=2, description="queries (and control groups) with fewer cells are skipped")
    test_single_fraction: float = Field(0.25, gt=0, lt=1)
    test_double_fraction: float = Field(0.5, ge=0, lt=1,
                                        description="of the doubles whose singles are both seen")

    def applies_to(self, card) -> bool:
        """The scheme fits the kind of perturbations the dataset card declares."""
        return card.perturbations is not None and SCHEME_KIND[self.scheme] == card.perturbations.kind


# the kind of perturbation (cellarena/cards/dataset.py Perturbations.kind) each scheme holds out
SCHEME_KIND = {"heldout_context": "stimulus", "unseen_perturbations": "genetic"}


def split_spec(raw: dict) -> SplitSpec | PerturbationSplitSpec:
    """A split scheme from its config or JSON form: a perturbation scheme or a cell split."""
    spec = PerturbationSplitSpec if raw.get("scheme") in SCHEME_KIND else SplitSpec
    return spec.model_validate(raw)


def contexts(obs: pd.DataFrame, spec: PerturbationSplitSpec) -> np.ndarray:
    if spec.context_role is None:
        return np.full(len(obs), SINGLE_CONTEXT, dtype=object)
    if spec.context_role not in obs:
        raise DataError(f"the split's context role {spec.context_role!r} is not in this dataset")
    return obs[spec.context_role].astype(str).to_numpy()


def targets(perturbation: str) -> list[str]:
    return [] if perturbation == CONTROL else perturbation.split(COMBO_SEPARATOR)


def _fold(name, cells, test_mask, queries) -> dict:
    return {"name": name, "train": cells[~test_mask].tolist(), "test": cells[test_mask].tolist(),
            "queries": queries}


def _heldout_context_folds(spec, ctx, pert, cells) -> list[dict]:
    folds = []
    for c in sorted(set(ctx) - {UNASSIGNED}):
        in_c = ctx == c
        if (in_c & (pert == CONTROL)).sum() < spec.min_cells:
            continue
        queries = [{"context": c, "perturbation": p, "category": c, "n_cells": int((in_c & (pert == p)).sum())}
                   for p in sorted(set(pert[in_c]) - {CONTROL})]
        queries = [q for q in queries if q["n_cells"] >= spec.min_cells]
        if not queries:
            continue
        test = in_c & np.isin(pert, [q["perturbation"] for q in queries])
        folds.append(_fold(c, cells, test, queries))
    return folds


def _unseen_perturbation_folds(spec, ctx, pert, cells, seed) -> list[dict]:
    rng = np.random.default_rng(seed)
    sizes = pd.Series(pert).value_counts()
    usable = sorted(p for p, n in sizes.items() if p != CONTROL and n >= spec.min_cells)
    singles = [p for p in usable if len(targets(p)) == 1]
    doubles = [p for p in usable if len(targets(p)) == 2]
    if len(singles) < 2:
        raise DataError(f"unseen_perturbations needs at least 2 single perturbations with "
                        f">= {spec.min_cells} cells; found {len(singles)}")
    n_test = min(max(1, int(round(spec.test_single_fraction * len(singles)))), len(singles) - 1)
    held = set(rng.permutation(singles)[:n_test].tolist())
    seen = {t for p in singles if p not in held for t in targets(p)}
    category = {p: "single_unseen" for p in held}
    seen2 = []
    for p in doubles:
        k = sum(t in seen for t in targets(p))
        if k == 2:
            seen2.append(p)
        else:
            category[p] = f"double_seen{k}"
    n_held2 = int(round(spec.test_double_fraction * len(seen2)))
    for p in rng.permutation(seen2)[:n_held2].tolist():
        category[p] = "double_seen2"
    queries = [{"context": c, "perturbation": p, "category": category[p],
                "n_cells": int(((pert == p) & (ctx == c)).sum())}
               for p in sorted(category) for c in sorted(set(ctx[pert == p]))]
    queries = [q for q in queries if q["n_cells"] >= spec.min_cells]
    test = np.isin(pert, sorted(category))
    return [_fold("unseen", cells, test, queries)]


def make_perturbation_split(obs: pd.DataFrame, *, dataset_id: str, dataset_version: int, name: str,
                            spec: PerturbationSplitSpec, seed: int) -> dict:
    """A split file's content (see :mod:`cellarena.data.splits` for the common fields) with ``folds``."""
    if "perturbation" not in obs:
        raise DataError("dataset has no perturbation role", fix="map roles.perturbation in its card")
    cells = obs.index.astype(str).to_numpy()
    pert = obs["perturbation"].astype(str).to_numpy()
    ctx = contexts(obs, spec)
    if spec.scheme == "heldout_context":
        if spec.context_role is None:
            raise DataError("heldout_context needs a context_role (e.g. cell_type)")
        folds = _heldout_context_folds(spec, ctx, pert, cells)
    else:
        folds = _unseen_perturbation_folds(spec, ctx, pert, cells, seed)
    if not folds or not any(f["queries"] for f in folds):
        raise DataError(f"the {spec.scheme} split leaves no query with >= {spec.min_cells} cells")
    digest = hashlib.sha256(f"{dataset_id}\t{dataset_version}\n".encode())
    digest.update(json.dumps(folds, sort_keys=True).encode())
    return {
        "split_id": split_id(name, seed), "dataset_id": dataset_id, "dataset_version": int(dataset_version),
        "scheme": spec.model_dump(mode="json"), "seed": int(seed), "status": "ok", "reason": "",
        "hash": digest.hexdigest()[:16],
        "n_train": int(max(len(f["train"]) for f in folds)),
        "n_test": int(sum(len(f["test"]) for f in folds)),
        "train": [], "test": [], "folds": folds,
    }


def panel_data(adata: ad.AnnData, n_genes: int) -> ad.AnnData:
    """The task's view of a prepared dataset: the gene panel, with ``X`` = log-normalized expression
    (normalized by each cell's full library size) and ``layers["counts"]`` on the panel genes.

    The panel: the ``n_genes`` most variable genes (log-normalized, all cells) plus every perturbation
    target present in the data. Like GEARS' gene selection it sees which genes vary, never a model.
    """
    x = log_normalize(adata.layers["counts"])
    genes = set(top_variable_genes(x, n_genes).tolist())
    names = pd.Index(adata.var_names)
    for p in adata.obs["perturbation"].astype(str).unique():
        for t in targets(p):
            pos = names.get_indexer([t])[0]
            if pos >= 0:
                genes.add(int(pos))
    panel = np.array(sorted(genes))
    counts = sp.csr_matrix(adata.layers["counts"])[:, panel]
    return ad.AnnData(X=sp.csr_matrix(x[:, panel]), obs=adata.obs.copy(), var=adata.var.iloc[panel].copy(),
                      layers={"counts": counts})


def model_view(panel: ad.AnnData, context_values: np.ndarray) -> ad.AnnData:
    """What a model sees of cells of :func:`panel_data`: ``X`` (log-normalized), counts, and
    ``obs[["perturbation", "context"]]`` only."""
    obs = pd.DataFrame({"perturbation": panel.obs["perturbation"].astype(str).to_numpy(),
                        "context": np.asarray(context_values, dtype=str)}, index=panel.obs_names.copy())
    return ad.AnnData(X=sp.csr_matrix(panel.X), obs=obs, var=panel.var[[]].copy(),
                      layers={"counts": sp.csr_matrix(panel.layers["counts"])})


# --------------------------------------------------------------------------------------------------
# Helpers shared by the perturbation baselines (they see only the training view)
# --------------------------------------------------------------------------------------------------

class TrainingProfiles:
    """Mean log-normalized profiles of the training view, per (context, perturbation).

    - ``ctrl[context]``: the control mean of each context;
    - ``deltas``: DataFrame (one row per perturbed training group, columns ``context``,
      ``perturbation``) aligned with ``delta`` (n_groups, n_genes): group mean minus its context's
      control mean.
    """

    def __init__(self, train: ad.AnnData):
        keys = train.obs["context"].astype(str) + "\x1f" + train.obs["perturbation"].astype(str)
        levels, _, means = group_means(train.X, keys.to_numpy())
        pairs = [k.split("\x1f") for k in levels]
        self.ctrl = {c: means[i] for i, (c, p) in enumerate(pairs) if p == CONTROL}
        rows = [(i, c, p) for i, (c, p) in enumerate(pairs) if p != CONTROL and c in self.ctrl]
        self.groups = pd.DataFrame([(c, p) for _, c, p in rows], columns=["context", "perturbation"])
        self.delta = (np.stack([means[i] - self.ctrl[c] for i, c, _ in rows]) if rows
                      else np.zeros((0, train.n_vars)))
        self.n_genes = train.n_vars

    def control(self, context: str) -> np.ndarray:
        if context not in self.ctrl:
            raise DataError(f"no control cells of context {context!r} in the training data")
        return self.ctrl[context]

    def mean_delta(self) -> np.ndarray:
        """The average change of all perturbed training groups (zero when there are none)."""
        return self.delta.mean(axis=0) if len(self.delta) else np.zeros(self.n_genes)

    def single_delta(self, target: str, context: str) -> np.ndarray | None:
        """The training change of the single perturbation ``target``: in ``context`` when it was seen
        there, else averaged over the contexts where it was seen; None if never seen."""
        hit = (self.groups["perturbation"] == target).to_numpy()
        if not hit.any():
            return None
        same = hit & (self.groups["context"] == context).to_numpy()
        return self.delta[same if same.any() else hit].mean(axis=0)

    def reference(self, context: str) -> np.ndarray:
        """Control of ``context`` plus the average training change (Systema's perturbed reference)."""
        return self.control(context) + self.mean_delta()

    def seen(self, perturbation: str) -> bool:
        """Whether ``perturbation`` itself is a training group (in some context)."""
        return bool((self.groups["perturbation"] == perturbation).any())

    def context_deltas(self, perturbation: str) -> tuple[list[str], np.ndarray]:
        """Contexts where ``perturbation`` was seen, and its change in each (rows aligned)."""
        hit = (self.groups["perturbation"] == perturbation).to_numpy()
        return self.groups.loc[hit, "context"].tolist(), self.delta[hit]


def gene_embedding(profiles: TrainingProfiles, n_comps: int) -> np.ndarray:
    """Genes x K embedding: principal-component scores of the genes in the matrix of training
    profiles (genes as rows, one column per perturbed training group; each column centred), as the
    linear baseline of Ahlmann-Eltze et al. builds its gene and perturbation embeddings."""
    if len(profiles.delta) == 0:
        raise DataError("no perturbed training groups to learn a gene embedding from")
    means = profiles.delta + np.stack([profiles.control(c) for c in profiles.groups["context"]])
    m = means.T - means.T.mean(axis=0, keepdims=True)  # genes x groups, columns centred
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    k = max(1, min(n_comps, s.size))
    return u[:, :k] * s[:k]


def perturbation_embedding(perturbation: str, gene_names: pd.Index, genes: np.ndarray) -> np.ndarray:
    """Sum of the embedding rows of a perturbation's targets (zero for a target outside the panel)."""
    out = np.zeros(genes.shape[1])
    for t in targets(perturbation):
        pos = gene_names.get_indexer([t])[0]
        if pos >= 0:
            out += genes[pos]
    return out
