"""A simulated Perturb-seq screen on real background cells, with a known response.

The offline stand-in for a genetic screen (Norman/Adamson/Replogle cannot be downloaded on every
machine): real unperturbed cells are assigned to perturbations, and the counts of the genes a
perturbation affects are changed so that their expected value is multiplied by ``exp(effect)``.
Everything else in a cell stays the measured count, so library sizes, sparsity and cell-type mixture
are those of the real background.

The response model (procedure ``perturbseq_programs``):

- ``n_programs`` disjoint response programs of ``program_size`` expressed genes, each with a signed
  log fold change per gene (magnitude ~ ``effect_scale``).
- Each target gene loads on one primary program (weight 0.7-1.3) and, for half the targets, on a
  second one (weight 0.3); it also changes 10 target-specific genes (half-size effects) and itself
  (``target_log_fold_change``, CRISPRa-like). Targets sharing a program respond alike, which is
  what lets a model generalize to unseen targets.
- A double perturbation ``a+b`` has the sum of the two single effects, plus, for a fraction
  ``interaction_fraction`` of pairs, a non-additive term: synergy (program part scaled by 1.6) or
  buffering (scaled by 0.4), and 15 emergent genes that neither single changes.

Counts are changed per cell and gene (only genes with a non-zero effect): with ``f = exp(effect)``
and ``mu`` the cell's expected count (library size x its cell type's mean gene fraction),
``new = Binomial(count, min(f, 1)) + Poisson(max(f - 1, 0) * mu)``; when ``count`` has mean ``mu``
the new count has mean ``f * mu``.

The ground truth (targets, programs, every perturbation's effect vector and interaction type) is
stored as JSON in ``uns["cellarena_simulation"]``.
"""

from __future__ import annotations

import itertools
import json

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellarena.cards.dataset import COMBO_SEPARATOR, CONTROL, ScreenSimulation
from cellarena.errors import DataError
from cellarena.data.features import group_means

N_SPECIFIC = 10
N_EMERGENT = 15
SECONDARY_WEIGHT = 0.3
SYNERGY, BUFFERING = 1.6, 0.4


def _candidate_genes(names: np.ndarray, mean: np.ndarray, min_mean: float) -> np.ndarray:
    """Indices of genes with at least ``min_mean`` counts per cell; mitochondrial and ribosomal genes
    and clone-style names (``RP11-...``, ``AC0123.4``) excluded."""
    upper = np.char.upper(names.astype(str))
    excluded = (np.char.startswith(upper, "RPL") | np.char.startswith(upper, "RPS")
                | (np.char.find(upper, "-") >= 0) | (np.char.find(upper, ".") >= 0))
    return np.flatnonzero((mean >= min_mean) & ~excluded)


def design_screen(names: np.ndarray, mean: np.ndarray, spec: ScreenSimulation) -> dict:
    """Targets, programs, pairs and the effect vector (log fold change per gene) of every perturbation."""
    rng = np.random.default_rng(spec.seed)
    n_genes = names.size
    targets = _candidate_genes(names, mean, spec.min_target_mean)
    if targets.size < spec.n_targets:
        raise DataError(f"only {targets.size} genes have a mean count >= {spec.min_target_mean}; the "
                        f"simulation asks for {spec.n_targets} targets",
                        fix="lower simulation.n_targets or simulation.min_target_mean in the card")
    targets = np.sort(rng.choice(targets, spec.n_targets, replace=False))
    expressed = np.setdiff1d(_candidate_genes(names, mean, 0.05), targets)
    need = spec.n_programs * spec.program_size
    if expressed.size < need + N_SPECIFIC + N_EMERGENT:
        raise DataError(f"{expressed.size} expressed genes cannot hold {spec.n_programs} programs of "
                        f"{spec.program_size} genes", fix="lower simulation.n_programs or program_size")
    program_genes = rng.choice(expressed, need, replace=False).reshape(spec.n_programs, spec.program_size)
    programs = np.zeros((spec.n_programs, n_genes))
    for k, genes in enumerate(program_genes):
        signs = np.where(rng.random(genes.size) < 0.7, 1.0, -1.0)
        programs[k, genes] = signs * spec.effect_scale * rng.lognormal(0.0, 0.3, genes.size)

    singles: dict[str, np.ndarray] = {}
    program_part: dict[str, np.ndarray] = {}
    for i, t in enumerate(targets):
        weights = np.zeros(spec.n_programs)
        weights[i % spec.n_programs] = rng.uniform(0.7, 1.3)
        if spec.n_programs > 1 and rng.random() < 0.5:
            other = rng.choice([k for k in range(spec.n_programs) if k != i % spec.n_programs])
            weights[other] = SECONDARY_WEIGHT
        prog = weights @ programs
        effect = prog.copy()
        specific = rng.choice(expressed, N_SPECIFIC, replace=False)
        effect[specific] += rng.choice([-1.0, 1.0], N_SPECIFIC) * 0.5 * spec.effect_scale
        effect[t] += spec.target_log_fold_change
        name = str(names[t])
        singles[name], program_part[name] = effect, prog

    all_pairs = list(itertools.combinations(sorted(singles), 2))
    if spec.n_doubles > len(all_pairs):
        raise DataError(f"{spec.n_targets} targets make only {len(all_pairs)} pairs; "
                        f"{spec.n_doubles} doubles were asked for", fix="lower simulation.n_doubles")
    chosen = sorted(rng.choice(len(all_pairs), spec.n_doubles, replace=False)) if spec.n_doubles else []
    effects = dict(singles)
    interactions: dict[str, str] = {}
    for idx in chosen:
        a, b = all_pairs[idx]
        effect = singles[a] + singles[b]
        kind = "additive"
        if rng.random() < spec.interaction_fraction:
            kind = "synergy" if rng.random() < 0.5 else "buffering"
            factor = SYNERGY if kind == "synergy" else BUFFERING
            effect = effect + (factor - 1.0) * (program_part[a] + program_part[b])
            quiet = np.flatnonzero((singles[a] == 0) & (singles[b] == 0))
            quiet = np.intersect1d(quiet, expressed)
            emergent = rng.choice(quiet, N_EMERGENT, replace=False)
            effect[emergent] += rng.choice([-1.0, 1.0], N_EMERGENT) * spec.effect_scale
        name = COMBO_SEPARATOR.join(sorted((a, b)))
        effects[name], interactions[name] = effect, kind
    return {"targets": [str(names[t]) for t in targets], "effects": effects, "interactions": interactions,
            "program_genes": [[str(names[g]) for g in genes] for genes in program_genes]}


