"""In-suite tiny transformer: everything is in cellarena.transformer; the card holds the recipe."""

from pathlib import Path

from cellarena.transformer.plugin import TransformerPlugin


class Model(TransformerPlugin):
    card_dir = Path(__file__).parent
