"""scTab's MLP reference: the plug-in of :mod:`cellarena.zoo.tabular` with ``architecture: mlp``."""

from cellarena.zoo.tabular import TabularModel as Model  # noqa: F401
