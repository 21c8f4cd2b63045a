"""scTab's MLP reference: the plug-in of :mod:`cellarena.tabular` with ``architecture: mlp``."""

from cellarena.tabular import TabularModel as Model  # noqa: F401
