"""UCE cell embeddings from the released 4-layer model (cellarena/adapters/uce.py)."""

from pathlib import Path

from cellarena.adapters import uce
from cellarena.checkpoints import is_random_release, locate, match_genes
from cellarena.errors import NotApplicable
from cellarena.models import load_model_card
from cellarena.plugin import BaseModel

CARD_DIR = Path(__file__).parent


class Model(BaseModel):
    def embed(self, adata, *, solution=None):
        p = self.params
        card = load_model_card(CARD_DIR)
        species = uce.SPECIES[_organism(adata, card)]
        release = uce.Release(locate(card), device=self.context.device, weights=_weights_file(card))
        table = release.gene_table(species)
        found, rows = match_genes([str(g).upper() for g in adata.var_names], table.index,
                                  min_fraction=float(p["min_gene_fraction"]),
                                  what=f"UCE {species} protein embeddings with a chromosome position")
        counts = adata.layers["counts"].tocsr()[:, found]
        keep = uce.expressed_in(counts, int(p["min_cells_per_gene"]))
        if not keep.any():
            raise NotApplicable(f"none of the {found.size} matched genes has a count in at least "
                                f"{p['min_cells_per_gene']} of the {adata.n_obs} cells")
        counts, rows = counts[:, keep], rows[keep]
        emb = uce.embed(counts, table.token_ids[rows], table.chroms[rows], table.starts[rows], release,
                        seed=self.context.seed, sample_size=int(p["sample_size"]), batch_size=int(p["batch_size"]))
        self.context.runtime.update(
            attention=release.model.attention_kernel, checkpoint=str(release.folder),
            random_weights=is_random_release(release.folder), weights=release.weights,
            species=species, genes_matched=f"{found.size}/{adata.n_vars}", genes_used=int(keep.sum()),
            cells_without_counts=int((counts.sum(axis=1) == 0).sum()), unused_heads=release.unused)
        return emb

    @staticmethod
    def write_validation_release(root, genes, seed):
        """For `cellarena validate` without the real weights: a random release in the official layout."""
        card = load_model_card(CARD_DIR)
        uce.write_random_release(Path(root) / card.checkpoint.folder, genes, seed=seed, weights=_weights_file(card))


def _weights_file(card) -> str:
    """The state dict among the card's files (a 33-layer card lists 33l_8ep_1024t_1280.torch instead)."""
    return next(f.name for f in card.checkpoint.files if f.name.endswith(".torch") and f.name != uce.TOKENS_FILE)


def _organism(adata, card) -> str:
    """The dataset's organism where the view carries it; otherwise the card's only one."""
    organism = adata.uns.get("cellarena", {}).get("organism")
    if organism is None:
        if len(card.organisms) != 1:
            raise RuntimeError("the data passed to the plug-in does not say its organism (uns['cellarena']"
                               "['organism']), and the card lists several: the species' tokens cannot be chosen")
        organism = card.organisms[0]
    if organism not in uce.SPECIES:
        raise NotApplicable(f"UCE's release has no protein embeddings for {organism}")
    return organism
