"""The code models are built from: the in-suite transformers (``transformer/``, ``in_suite.py``), the
adapters of published checkpoints (``adapters/``) and scTab's tabular classifiers (``tabular.py``).
Model folders (``models/<id>/model.py``) subclass what lives here."""
