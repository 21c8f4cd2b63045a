"""Fine-tuning a pretrained cell transformer to predict perturbation responses.

The model reads one *control* cell and a *perturbation token* and predicts the change of the
perturbed population's mean profile from its context's control mean (over the task's gene panel):

- the perturbation token is the sum of its targets' embeddings. A target that is a gene in the
  model's vocabulary uses that gene's pretrained token embedding (fine-tuned with the encoder), so
  a never-perturbed gene still has a meaningful token: this is what lets the model answer for
  unseen targets, as scGPT marks perturbed genes in its input. Any other target (a stimulus such
  as ``stim``) gets a learned embedding of its own; one never seen in training contributes zero.
- head: ``MLP([cell embedding of the control cell, perturbation token]) -> change per panel gene``.

Training pairs every perturbed training cell with a random control cell of its context (drawn
again each epoch); the target is that perturbed cell's profile minus its context's control mean,
so the average over cells is the population change. Prediction averages the head's output over
control cells of the query's context.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch
from torch import nn

from cellarena.cards.dataset import CONTROL
from cellarena.data.perturbation import targets
from cellarena.zoo.transformer.model import CellTransformer
from cellarena.zoo.transformer.tokenize import CellsOnDemand, GeneVocab, TokenizedCells
from cellarena.zoo.transformer.train import amp_autocast, batched_inference, seeded_rng, resolve_device


class PerturbationRegressor(nn.Module):
    def __init__(self, encoder: CellTransformer, n_outputs: int, labels: list[str], hidden: int = 256):
        super().__init__()
        self.encoder = encoder
        d = encoder.config.d_model
        self.labels = {name: i for i, name in enumerate(labels)}
        self.label_emb = nn.Embedding(max(1, len(labels)), d)
        nn.init.normal_(self.label_emb.weight, std=0.02)
        self.head = nn.Sequential(nn.Linear(2 * d, hidden), nn.GELU(), nn.Linear(hidden, n_outputs))

    def token(self, gene_ids: list[list[int]], label_ids: list[list[int]], device) -> torch.Tensor:
        """Perturbation tokens (B, d): gene token embeddings plus learned label embeddings, summed."""
        d = self.encoder.config.d_model
        out = torch.zeros(len(gene_ids), d, device=device)
        for i, (genes, labels) in enumerate(zip(gene_ids, label_ids)):
            if genes:
                out[i] = out[i] + self.encoder.token_emb(torch.as_tensor(genes, device=device)).sum(0)
            if labels:
                out[i] = out[i] + self.label_emb(torch.as_tensor(labels, device=device)).sum(0)
        return out

    def forward(self, batch, gene_ids, label_ids) -> torch.Tensor:
        z = self.encoder.forward_batch(batch).cell_embedding.float()
        return self.head(torch.cat([z, self.token(gene_ids, label_ids, z.device)], dim=1))


def target_ids(perturbation: str, vocab: GeneVocab, labels: dict[str, int]) -> tuple[list[int], list[int]]:
    """(gene token ids, learned-label ids) of a canonical perturbation's targets."""
    genes, learned = [], []
    for t in targets(perturbation):
        gid = int(vocab.gene_token_ids([t])[0])
        if gid >= 0:
            genes.append(gid)
        elif t in labels:
            learned.append(labels[t])
    return genes, learned


@dataclasses.dataclass
class FinetunedPerturbation:
    module: PerturbationRegressor
    vocab: GeneVocab
    losses: list[float]
    seconds: float
    steps: int


def finetune_perturbation(model: CellTransformer, vocab: GeneVocab, cells: TokenizedCells | CellsOnDemand,
                          perturbation: np.ndarray, context: np.ndarray, delta_targets: np.ndarray, *,
                          steps: int, batch_size: int, lr: float, seed: int = 0, device=None,
                          amp: bool = True) -> FinetunedPerturbation:
    """Fine-tune a copy of ``model`` for ``steps`` optimizer steps (AdamW, MSE).

    ``cells`` are the training cells (all of them, tokenized, or tokenized when drawn:
    :class:`CellsOnDemand`; only control cells are read); ``perturbation`` and ``context`` their
    labels; ``delta_targets`` (n_cells, n_genes) each cell's profile minus its context's control
    mean (used for perturbed cells only).
    """
    dev = resolve_device(device)
    perturbed = np.flatnonzero(perturbation != CONTROL)
    controls = {c: np.flatnonzero((perturbation == CONTROL) & (context == c)) for c in np.unique(context)}
    if perturbed.size == 0:
        raise ValueError("no perturbed training cells to fine-tune on")
    seen = np.unique(perturbation[perturbed])
    learned = sorted({t for p in seen for t in targets(p) if vocab.gene_token_ids([t])[0] < 0})
    t0 = time.perf_counter()
    with seeded_rng(seed, dev):
        reg = PerturbationRegressor(copy.deepcopy(model), delta_targets.shape[1], learned).to(dev)
        ids = {p: target_ids(p, vocab, reg.labels) for p in seen}
        opt = torch.optim.AdamW(reg.parameters(), lr=lr, weight_decay=0.01)
        rng = np.random.default_rng(seed)
        y_all = torch.as_tensor(delta_targets, dtype=torch.float32)
        losses: list[float] = []
        order, pos = rng.permutation(perturbed), 0
        reg.train()
        for _ in range(int(steps)):
            if pos >= order.size:
                order, pos = rng.permutation(perturbed), 0
            idx = order[pos:pos + batch_size]
            pos += idx.size
            inputs = np.array([rng.choice(controls[context[i]]) for i in idx])
            labels = [ids[perturbation[i]] for i in idx]
            opt.zero_grad(set_to_none=True)
            with amp_autocast(dev, amp):
                pred = reg(cells.batch(inputs).to(dev), [g for g, _ in labels], [l for _, l in labels])
            loss = nn.functional.mse_loss(pred.float(), y_all[idx].to(dev))
            loss.backward()
            nn.utils.clip_grad_norm_(reg.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    reg.eval()
    return FinetunedPerturbation(module=reg, vocab=vocab, losses=losses, seconds=time.perf_counter() - t0,
                                 steps=int(steps))


def predict_changes(fitted: FinetunedPerturbation, control_cells: TokenizedCells, perturbation: str, *,
                    batch_size: int, device=None, amp: bool = True) -> np.ndarray:
    """Mean predicted change over ``control_cells`` (cells of one context) for ``perturbation``."""
    dev = resolve_device(device)
    reg = fitted.module.to(dev).eval()
    genes, learned = target_ids(perturbation, fitted.vocab, reg.labels)
    out = np.zeros((len(control_cells), reg.head[-1].out_features), dtype=np.float64)
    batched_inference(control_cells, out,
                       lambda b: reg(b, [genes] * len(b), [learned] * len(b)).float().cpu().numpy(),
                       dev=dev, amp=amp, batch_size=batch_size, what="perturbation prediction",
                       config=reg.encoder.config)
    return out.mean(axis=0)
