"""What the uncertainty costs: the within-split bootstrap inside a run, and the analysis and pages
built on a results table.

    python benchmarks/uncertainty_cost.py --scores results/scores.parquet [--replicates 200]

Prints two tables: seconds to score every overall annotation metric on the resamples of a test set
of a given size (what each annotation run adds; perturbation runs resample per-query values, a
vectorised mean), and seconds of each step that reads the table (intervals, verdicts, rank
intervals, claims, the page model, the static export).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from cellarena import tasks  # noqa: E402
from cellarena.analysis import claims, intervals  # noqa: E402
from cellarena.cards.claim import load_claims  # noqa: E402
from cellarena.leaderboard import data, export  # noqa: E402
from cellarena.leaderboard import page as lb  # noqa: E402
from cellarena.metrics import bootstrap  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _timed(fn, *args, **kw) -> float:
    start = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True)
    parser.add_argument("--replicates", type=int, default=bootstrap.DEFAULT_REPLICATES)
    args = parser.parse_args()
    console = Console()
    console.print(describe())

    specs = {m: s for m, s in tasks.get("annotation").metric_specs({}).items() if not s.per_subgroup}
    rng = np.random.default_rng(0)
    runs = Table(title=f"annotation run: every overall metric on {args.replicates} resamples")
    for col in ("test cells", "metrics", "seconds"):
        runs.add_column(col, justify="right")
    for n in (210, 750, 1250, 4200):
        truth = rng.integers(0, 10, n)
        pred = np.where(rng.random(n) < 0.8, truth, rng.integers(0, 10, n))
        index = bootstrap.resamples(n, "benchmark", args.replicates)
        seconds = sum(_timed(bootstrap.replicate, s.fn, (truth, pred), index) for s in specs.values())
        runs.add_row(str(n), str(len(specs)), f"{seconds:.2f}")
    console.print(runs)

    df = data.load_scores(args.scores)
    cards = load_claims(REPO / "claims")
    steps = Table(title=f"reading {args.scores} ({len(df):,} rows)")
    steps.add_column("step")
    steps.add_column("seconds", justify="right")
    present = [t for t in tasks.TASK_IDS if t in set(df["task"])]
    steps.add_row("intervals: summarize (every task)", f"{_timed(intervals.summarize, df):.2f}")
    steps.add_row("verdicts: compare (every task)", f"{sum(_timed(intervals.compare, df, t) for t in present):.2f}")
    steps.add_row("rank intervals (every task)",
                  f"{sum(_timed(intervals.rank_intervals, df, t) for t in present):.2f}")
    steps.add_row(f"claims ({len(cards)})", f"{_timed(claims.evaluate, df, cards):.2f}")
    steps.add_row("page model (build_page)", f"{_timed(lb.build_page, df, claims=cards):.2f}")
    with tempfile.TemporaryDirectory() as out:
        steps.add_row("static export (HTML with SVG charts, CSVs)",
                      f"{_timed(export.export_static, df, out, claims=cards):.2f}")
        size = (Path(out) / "index.html").stat().st_size
    steps.add_row("index.html size (MB)", f"{size / 1e6:.2f}")
    console.print(steps)


if __name__ == "__main__":
    main()
