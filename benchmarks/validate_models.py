"""Time `cellarena validate` on every model folder (what `make test` runs for each), as a table.

    .venv/bin/python benchmarks/validate_models.py [--models models]

Columns: the model, its declared tasks, the checks that passed / were skipped / failed, and the
wall seconds of the whole validation (card, import, every task run twice on the 200-cell data,
and for in-suite transformers a 2-step validation checkpoint).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)
from rich.console import Console
from rich.table import Table

from cellarena.cards.model import discover, load_model_card
from cellarena.review.validate import tiny_data, validate_model

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=REPO / "models")
    args = ap.parse_args()
    console = Console(width=160)
    console.print(describe())
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        data = tiny_data(work)
        console.print(f"tiny data: {time.perf_counter() - t0:.1f} s (cached after the first call)")
        table = Table(title="cellarena validate, per model folder")
        for col in ("model", "tasks", "pass", "skip", "fail", "seconds"):
            table.add_column(col, justify="right" if col in ("pass", "skip", "fail", "seconds") else "left")
        total, failed = 0.0, 0
        for model_id, folder in discover(args.models).items():
            t0 = time.perf_counter()
            report = validate_model(folder, data=data, work_dir=work)
            seconds = time.perf_counter() - t0
            total += seconds
            failed += not report.ok
            count = {s: sum(c.status == s for c in report.checks) for s in ("pass", "skip", "fail")}
            table.add_row(model_id, ", ".join(load_model_card(folder).tasks), str(count["pass"]),
                          str(count["skip"]), str(count["fail"]), f"{seconds:.1f}")
        table.add_row("all", "", "", "", str(failed), f"{total:.1f}")
        console.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
