"""CellPLM cell embeddings from the released pretrained checkpoint (cellarena/adapters/cellplm.py)."""

from pathlib import Path

from cellarena.adapters import cellplm
from cellarena.checkpoints import is_random_release, locate, match_genes
from cellarena.models import load_model_card
from cellarena.plugin import BaseModel

CARD_DIR = Path(__file__).parent


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        p = self.params
        release = cellplm.Release(locate(load_model_card(CARD_DIR)), device=self.context.device)
        vocabulary, how = release.vocabulary(adata.var_names)
        found, ids = match_genes(adata.var_names, vocabulary, min_fraction=float(p["min_gene_fraction"]),
                                 what=f"CellPLM gene list (matched as {how})")
        batch = adata.obs["batch"].astype(str).to_numpy() if p["group_by_batch"] and "batch" in adata.obs else None
        emb, passes = cellplm.embed(adata.layers["counts"].tocsr()[:, found], ids, release, seed=self.context.seed,
                                    batch=batch, batch_size=int(p["batch_size"]))
        self.context.runtime.update(attention=cellplm.ATTENTION, checkpoint=str(release.folder),
                                    random_weights=is_random_release(release.folder), latent=release.latent_kind,
                                    genes_matched=f"{found.size}/{adata.n_vars}", gene_ids=how,
                                    forward_passes=len(passes), largest_pass=max(passes, default=0),
                                    grouped_by_batch=batch is not None, unpickler=release.unpickler,
                                    unused_heads=release.unused)
        return emb

    @staticmethod
    def write_validation_release(root, genes, seed):
        """For `cellarena validate` without the real weights: a random release in the official layout."""
        cellplm.write_random_release(Path(root) / load_model_card(CARD_DIR).checkpoint.folder, genes, seed=seed)
