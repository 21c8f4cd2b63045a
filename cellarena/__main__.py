import os
import sys

# Busy-waiting OpenMP threads make multi-threaded torch/BLAS jobs crawl on a shared machine;
# set before any of those libraries load. A user's explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cellarena.cli import main  # noqa: E402

sys.exit(main())
