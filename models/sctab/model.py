"""scTab (Fischer et al. 2024): a TabNet cell-type classifier with donor-difference augmentation.

The network, its training loop and this plug-in are in :mod:`cellarena.zoo.tabular`; the linear and MLP
references (``models/sctab_linear``, ``models/sctab_mlp``) use the same plug-in with another
``params.architecture``.
"""

from cellarena.zoo.tabular import TabularModel as Model  # noqa: F401
