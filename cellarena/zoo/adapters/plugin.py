"""The base class of the adapters' plug-ins.

Each adapter module defines its ``Plugin`` on :class:`AdapterPlugin`; a model folder's ``model.py``
only names its folder, as the in-suite transformers do (:mod:`cellarena.zoo.in_suite`)::

    from pathlib import Path
    from cellarena.zoo.adapters import scgpt

    class Model(scgpt.Plugin):
        card_dir = Path(__file__).parent

A family with variants also sets the variant there (Geneformer: ``version = "V1"``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

from cellarena.cards.model import ModelCard, load_model_card
from cellarena.plugin import BaseModel
from cellarena.zoo.adapters.releases import is_random_release, locate


class AdapterPlugin(BaseModel):
    """A plug-in running a published release: its card (read once), the release folder in the
    run's checkpoints directory, and the facts every adapter reports in ``runtime_json``."""

    card_dir: ClassVar[Path | None] = None

    @functools.cached_property
    def card(self) -> ModelCard:
        """The model card in ``card_dir``, read on first use."""
        return load_model_card(self.card_dir)

    def release_folder(self) -> Path:
        """The card's release in ``context.checkpoints_dir`` (None: the user's default place) with
        every published file present; :class:`NotApplicable` naming what is missing otherwise."""
        return locate(self.card, self.context.checkpoints_dir)

    def record(self, release, found, adata, **facts) -> None:
        """Report the run's release (folder, whether its weights are random, the heads it holds that
        the embedding does not use), how many of ``adata``'s genes it matched (``found``), and ``facts``."""
        self.context.runtime.update(checkpoint=str(release.folder), random_weights=is_random_release(release.folder),
                                    genes_matched=f"{len(found)}/{adata.n_vars}", unused_heads=release.unused,
                                    **facts)
