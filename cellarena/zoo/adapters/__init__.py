"""Adapters: published single-cell foundation models, re-implemented to load their released weights
exactly. One module per model family, each with its plug-in class ``Plugin``; ``plugin.py`` holds the
base those share, ``layers.py`` the torch layers they share, ``releases.py`` where the released files
are found and verified, and ``random_weights.py`` releases with random weights in each family's file
layout (validation, tests, benchmarks), which no adapter module imports."""
