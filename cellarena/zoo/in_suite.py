"""The plug-in class shared by the in-suite transformers (``models/tiny_*``).

A model folder's ``model.py`` only names its folder::

    from pathlib import Path
    from cellarena.zoo.in_suite import TransformerPlugin

    class Model(TransformerPlugin):
        card_dir = Path(__file__).parent

The workflow pretrains the model with its card's ``pretraining.recipe`` and passes the checkpoint
as ``RunContext.checkpoint``. Loading checks the checkpoint against the recipe (encoding, preset,
overrides) and refuses a mismatch. Parameters (``model.yaml`` ``params``):

- ``finetune_epochs``, ``finetune_batch_size``, ``finetune_lr``, ``freeze_encoder``: annotation
  (a classification head on the cell embedding; ``freeze_encoder: true`` trains the head alone);
  ``finetune_min_steps``: at least this many optimizer steps, so a small training set gets more
  epochs (490 cells in batches of 64 are 8 steps an epoch) — the epochs used are
  ``max(finetune_epochs, ceil(finetune_min_steps / steps_per_epoch))``; ``finetune_max_cells``
  (null: all): fine-tune on at most this many training cells, drawn stratified by label with the
  run's seed (a quick plan's budget);
- ``batch_size``: cells per inference batch (halved automatically on a CUDA out-of-memory).
- ``perturb_lr``, ``perturb_epochs``, ``perturb_max_cells``, ``perturb_min_steps``,
  ``perturb_eval_cells``: perturbation (:mod:`cellarena.zoo.transformer.perturb`); each fold is
  fine-tuned for ``max(perturb_min_steps, ceil(perturb_epochs * min(perturbed cells,
  perturb_max_cells) / finetune_batch_size))`` steps, and a query's change is averaged over up to
  ``perturb_eval_cells`` control cells of its context.

What ran is reported in the result rows' ``runtime_json``: attention kernel, device, checkpoint
(corpus, steps, pretraining seconds, weights hash), fine-tuning seconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from cellarena.cards.dataset import CONTROL
from cellarena.errors import NotApplicable
from cellarena.cards.model import load_model_card
from cellarena.plugin import BaseModel


class TransformerPlugin(BaseModel):
    card_dir: ClassVar[Path | None] = None

    def _load(self):
        if getattr(self, "_ckpt", None) is not None:
            return self._ckpt
        from cellarena.zoo.transformer import api  # noqa: PLC0415

        if self.context.checkpoint is None:
            raise NotApplicable("no pretrained checkpoint was given: run it through the workflow "
                                "(rule pretrain_transformer) or pass --checkpoint")
        from cellarena.zoo.transformer.checkpoint import read_card  # noqa: PLC0415

        status = read_card(self.context.checkpoint)
        if status.get("status") == "failed":
            raise RuntimeError(f"pretraining failed: {status.get('reason')}")
        recipe = load_model_card(self.card_dir).pretraining.recipe
        expect = api.preset(recipe.preset, recipe.encoding, **recipe.config).to_dict()
        for field in ("vocab_size", "gene_offset", "n_genes"):
            expect.pop(field, None)
        self._ckpt = api.load(self.context.checkpoint, expect=expect, device=self.context.device)
        card = self._ckpt.card
        extra = card.get("extra", {})
        self.context.runtime.update({
            "checkpoint": {"corpus_id": card["corpus_id"], "corpus_hash": card["corpus_hash"],
                           "steps": card["steps"], "seed": card["seed"], "final_loss": card["final_loss"],
                           "weights_sha256": card["weights_sha256"][:16],
                           "excluded_cells": extra.get("exclusion", {}).get("n_excluded")},
            "pretrain_s": extra.get("seconds"),
            "pretrain_device": extra.get("device"),
            "encoding": card["encoding"],
            "n_parameters": card["n_parameters"],
        })
        return self._ckpt

    def _report_attention(self, model) -> None:
        self.context.runtime["attention"] = model.last_attention_backend
        self.context.runtime["device"] = self.context.device

    def embed(self, adata, *, solution=None) -> np.ndarray:
        from cellarena.zoo.transformer import api  # noqa: PLC0415

        ckpt = self._load()
        z = api.embed_adata(ckpt.model, ckpt.vocab, adata, batch_size=int(self.params.get("batch_size", 128)),
                            device=self.context.device)
        self._report_attention(ckpt.model)
        return z

    def fit(self, train, labels) -> None:
        from cellarena.zoo.transformer import api  # noqa: PLC0415

        ckpt = self._load()
        max_cells = self.params.get("finetune_max_cells")
        if max_cells is not None and train.n_obs > int(max_cells):
            from cellarena.data.splits import subsample  # noqa: PLC0415

            labels = np.asarray(labels)
            keep = subsample(pd.DataFrame({"cell_type": labels.astype(str)}), int(max_cells), self.context.seed)
            train, labels = train[keep], labels[keep]
        self.context.runtime["finetune_cells_used"] = int(train.n_obs)
        batch_size = int(self.params["finetune_batch_size"])
        steps_per_epoch = math.ceil(train.n_obs / batch_size)
        epochs = max(int(self.params["finetune_epochs"]),
                     math.ceil(int(self.params.get("finetune_min_steps", 0)) / steps_per_epoch))
        self._clf = api.fit_classifier(
            ckpt.model, ckpt.vocab, train, labels, epochs=epochs,
            batch_size=batch_size, lr=float(self.params["finetune_lr"]),
            seed=self.context.seed, device=self.context.device,
            freeze_encoder=bool(self.params.get("freeze_encoder", False)))
        self.context.runtime["finetune_s"] = round(self._clf.seconds, 3)
        self.context.runtime["finetune_epochs_used"] = epochs
        self.context.runtime["finetune_batch_size_used"] = self._clf.batch_size

    def predict(self, test, *, solution=None) -> np.ndarray:
        from cellarena.zoo.transformer import api  # noqa: PLC0415

        pred = api.predict_adata(self._clf, self._ckpt.vocab, test,
                                 batch_size=int(self.params.get("batch_size", 128)), device=self.context.device)
        self._report_attention(self._clf.module.encoder)
        return pred

    def fit_perturbation(self, train) -> None:
        from cellarena.data.perturbation import TrainingProfiles  # noqa: PLC0415
        from cellarena.zoo.transformer.perturb import finetune_perturbation  # noqa: PLC0415
        from cellarena.zoo.transformer.tokenize import CellTokenizer  # noqa: PLC0415

        ckpt = self._load()
        self._profiles = TrainingProfiles(train)
        self._pert = train.obs["perturbation"].astype(str).to_numpy()
        self._ctx = train.obs["context"].astype(str).to_numpy()
        has_ctrl = np.isin(self._ctx, list(self._profiles.ctrl))
        ctrl_mean = np.zeros((train.n_obs, train.n_vars), dtype=np.float32)
        for c, profile in self._profiles.ctrl.items():
            ctrl_mean[self._ctx == c] = profile
        delta = np.asarray(train.X.toarray(), dtype=np.float32) - ctrl_mean
        pert = np.where(has_ctrl, self._pert, CONTROL)  # cells of a context without controls: unused
        # the fine-tuning reads a few hundred control cells and prediction a few per query: each is
        # tokenized when drawn (the same tokens as tokenizing every training cell up front, which took
        # 2.8 s of each of Kang's folds)
        self._cells = CellTokenizer.from_config(ckpt.vocab, ckpt.model.config).on_demand(train)
        batch_size = int(self.params["finetune_batch_size"])
        n_perturbed = int((pert != CONTROL).sum())
        steps = max(int(self.params.get("perturb_min_steps", 30)),
                    math.ceil(float(self.params.get("perturb_epochs", 1.0))
                              * min(n_perturbed, int(self.params.get("perturb_max_cells", 2048))) / batch_size))
        self._fitted = finetune_perturbation(
            ckpt.model, ckpt.vocab, self._cells, pert, self._ctx, delta, steps=steps, batch_size=batch_size,
            lr=float(self.params.get("perturb_lr", 5e-4)), seed=self.context.seed, device=self.context.device)
        runtime = self.context.runtime
        runtime["finetune_s"] = round(runtime.get("finetune_s", 0.0) + self._fitted.seconds, 3)
        runtime["finetune_steps"] = runtime.get("finetune_steps", 0) + steps

    def predict_perturbation(self, queries, *, solution=None) -> np.ndarray:
        from cellarena.zoo.transformer.perturb import predict_changes  # noqa: PLC0415

        rng = self.context.rng
        n_eval = int(self.params.get("perturb_eval_cells", 256))
        out = []
        for context, perturbation in zip(queries["context"], queries["perturbation"]):
            idx = np.flatnonzero((self._pert == CONTROL) & (self._ctx == context))
            if idx.size > n_eval:
                idx = np.sort(rng.choice(idx, n_eval, replace=False))
            change = predict_changes(self._fitted, self._cells.subset(idx), perturbation,
                                     batch_size=int(self.params.get("batch_size", 128)), device=self.context.device)
            out.append(self._profiles.control(context) + change)
        self._report_attention(self._fitted.module.encoder)
        return np.stack(out)
