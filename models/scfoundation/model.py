"""scFoundation cell embeddings from the released checkpoint (cellarena/adapters/scfoundation.py)."""

from pathlib import Path

from cellarena.adapters import scfoundation
from cellarena.checkpoints import is_random_release, locate, match_genes
from cellarena.models import load_model_card
from cellarena.plugin import BaseModel

CARD_DIR = Path(__file__).parent


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        p = self.params
        release = scfoundation.Release(locate(load_model_card(CARD_DIR)), device=self.context.device,
                                       version=str(p["version"]))
        found, ids = match_genes(adata.var_names, release.genes, min_fraction=float(p["min_gene_fraction"]),
                                 what="scFoundation gene list")
        emb = scfoundation.embed(adata.layers["counts"].tocsr()[:, found], ids, release,
                                 tgthighres=str(p["tgthighres"]), batch_size=int(p["batch_size"]))
        self.context.runtime.update(attention=release.model.attention_kernel, checkpoint=str(release.folder),
                                    random_weights=is_random_release(release.folder),
                                    checkpoint_entry=release.entry, unpickler=release.unpickler,
                                    genes_matched=f"{found.size}/{adata.n_vars}", unused_heads=release.unused)
        return emb

    @staticmethod
    def write_validation_release(root, genes, seed):
        """For `cellarena validate` without the real weights: a random release in the official layout."""
        scfoundation.write_random_release(Path(root) / load_model_card(CARD_DIR).checkpoint.folder, genes, seed=seed)
