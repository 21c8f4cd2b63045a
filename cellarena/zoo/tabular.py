"""scTab-style cell-type classifiers on a gene panel: TabNet, and the linear and MLP references.

After Fischer F et al., "scTab: Scaling cross-tissue single-cell annotation models", Nat Commun
15, 6611 (2024). What is taken from the paper and its released training script: inputs are
log1p of counts scaled to 10,000 per cell; a TabNet encoder (Arik & Pfister 2021) with sequential
attention masks (entmax-1.5 by default), ghost batch normalization and shared/step-specific GLU
blocks; class-weighted cross-entropy plus a small mask-sparsity penalty (lambda_sparse 1e-5);
AdamW with weight decay 0.05, learning rate decayed by 0.9 per epoch, gradient norm clipped at 1;
and the augmentation: the difference between the mean expression of one cell type in two donors
(here: the training cells' batches or donors) is added to, or subtracted from, a training cell,
and the result is clipped to [0, 9]. The network and the training loop are written here.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from cellarena.data.features import group_means, log_normalize, top_variable_genes
from cellarena.plugin import BaseModel

ARCHITECTURES = ("tabnet", "mlp", "linear")


# --------------------------------------------------------------------------------------------------
# sparse attention: sparsemax and entmax-1.5 (exact, sort-based)
# --------------------------------------------------------------------------------------------------

def _sparsemax_forward(z: torch.Tensor) -> torch.Tensor:
    z = z - z.max(dim=-1, keepdim=True).values
    srt = torch.sort(z, dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cum = srt.cumsum(dim=-1)
    size = ((1 + k * srt) > cum).sum(dim=-1, keepdim=True)
    tau = (cum.gather(-1, size - 1) - 1) / size.to(z.dtype)
    return torch.clamp(z - tau, min=0)


def _entmax15_forward(z: torch.Tensor) -> torch.Tensor:
    z = (z - z.max(dim=-1, keepdim=True).values) / 2
    srt = torch.sort(z, dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    mean = srt.cumsum(dim=-1) / k
    mean_sq = (srt**2).cumsum(dim=-1) / k
    delta = (1 - k * (mean_sq - mean**2)) / k
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    size = (tau <= srt).sum(dim=-1, keepdim=True)
    return torch.clamp(z - tau.gather(-1, size - 1), min=0) ** 2


def _simplex_map(forward, slope):
    """A row-wise map onto the simplex with its closed-form backward. On the support, both sparsemax
    and 1.5-entmax have the Jacobian diag(w) - w w^T / sum(w), with w = ``slope(output)``."""

    class Map(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            out = forward(z)
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, grad):
            (out,) = ctx.saved_tensors
            w = slope(out)
            g = grad * w
            return g - (g.sum(dim=-1, keepdim=True) / w.sum(dim=-1, keepdim=True)) * w

    return Map.apply


_sparsemax = _simplex_map(_sparsemax_forward, lambda out: (out > 0).to(out.dtype))
_entmax15 = _simplex_map(_entmax15_forward, torch.sqrt)  # d out / d z = sqrt(out) (the 1/2 of z/2 included)


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``z`` onto the probability simplex (Martins & Astudillo
    2016); exact sort-based forward, closed-form backward."""
    return _sparsemax(z)


def entmax15(z: torch.Tensor) -> torch.Tensor:
    """1.5-entmax of each row of ``z`` (Peters et al. 2019): sparse like sparsemax, smoother near
    ties; exact sort-based forward, closed-form backward."""
    return _entmax15(z)


# --------------------------------------------------------------------------------------------------
# TabNet
# --------------------------------------------------------------------------------------------------

class GhostBatchNorm(nn.Module):
    """Batch normalization over chunks of ``virtual_batch_size`` rows (statistics of small batches)."""

    def __init__(self, dim: int, virtual_batch_size: int, momentum: float):
        super().__init__()
        self.vbs = virtual_batch_size
        self.bn = nn.BatchNorm1d(dim, momentum=momentum)

    def forward(self, x):
        if not self.training or x.shape[0] <= self.vbs:
            return self.bn(x)
        return torch.cat([self.bn(c) for c in x.split(self.vbs, dim=0)], dim=0)


