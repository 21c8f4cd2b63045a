"""scTab's linear reference: the plug-in of :mod:`cellarena.tabular` with ``architecture: linear``."""

from cellarena.tabular import TabularModel as Model  # noqa: F401
