"""scFoundation cell embeddings from the released checkpoint (cellarena/zoo/adapters/scfoundation.py)."""

from pathlib import Path

from cellarena.zoo.adapters import scfoundation


class Model(scfoundation.Plugin):
    card_dir = Path(__file__).parent
