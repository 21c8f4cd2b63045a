"""scTab's linear reference: the plug-in of :mod:`cellarena.zoo.tabular` with ``architecture: linear``."""

from cellarena.zoo.tabular import TabularModel as Model  # noqa: F401
