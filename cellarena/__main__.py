import os
import sys

# Busy-waiting OpenMP threads make multi-threaded torch/BLAS jobs crawl on a shared machine;
# set before any of those libraries load. A user's explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _threads_from_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


# BLAS and OpenMP size their thread pools when numpy/scipy/torch load, before the runner's own
# limit applies: a job given --threads N gets pools of N from the start.
_threads = _threads_from_argv(sys.argv[1:])
if _threads and _threads.isdigit():
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

from cellarena.cli import main  # noqa: E402

sys.exit(main())
