"""UCE cell embeddings from the released 4-layer model (cellarena/zoo/adapters/uce.py)."""

from pathlib import Path

from cellarena.zoo.adapters import uce


class Model(uce.Plugin):
    card_dir = Path(__file__).parent
