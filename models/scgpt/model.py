"""scGPT cell embeddings from the released whole-human checkpoint (cellarena/zoo/adapters/scgpt.py)."""

from pathlib import Path

from cellarena.zoo.adapters import scgpt


class Model(scgpt.Plugin):
    card_dir = Path(__file__).parent
