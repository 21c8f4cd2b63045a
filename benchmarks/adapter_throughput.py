"""Throughput and memory of the published-model adapters, through the benchmark's own runner.

    .venv/bin/python benchmarks/adapter_throughput.py [--models scgpt geneformer ...] [--cells 512]
        [--weights auto|real|random] [--checkpoints-dir DIR] [--device auto|cpu|cuda] [--threads N]
        [--batch-size N]

For each adapter, ``embed_cells`` embeds ``--cells`` real cells of the prepared Kang 2018 data (all
its genes, cells drawn with seed 0), in a subprocess of its own so that its peak memory is its own.
Weights: ``real`` uses the published checkpoint in the checkpoints directory (``--checkpoints-dir``,
default ``$CELLARENA_CHECKPOINTS`` or the data cache); ``random`` writes a random release in the
official file layout at the published architecture's sizes (vocabulary = the data's genes,
cellarena/zoo/adapters/random_weights.py), so the forward pass costs what the real one costs;
``auto`` (default) takes the real checkpoint where it is present.

Columns: the model, the weights used, status, cells/s of the model's own work (``wall_s`` of the run:
loading the release, tokenizing and the forward passes), peak RSS of the process (CPU), peak CUDA
memory allocated (GPU), the attention kernel that ran, and the genes matched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ADAPTERS = ("scgpt", "geneformer", "geneformer_v2", "uce", "scfoundation", "cellplm")


def run_one(args) -> dict:
    """In the child: prepare the cells, point the checkpoints dir at the weights, embed, report."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from cellarena.cards.dataset import card_path, load_card  # noqa: PLC0415
    from cellarena.cards.model import load_model_card, load_plugin  # noqa: PLC0415
    from cellarena.data.fetch import default_cache_dir, fetch_card  # noqa: PLC0415
    from cellarena.data.prepare import prepare  # noqa: PLC0415
    from cellarena.data.splits import SplitSpec, make_split, write_split  # noqa: PLC0415
    from cellarena.errors import NotApplicable  # noqa: PLC0415
    from cellarena.run.embedding import embed_cells  # noqa: PLC0415
    from cellarena.run.setup import Job  # noqa: PLC0415
    from cellarena.zoo.adapters.random_weights import write_release  # noqa: PLC0415
    from cellarena.zoo.adapters.releases import locate  # noqa: PLC0415

    work = Path(args.work)
    kang_card = load_card(card_path(REPO / "datasets", "kang2018_ifnb"))
    kang = prepare(kang_card, fetch_card(kang_card, default_cache_dir()),
                   card_path=card_path(REPO / "datasets", "kang2018_ifnb"))
    keep = np.sort(np.random.default_rng(0).choice(kang.n_obs, size=min(args.cells, kang.n_obs), replace=False))
    cells = kang[keep].copy()
    prepared = work / f"kang_{cells.n_obs}.h5ad"
    cells.write_h5ad(prepared)
    split = write_split(make_split(cells.obs, dataset_id=kang_card.id, dataset_version=kang_card.version, name="all",
                                   spec=SplitSpec(scheme="all"), seed=0), work / "all_split.json")
    model_dir = REPO / "models" / args.one
    card = load_model_card(model_dir)
    weights, checkpoints = args.weights, args.checkpoints_dir
    if weights in ("auto", "real"):
        try:
            locate(card, checkpoints)
            weights = "real"
        except NotApplicable:
            if args.weights == "real":
                raise
            weights = "random"
    if weights == "random":  # at the published sizes, vocabulary = the data's genes
        checkpoints = work / "random_release"
        if write_release(load_plugin(model_dir), card, checkpoints, cells.var_names, published_sizes=True) is None:
            raise SystemExit(f"no random-release writer serves {args.one} (cellarena/zoo/adapters/random_weights.py)")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device cpu hides the GPUs from this process
    params = {"batch_size": args.batch_size} if args.batch_size else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = embed_cells(Job.of(prepared, split, model_dir, seed=0, params=params, threads=args.threads,
                             checkpoints_dir=checkpoints))
    runtime = json.loads(run.columns.get("runtime_json") or "{}")
    wall = run.columns.get("wall_s")
    return {"model": args.one, "weights": weights, "status": run.status, "reason": run.columns["status_reason"],
            "cells": cells.n_obs, "wall_s": wall, "cells_per_s": cells.n_obs / wall if wall else None,
            "peak_rss_mb": run.columns.get("peak_rss_mb"), "device": device,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "attention": runtime.get("attention"), "genes_matched": runtime.get("genes_matched")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(ADAPTERS))
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--weights", choices=("auto", "real", "random"), default="auto")
    ap.add_argument("--checkpoints-dir", default=None, help="published checkpoints (default: "
                                                             "$CELLARENA_CHECKPOINTS or the data cache)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=None, help="override the card's batch_size")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe  # noqa: PLC0415  (benchmarks/machine.py)
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console(width=180)
    console.print(describe())
    table = Table(title=f"adapters: embed {args.cells} Kang 2018 cells (runner.embed_cells, {args.threads} threads)")
    for col in ("model", "weights", "device", "status", "cells/s", "wall s", "peak RSS MB", "CUDA peak MB",
                "attention", "genes matched"):
        table.add_column(col)
    failed = 0
    for model_id in args.models:
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, __file__, "--one", model_id, "--work", work, "--cells", str(args.cells),
                   "--weights", args.weights, "--device", args.device, "--threads", str(args.threads)]
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            if args.checkpoints_dir:
                cmd += ["--checkpoints-dir", args.checkpoints_dir]
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            failed += 1
            table.add_row(model_id, "", "", "error", "", "", "", "", proc.stderr.strip().splitlines()[-1:][0]
                          if proc.stderr.strip() else f"exit {proc.returncode}", "")
            continue
        r = json.loads(line[len("RESULT "):])
        failed += r["status"] != "ok"

        def fmt(x, spec):
            return "" if x is None else format(x, spec)

        table.add_row(r["model"], r["weights"], r["device"], r["status"] if r["status"] == "ok" else
                      f"{r['status']}: {r['reason'][:60]}", fmt(r["cells_per_s"], ".1f"), fmt(r["wall_s"], ".1f"),
                      fmt(r["peak_rss_mb"], ".0f"), fmt(r["cuda_peak_mb"], ".0f"), r["attention"] or "",
                      r["genes_matched"] or "")
    console.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
