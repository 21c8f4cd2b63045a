"""cellarena: reproducible benchmarks of single-cell foundation models against tuned baselines."""

__version__ = "0.1.0"
SUITE_VERSION = __version__
