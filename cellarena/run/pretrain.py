"""Pretraining an in-suite transformer on its corpus, with evaluation cells excluded and verified.

The workflow's ``pretrain_transformer`` rule calls :func:`pretrain_model` once per in-suite model
(a model card whose ``pretraining`` has a ``recipe``). Steps:

1. read the prepared datasets the corpus card lists, tag each cell with its dataset as ``batch``;
2. for every evaluation dataset of the plan, find the corpus cells that are also evaluation cells
   (:func:`cellarena.data.leakage.overlap`) and drop them;
3. check again on what is left: any evaluation cell still found is an error, never a silent leak;
4. pretrain with the recipe and the plan's seed, and write the checkpoint
   (``<out>.safetensors`` + ``<out>.json``), whose card records the corpus id, version and hash,
   the exclusion per evaluation dataset, and the cost (seconds, device, attention kernel).
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np

from cellarena.cards.corpus import load_corpus
from cellarena.errors import CellarenaError, DataError
from cellarena.data.leakage import overlap
from cellarena.cards.model import load_model_card
from cellarena.data.prepare import provenance

log = logging.getLogger(__name__)


def build_corpus(corpus_files: dict[str, str | Path]) -> ad.AnnData:
    """The prepared datasets of a corpus, concatenated on the union of their genes."""
    parts = {}
    for dataset_id, path in corpus_files.items():
        adata = ad.read_h5ad(path)
        info = provenance(adata)
        if info.get("status") != "ok":
            raise DataError(f"corpus dataset {dataset_id} failed to prepare: {info.get('reason')}", where=path)
        parts[dataset_id] = ad.AnnData(X=None, obs=adata.obs[[]].copy(), var=adata.var[[]].copy(),
                                       layers={"counts": adata.layers["counts"]})
    corpus = ad.concat(parts, join="outer", label="batch", index_unique=":", fill_value=0)
    corpus.obs["batch"] = corpus.obs["batch"].astype(str)
    return corpus


def exclude_evaluation(corpus: ad.AnnData, evaluation_files: dict[str, str | Path]) -> tuple[ad.AnnData, dict]:
    """Drop corpus cells found in any evaluation dataset; verify none is left. Returns (corpus, report)."""
    drop = np.zeros(corpus.n_obs, dtype=bool)
    report = {}
    evaluations = {}
    for dataset_id, path in evaluation_files.items():
        adata = ad.read_h5ad(path)
        if provenance(adata).get("status") != "ok" or adata.n_obs == 0:
            report[dataset_id] = {"skipped": "dataset failed to prepare"}
            continue
        evaluations[dataset_id] = adata
        ov = overlap(corpus, adata)
        drop |= ov.corpus_mask
        report[dataset_id] = {"before": ov.summary()}
    kept = corpus[~drop].copy()
    for dataset_id, adata in evaluations.items():
        after = overlap(kept, adata)
        if after.n_found:
            raise CellarenaError(f"{after.n_found} cells of {dataset_id} are still in the corpus after "
                                 "exclusion", fix="report this: the exclusion must leave none")
        report[dataset_id]["after"] = after.summary()
    return kept, {"n_corpus_cells": int(corpus.n_obs), "n_excluded": int(drop.sum()),
                  "n_kept": int(kept.n_obs), "datasets": report}


def pretrain_model(model_dir: str | Path, corpus_card: str | Path, corpus_files: dict[str, str | Path],
                   evaluation_files: dict[str, str | Path], out: str | Path, *, seed: int,
                   git_commit: str | None = None, device: str = "cpu") -> dict:
    """Pretrain the in-suite model of ``model_dir`` on its corpus; returns the checkpoint card."""
    from cellarena.zoo.transformer import api  # noqa: PLC0415  (torch is imported only here)
    from cellarena.zoo.transformer.checkpoint import read_card  # noqa: PLC0415

    card = load_model_card(model_dir)
    where = Path(model_dir) / "model.yaml"
    if card.pretraining is None or card.pretraining.recipe is None:
        raise CellarenaError("this model has no in-suite pretraining recipe", where=where,
                             fix="add pretraining.recipe to the card, or supply a checkpoint yourself")
    corpus = load_corpus(corpus_card)
    if corpus.id != card.pretraining.corpus:
        raise CellarenaError(f"model declares corpus {card.pretraining.corpus!r}, got card {corpus.id!r}",
                             where=corpus_card)
    if corpus.kind != "in_suite":
        raise CellarenaError("only an in_suite corpus can be built here", where=corpus_card)
    if set(corpus_files) != set(corpus.datasets):
        raise CellarenaError(f"corpus lists {corpus.datasets}, files given for {sorted(corpus_files)}",
                             where=corpus_card)
    if str(device or "cpu").startswith("cuda"):
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise CellarenaError("pretraining on cuda was asked for, but torch sees no CUDA device", where=where,
                                 fix="pretrain with --device cpu (config: device: cpu), or on a machine with a GPU")
    recipe = card.pretraining.recipe
    data = build_corpus({d: corpus_files[d] for d in corpus.datasets})
    evaluation = {k: v for k, v in evaluation_files.items() if k not in corpus.datasets}
    data, exclusion = exclude_evaluation(data, evaluation)
    if data.n_obs == 0:
        raise CellarenaError("no corpus cells are left after excluding the evaluation cells",
                             where=corpus_card, fix="add datasets to the corpus that no task evaluates on")
    config = api.preset(recipe.preset, recipe.encoding, **recipe.config)
    log.info("pretraining %s on %d cells of %s", card.id, data.n_obs, corpus.id)
    api.pretrain_on_adata(
        data, config, corpus_id=corpus.id, sample_keys=tuple(recipe.sample_keys), epochs=recipe.epochs,
        batch_size=recipe.batch_size, lr=recipe.lr, mask_fraction=recipe.mask_fraction,
        max_steps=recipe.max_steps, seed=seed, device=device, checkpoint_path=out, git_commit=git_commit,
        card_extra={"model_id": card.id, "model_version": card.version, "corpus_version": corpus.version,
                    "recipe": recipe.model_dump(mode="json"), "exclusion": exclusion})
    return read_card(out)


def write_failed_checkpoint(out: str | Path, reason: str) -> None:
    """Outputs that record a failed pretraining: plug-ins turn them into ``failed`` rows."""
    import json  # noqa: PLC0415

    from cellarena.zoo.transformer.checkpoint import CARD_FORMAT, checkpoint_paths  # noqa: PLC0415

    weights, card = checkpoint_paths(out)
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"")
    card.write_text(json.dumps({"format": CARD_FORMAT, "status": "failed", "reason": reason}, indent=1))
