"""cellarena: reproducible benchmarks of single-cell foundation models against tuned baselines."""

from pathlib import Path

__version__ = "0.1.0"
SUITE_VERSION = __version__
REPO = Path(__file__).resolve().parents[1]  # the checkout: datasets/, models/, results/