def _cell_type_fractions(counts: sp.csr_matrix, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean gene fraction per group (rows) and each cell's row index into it."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    _, codes, fractions = group_means(sp.diags(1.0 / np.maximum(totals, 1.0)) @ counts, groups)
    return fractions, codes


def simulate_screen(background: ad.AnnData, spec: ScreenSimulation) -> ad.AnnData:
    """Assign ``background`` cells (``layers["counts"]``) to a simulated screen and perturb their counts.

    Returns a new AnnData of the used cells with ``obs["perturbation"]`` (canonical labels), the
    background's other obs columns, the changed counts in ``layers["counts"]`` and the ground truth
    in ``uns["cellarena_simulation"]`` (JSON).
    """
    rng = np.random.default_rng(spec.seed + 1)
    counts = sp.csr_matrix(background.layers["counts"], dtype=np.float64)
    names = background.var_names.to_numpy().astype(str)
    mean = np.asarray(counts.mean(axis=0)).ravel()
    design = design_screen(names, mean, spec)
    labels = [CONTROL] * spec.n_control_cells
    for name in design["effects"]:
        labels += [name] * spec.cells_per_perturbation
    if len(labels) > background.n_obs:
        raise DataError(f"the screen needs {len(labels)} cells and the background has {background.n_obs}",
                        fix="lower simulation.cells_per_perturbation, n_control_cells or n_doubles")
    cells = np.sort(rng.choice(background.n_obs, len(labels), replace=False))
    labels = np.asarray(labels, dtype=object)[rng.permutation(len(labels))]
    sub = counts[cells]
    groups = (background.obs["cell_type"].astype(str).to_numpy()[cells] if "cell_type" in background.obs
              else np.zeros(cells.size, dtype=str))
    fractions, codes = _cell_type_fractions(sub, groups)
    totals = np.asarray(sub.sum(axis=1)).ravel()
    change_rows, change_cols, change_vals = [], [], []
    for name, effect in design["effects"].items():
        rows = np.flatnonzero(labels == name)
        genes = np.flatnonzero(effect)
        f = np.exp(effect[genes])
        observed = sub[rows][:, genes].toarray()
        mu = totals[rows, None] * fractions[codes[rows]][:, genes]
        kept = rng.binomial(observed.astype(np.int64), np.minimum(f, 1.0)[None, :])
        added = rng.poisson(np.maximum(f - 1.0, 0.0)[None, :] * mu)
        r, c = np.meshgrid(rows, genes, indexing="ij")
        change_rows.append(r.ravel())
        change_cols.append(c.ravel())
        change_vals.append((kept + added - observed).ravel())
    delta = sp.csr_matrix((np.concatenate(change_vals), (np.concatenate(change_rows),
                                                         np.concatenate(change_cols))), shape=sub.shape)
    out_counts = sp.csr_matrix(sub + delta, dtype=np.float32)
    out_counts.eliminate_zeros()
    obs = background.obs.iloc[cells].copy()
    obs["perturbation"] = pd.Categorical(labels.astype(str))
    out = ad.AnnData(X=out_counts, obs=obs, var=background.var.copy())
    truth = {"spec": spec.model_dump(mode="json"), "targets": design["targets"],
             "program_genes": design["program_genes"], "interactions": design["interactions"],
             "effects": {k: {str(names[g]): round(float(v[g]), 6) for g in np.flatnonzero(v)}
                         for k, v in design["effects"].items()}}
    out.uns["cellarena_simulation"] = json.dumps(truth, sort_keys=True)
    return out
