"""Time `metrics.integration.score_integration` in fresh processes and print a table.

    .venv/bin/python benchmarks/integration_metrics.py [--data auto|kang|synthetic] [--no-kbet]

Five embeddings (d = 30) of the same cells are scored one after the other in a new Python process,
so that every figure includes what a Snakemake job pays: interpreter start, imports, JAX tracing
and compilation (or loading from the persistent cache), kNN search and the metrics. Scenarios:

- cold JAX cache: an empty ``$CELLARENA_JAX_CACHE``; every XLA program is compiled;
- warm JAX cache: the same folder again, now filled by the cold run;
- each with kBET off (the default of the pipeline) and on.

The first embedding's time is reported apart from the mean of the later ones: only the first
pays for tracing and compilation. Data: the prepared Kang et al. 2018 IFN-beta PBMC set
(cell_type as labels, condition as batch) when present, else synthetic Gaussian blobs of the same
size. The embeddings are built once, before the timed processes, from log-normalised counts:
PCA, PCA after per-batch centring, PCA of z-scored genes, a random projection, and PCA plus noise;
the unintegrated representation is a 50-component PCA, as in the runner.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py)
KANG = REPO / "results" / "prepare_dataset" / "kang2018_ifnb.h5ad"
D = 30


def machine() -> str:
    return describe()


def load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------------
# data (built in the parent, outside the timed processes)
# ------------------------------------------------------------------------------------------------

def _pca(a: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA  # noqa: PLC0415

    return PCA(n_components=k, svd_solver="randomized", random_state=seed).fit_transform(a).astype(np.float32)


def kang_inputs() -> dict[str, np.ndarray]:
    import anndata as ad  # noqa: PLC0415

    from cellarena.data.features import log_normalize, top_variable_genes  # noqa: PLC0415

    adata = ad.read_h5ad(KANG)
    x = log_normalize(adata.layers["counts"])
    a = x[:, top_variable_genes(x, 2000)].toarray()
    labels = adata.obs["cell_type"].astype(str).to_numpy().astype("U")
    batch = adata.obs["condition"].astype(str).to_numpy().astype("U")
    return _embeddings(a, labels, batch)


def synthetic_inputs(n: int = 14_000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_types, g = 8, 200
    sizes = rng.dirichlet(np.full(n_types, 2.0))
    types = rng.choice(n_types, size=n, p=sizes)
    batch = rng.integers(0, 2, size=n)
    a = rng.normal(0, 3, (n_types, g))[types] + rng.normal(0, 1, (2, g))[batch] + rng.normal(size=(n, g))
    return _embeddings(a.astype(np.float32), np.char.add("type", types.astype(str)),
                       np.char.add("batch", batch.astype(str)))


def _embeddings(a: np.ndarray, labels: np.ndarray, batch: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    centred = a.copy()
    for b in np.unique(batch):
        centred[batch == b] -= centred[batch == b].mean(axis=0)
    z = (a - a.mean(axis=0)) / (a.std(axis=0) + 1e-6)
    pca = _pca(a, D)
    return {
        "labels": labels, "batch": batch, "unintegrated": _pca(a, 50),
        "emb_pca": pca,
        "emb_centred": _pca(centred, D),
        "emb_scaled": _pca(z, D),
        "emb_randproj": (a @ rng.normal(size=(a.shape[1], D)) / np.sqrt(a.shape[1])).astype(np.float32),
        "emb_noisy": (pca + rng.normal(size=pca.shape) * 0.5 * pca.std(axis=0)).astype(np.float32),
    }


# ------------------------------------------------------------------------------------------------
# the timed process
# ------------------------------------------------------------------------------------------------

def worker(npz: str, include_kbet: bool) -> None:
    t0 = time.perf_counter()
    sys.path.insert(0, str(REPO))
    from cellarena.metrics import integration  # noqa: PLC0415

    integration.configure_jax_cache()
    import scib_metrics  # noqa: F401, PLC0415

    t_import = time.perf_counter() - t0
    data = np.load(npz, allow_pickle=False)
    names = sorted(k for k in data.files if k.startswith("emb_"))
    times, cpu, values = [], [], {}
    for name in names:
        t, c = time.perf_counter(), time.process_time()
        values[name] = integration.score_integration(data[name], data["labels"], data["batch"],
                                                     X_unintegrated=data["unintegrated"],
                                                     include_kbet=include_kbet)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    print(json.dumps({"import": t_import, "times": times, "cpu": cpu, "names": names, "values": values,
                      "n_cells": int(data["labels"].size)}))


def run_process(npz: Path, cache: Path, include_kbet: bool) -> dict:
    env = {**os.environ, "CELLARENA_JAX_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    load = load_avg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(npz)] + (["--kbet"] if include_kbet else []),
                          cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(proc.returncode)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(wall=wall, process_cpu=cpu, load=load)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["auto", "kang", "synthetic"], default="auto")
    ap.add_argument("--no-kbet", action="store_true", help="skip the kBET-on scenarios")
    ap.add_argument("--worker", metavar="NPZ", help=argparse.SUPPRESS)
    ap.add_argument("--kbet", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.kbet)
        return 0

    use_kang = args.data == "kang" or (args.data == "auto" and KANG.exists())
    t = time.perf_counter()
    inputs = kang_inputs() if use_kang else synthetic_inputs()
    prep = time.perf_counter() - t
    import jax  # noqa: PLC0415
    import scib_metrics  # noqa: PLC0415

    n = inputs["labels"].size
    print(f"machine: {machine()}")
    print(f"jax {jax.__version__}, scib-metrics {scib_metrics.__version__}; "
          f"data: {'Kang 2018 (cell_type / condition)' if use_kang else 'synthetic blobs'}, "
          f"{n} cells, {len(np.unique(inputs['labels']))} labels, {len(np.unique(inputs['batch']))} batches, "
          f"5 embeddings x {D} dims (built in {prep:.0f} s, untimed)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cellarena-jaxbench-") as tmp:
        npz = Path(tmp) / "inputs.npz"
        np.savez(npz, **inputs)
        for kbet in ([False] if args.no_kbet else [False, True]):
            cache = Path(tmp) / f"jax-cache-kbet{int(kbet)}"
            for state in ("cold", "warm"):
                r = run_process(npz, cache, kbet)
                r.update(cache=state, kbet=kbet, entries=sum(1 for p in cache.rglob("*") if p.is_file()))
                rows.append(r)
                print(f"  done: cache {state}, kbet {'on' if kbet else 'off'}: {r['wall']:.1f} s", flush=True)

    print()
    head = (f"{'JAX cache':<10}{'kBET':<6}{'process s':>16}{'import s':>10}{'1st emb s':>15}"
            f"{'later emb s':>15}{'cache files':>12}  load avg at start")
    print(head)
    print("-" * len(head))
    for r in rows:
        t, c = r["times"], r["cpu"]
        print(f"{r['cache']:<10}{'on' if r['kbet'] else 'off':<6}"
              f"{r['wall']:>8.1f} ({r['process_cpu']:>5.1f}){r['import']:>10.1f}"
              f"{t[0]:>7.1f} ({c[0]:>5.1f}){np.mean(t[1:]):>7.1f} ({np.mean(c[1:]):>5.1f})"
              f"{r['entries']:>12}  {r['load']}")
    print("\nWall seconds, CPU seconds in parentheses (all threads; on a shared machine CPU time is the"
          "\nbetter guide to an idle machine's wall time, as the metrics run mostly on one thread)."
          "\nprocess: the whole fresh process (start, imports, 5 x score_integration); import: metrics"
          "\nmodule + scib-metrics (umap, numba, jax); later emb: mean over embeddings 2-5."
          "\nload avg: 1/5/15-minute load of the machine when the process started.")
    last = rows[-1]
    print("\nscores of the last run:")
    ids = list(next(iter(last["values"].values())))
    print(f"{'embedding':<14}" + "".join(f"{m[:10]:>11}" for m in ids))
    for name in last["names"]:
        print(f"{name[4:]:<14}" + "".join(f"{last['values'][name][m]:>11.3f}" for m in ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
