"""scGPT cell embeddings from the released whole-human checkpoint (cellarena/adapters/scgpt.py)."""

from pathlib import Path

from cellarena.adapters import scgpt
from cellarena.checkpoints import is_random_release, locate, match_genes
from cellarena.models import load_model_card
from cellarena.plugin import BaseModel

CARD_DIR = Path(__file__).parent


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        p = self.params
        release = scgpt.Release(locate(load_model_card(CARD_DIR)), device=self.context.device)
        found, ids = match_genes(adata.var_names, release.genes, min_fraction=float(p["min_gene_fraction"]),
                                 what="scGPT vocabulary")
        emb = scgpt.embed(adata.layers["counts"].tocsr()[:, found], ids, release, seed=self.context.seed,
                          max_length=int(p["max_length"]), batch_size=int(p["batch_size"]))
        self.context.runtime.update(attention=release.model.attention_kernel, checkpoint=str(release.folder),
                                    random_weights=is_random_release(release.folder),
                                    genes_matched=f"{found.size}/{adata.n_vars}", unused_heads=release.unused)
        return emb

    @staticmethod
    def write_validation_release(root, genes, seed):
        """For `cellarena validate` without the real weights: a random release in the official layout."""
        scgpt.write_random_release(Path(root) / load_model_card(CARD_DIR).checkpoint.folder, genes, seed=seed)
