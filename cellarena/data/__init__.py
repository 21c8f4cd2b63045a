"""Data: a dataset card's files fetched and verified, prepared into the canonical AnnData, split with a
seed; the shared preprocessing, silver labels, the simulated screen, perturbation views and the
cell-level leakage check."""
