"""In-suite tiny transformer: everything is in cellarena.zoo.transformer; the card holds the recipe."""

from pathlib import Path

from cellarena.zoo.in_suite import TransformerPlugin


class Model(TransformerPlugin):
    card_dir = Path(__file__).parent