class GLULayer(nn.Module):
    def __init__(self, fc: nn.Linear, out_dim: int, vbs: int, momentum: float):
        super().__init__()
        self.fc, self.out_dim = fc, out_dim
        self.bn = GhostBatchNorm(2 * out_dim, vbs, momentum)

    def forward(self, x):
        h = self.bn(self.fc(x))
        return h[:, : self.out_dim] * torch.sigmoid(h[:, self.out_dim:])


class FeatureTransformer(nn.Module):
    """Shared GLU layers (the same weights in every step) then step-specific ones, with scaled residuals."""

    def __init__(self, shared: nn.ModuleList, in_dim: int, out_dim: int, n_independent: int, vbs: int,
                 momentum: float):
        super().__init__()
        layers = [GLULayer(fc, out_dim, vbs, momentum) for fc in shared]
        first_in = out_dim if shared else in_dim
        for i in range(n_independent):
            layers.append(GLULayer(nn.Linear(first_in if i == 0 and not shared else out_dim, 2 * out_dim, bias=False),
                                   out_dim, vbs, momentum))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        x = self.layers[0](x)
        scale = math.sqrt(0.5)
        for layer in self.layers[1:]:
            x = (x + layer(x)) * scale
        return x


class TabNet(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, n_d: int = 8, n_a: int = 8, n_steps: int = 3,
                 gamma: float = 1.3, n_independent: int = 2, n_shared: int = 2, virtual_batch_size: int = 128,
                 momentum: float = 0.02, mask_type: str = "entmax"):
        super().__init__()
        if mask_type not in ("entmax", "sparsemax"):
            raise ValueError(f"mask_type must be 'entmax' or 'sparsemax', not {mask_type!r}")
        self.n_d, self.n_steps, self.gamma = n_d, n_steps, gamma
        self.mask = entmax15 if mask_type == "entmax" else sparsemax
        hidden = n_d + n_a
        self.input_bn = nn.BatchNorm1d(input_dim, momentum=0.01)
        shared = nn.ModuleList(
            [nn.Linear(input_dim if i == 0 else hidden, 2 * hidden, bias=False) for i in range(n_shared)])

        def feature_transformer():
            return FeatureTransformer(shared, input_dim, hidden, n_independent, virtual_batch_size, momentum)

        self.initial = feature_transformer()
        self.steps = nn.ModuleList([feature_transformer() for _ in range(n_steps)])
        self.attention = nn.ModuleList([
            nn.Sequential(nn.Linear(n_a, input_dim, bias=False), GhostBatchNorm(input_dim, virtual_batch_size, momentum))
            for _ in range(n_steps)])
        self.head = nn.Linear(n_d, output_dim)

    def forward(self, x):
        """Logits, and the mean entropy of the attention masks (the sparsity penalty)."""
        x = self.input_bn(x)
        prior = torch.ones_like(x)
        a = self.initial(x)[:, self.n_d:]
        out = 0.0
        entropy = x.new_zeros(())
        for step, att in zip(self.steps, self.attention):
            m = self.mask(att(a) * prior)
            entropy = entropy + (-m * torch.log(m + 1e-15)).sum(dim=1).mean()
            prior = prior * (self.gamma - m)
            h = step(m * x)
            out = out + F.relu(h[:, : self.n_d])
            a = h[:, self.n_d:]
        return self.head(out), entropy / self.n_steps


class MLP(nn.Module):
    """The MLP reference: hidden layers with batch norm, ReLU and dropout."""

    def __init__(self, input_dim: int, output_dim: int, hidden: int = 128, n_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        layers, d = [], input_dim
        for _ in range(n_layers):
            layers += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
            d = hidden
        layers.append(nn.Linear(d, output_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x), x.new_zeros(())


class Linear(nn.Module):
    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim)

    def forward(self, x):
        return self.fc(x), x.new_zeros(())


# --------------------------------------------------------------------------------------------------
# data: gene panel, log-normalization, augmentation vectors
# --------------------------------------------------------------------------------------------------

def augmentation_vectors(x: sp.csr_matrix, cell_types: np.ndarray, donors: np.ndarray | None,
                         min_cells: int = 10, max_vectors: int = 10_000, seed: int = 0) -> np.ndarray:
    """Per cell type, the differences of its mean log-normalized profile between every pair of donors
    (each with >= ``min_cells`` cells of that type). Empty (0, n_genes) without donors."""
    n_genes = x.shape[1]
    if donors is None or np.unique(donors).size < 2:
        return np.zeros((0, n_genes), dtype=np.float32)
    keys = np.char.add(np.char.add(cell_types.astype(str), "\x1f"), donors.astype(str))
    levels, codes, means = group_means(x, keys)
    sizes = np.bincount(codes, minlength=levels.size)
    by_type: dict[str, list[int]] = {}
    for i, key in enumerate(levels):
        if sizes[i] >= min_cells:
            by_type.setdefault(key.split("\x1f")[0], []).append(i)
    diffs = [means[i] - means[j] for rows in by_type.values()
             for a, i in enumerate(rows) for j in rows[a + 1:]]
    if not diffs:
        return np.zeros((0, n_genes), dtype=np.float32)
    out = np.asarray(diffs, dtype=np.float32)
    if out.shape[0] > max_vectors:
        out = out[np.random.default_rng(seed).choice(out.shape[0], max_vectors, replace=False)]
    return out


def donor_labels(obs) -> tuple[np.ndarray | None, str]:
    """The obs role whose levels play scTab's donors: ``donor``, else ``batch``; (None, '') if neither."""
    for role in ("donor", "batch"):
        if role in obs and obs[role].notna().all() and obs[role].astype(str).nunique() >= 2:
            return obs[role].astype(str).to_numpy(), role
    return None, ""


class TabularClassifier:
    """Train one of :data:`ARCHITECTURES` on log-normalized counts; predict cell types."""

    def __init__(self, params: dict, seed: int, device: str = "cpu"):
        self.p, self.seed = dict(params), int(seed)
        self.device = torch.device("cuda" if str(device).startswith("cuda") else "cpu")
        if self.p["architecture"] not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {self.p['architecture']!r}")

    def _inputs(self, adata) -> sp.csr_matrix:
        return log_normalize(adata.layers["counts"])[:, self.genes_]

    def _network(self, n_in: int, n_out: int) -> nn.Module:
        p = self.p
        if p["architecture"] == "linear":
            return Linear(n_in, n_out)
        if p["architecture"] == "mlp":
            return MLP(n_in, n_out, int(p["mlp_hidden"]), int(p["mlp_layers"]), float(p["dropout"]))
        return TabNet(n_in, n_out, n_d=int(p["n_d"]), n_a=int(p["n_a"]), n_steps=int(p["n_steps"]),
                      gamma=float(p["gamma"]), n_independent=int(p["n_independent"]), n_shared=int(p["n_shared"]),
                      virtual_batch_size=int(p["virtual_batch_size"]), mask_type=str(p["mask_type"]))

    def fit(self, adata, labels) -> dict:
        """Train on ``adata`` (counts in layers) with ``labels``; returns what happened (for runtime)."""
        p = self.p
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        lognorm = log_normalize(adata.layers["counts"])
        n_genes = p.get("n_genes")
        self.genes_ = (np.arange(adata.n_vars) if not n_genes else top_variable_genes(lognorm, int(n_genes)))
        x = lognorm[:, self.genes_]
        self.classes_, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        donors, role = donor_labels(adata.obs)
        aug = np.zeros((0, x.shape[1]), dtype=np.float32)
        if p["augment"] and p["architecture"] != "linear":
            aug = augmentation_vectors(x, self.classes_[y], donors, seed=self.seed)
        counts = np.bincount(y, minlength=self.classes_.size).astype(np.float64)
        weights = torch.tensor(counts.sum() / (self.classes_.size * np.maximum(counts, 1)), dtype=torch.float32,
                               device=self.device)
        self.net_ = self._network(x.shape[1], self.classes_.size).to(self.device)
        opt = torch.optim.AdamW(self.net_.parameters(), lr=float(p["lr"]), weight_decay=float(p["weight_decay"]))
        n, bs = x.shape[0], int(p["batch_size"])
        per_epoch = max(1, n // bs + (n % bs >= 2))
        # small training sets: more passes until min_steps, with the same total learning-rate decay
        epochs = max(int(p["epochs"]), math.ceil(int(p.get("min_steps", 0)) / per_epoch))
        decay = float(p["lr_decay"]) ** (int(p["epochs"]) / epochs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=decay)
        aug_t = torch.tensor(aug, device=self.device) if aug.shape[0] else None
        steps = 0
        self.net_.train()
        for _ in range(epochs):
            for idx in self._batches(rng.permutation(n), bs):
                xb = torch.tensor(x[idx].toarray(), device=self.device)
                if aug_t is not None:
                    pick = torch.from_numpy(rng.integers(0, aug_t.shape[0], idx.size)).to(self.device)
                    sign = torch.from_numpy(rng.choice([-1.0, 1.0], size=(idx.size, 1)).astype(np.float32))
                    xb = torch.clamp(xb + sign.to(self.device) * aug_t[pick], 0.0, 9.0)
                logits, entropy = self.net_(xb)
                yb = torch.from_numpy(y[idx]).to(self.device)
                loss = F.cross_entropy(logits, yb, weight=weights) + float(p["lambda_sparse"]) * entropy
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.net_.parameters(), 1.0)
                opt.step()
                steps += 1
            sched.step()
        self._recalibrate(x, bs)
        if not all(torch.isfinite(q).all() for q in self.net_.parameters()):
            raise RuntimeError("training diverged: non-finite weights (try a lower lr)")
        return {"architecture": p["architecture"], "n_genes": int(x.shape[1]), "steps": steps, "epochs": epochs,
                "augmentation_vectors": int(aug.shape[0]), "augmentation_role": role if aug.shape[0] else "",
                "device": str(self.device)}

    @staticmethod
    def _batches(order: np.ndarray, bs: int):
        """Mini-batches of ``order``; a last batch of one cell joins the previous one (batch norm needs two)."""
        chunks = [order[i:i + bs] for i in range(0, order.size, bs)]
        if len(chunks) > 1 and chunks[-1].size < 2:
            chunks[-2] = np.concatenate([chunks[-2], chunks.pop()])
        return [c for c in chunks if c.size >= 2]

    @torch.no_grad()
    def _recalibrate(self, x: sp.csr_matrix, bs: int) -> None:
        """Batch-norm statistics from one pass over the training cells with the final weights.

        Running averages with a momentum of 0.01-0.02 (TabNet's) need hundreds of steps to settle;
        on a small training set they would still reflect the first weights at the end of training."""
        norms = [m for m in self.net_.modules() if isinstance(m, nn.BatchNorm1d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
        self.net_.train()
        for idx in self._batches(np.arange(x.shape[0]), bs):
            self.net_(torch.tensor(x[idx].toarray(), device=self.device))
        self.net_.eval()

    @torch.no_grad()
    def predict(self, adata) -> np.ndarray:
        self.net_.eval()
        x = self._inputs(adata)
        out = []
        for start in range(0, x.shape[0], 4096):
            xb = torch.tensor(x[start:start + 4096].toarray(), device=self.device)
            out.append(self.net_(xb)[0].argmax(dim=1).cpu().numpy())
        codes = np.concatenate(out) if out else np.zeros(0, dtype=int)
        return self.classes_[codes]


class TabularModel(BaseModel):
    """The plug-in of ``models/sctab``, ``models/sctab_mlp`` and ``models/sctab_linear``: each
    ``model.py`` imports it as ``Model``; ``params.architecture`` picks the network."""

    def fit(self, train, labels):
        torch.set_num_threads(max(1, self.context.threads))
        self._clf = TabularClassifier(self.params, self.context.seed, self.context.device)
        self.context.runtime.update(self._clf.fit(train, labels))

    def predict(self, test, *, solution=None):
        return self._clf.predict(test)
