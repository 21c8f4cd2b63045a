"""Speed and memory of the cell-level leakage index on a large synthetic corpus.

    .venv/bin/python benchmarks/leakage_index.py [--cells 1000000] [--genes 2000]
        [--genes-per-cell 300] [--chunk 100000] [--k 32] [--queries 10000]

The corpus is generated chunk by chunk (random non-zero genes per cell, Poisson counts) and only
its index is kept: one exact fingerprint (8 bytes) and one MinHash sketch (4k bytes) per cell, never
the matrices. Timed: fingerprinting and sketching (generation excluded), then a near-duplicate
query of ``--queries`` evaluation cells, half of them renormalized copies of corpus cells. Prints
cells/s, the index size and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import scipy.sparse as sp
from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

from cellarena.data.leakage import fingerprint_matrix, gene_keys, near_duplicates, sketch_matrix


def _chunk(rng, n, n_genes, per_cell) -> sp.csr_matrix:
    cols = np.concatenate([rng.choice(n_genes, per_cell, replace=False) for _ in range(n)]) if n < 2000 else \
        (rng.random((n, per_cell)) * n_genes).astype(np.int32).ravel()
    indptr = np.arange(0, n * per_cell + 1, per_cell)
    m = sp.csr_matrix((rng.poisson(2.0, n * per_cell).astype(np.float32) + 1, cols, indptr), shape=(n, n_genes))
    m.sum_duplicates()
    return m


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--genes-per-cell", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--queries", type=int, default=10_000)
    args = ap.parse_args()
    print(describe())
    rng = np.random.default_rng(0)
    keys = gene_keys([f"G{j}" for j in range(args.genes)])
    fps, sks, kept = [], [], []
    t_fp = t_sk = 0.0
    for start in range(0, args.cells, args.chunk):
        m = _chunk(rng, min(args.chunk, args.cells - start), args.genes, args.genes_per_cell)
        t0 = time.perf_counter()
        fps.append(fingerprint_matrix(m, keys))
        t1 = time.perf_counter()
        sks.append(sketch_matrix(m, keys, k=args.k))
        t_fp, t_sk = t_fp + t1 - t0, t_sk + time.perf_counter() - t1
        if start == 0:
            kept = m[: args.queries // 2].copy()  # cells to query again, renormalized
    fp, sk = np.concatenate(fps), np.concatenate(sks)
    copies = sp.csr_matrix(sp.diags(1e4 / np.asarray(kept.sum(axis=1)).ravel()) @ kept)
    copies.data = np.log1p(copies.data)
    fresh = _chunk(rng, args.queries - kept.shape[0], args.genes, args.genes_per_cell)
    queries = sp.vstack([copies, fresh]).tocsr()
    t0 = time.perf_counter()
    q_sk = sketch_matrix(queries, keys, k=args.k)
    sim = near_duplicates(sk, q_sk)
    t_q = time.perf_counter() - t0
    n_copies = kept.shape[0]
    recall = float((sim[:n_copies] > 0).mean())
    false_pos = int((sim[n_copies:] > 0).sum())
    index_mib = (fp.nbytes + sk.nbytes) / 2**20
    print(f"corpus: {args.cells:,} cells x {args.genes} genes, {args.genes_per_cell} non-zero genes per cell, "
          f"chunks of {args.chunk:,}; sketch k={args.k}")
    print(f"{'step':<28}{'seconds':>9}{'cells/s':>14}")
    print(f"{'exact fingerprints':<28}{t_fp:>9.1f}{args.cells / t_fp:>14,.0f}")
    print(f"{'MinHash sketches':<28}{t_sk:>9.1f}{args.cells / t_sk:>14,.0f}")
    print(f"{'both':<28}{t_fp + t_sk:>9.1f}{args.cells / (t_fp + t_sk):>14,.0f}")
    print(f"{'near-duplicate query':<28}{t_q:>9.1f}{args.queries / t_q:>14,.0f}  "
          f"({args.queries:,} cells against the corpus)")
    print(f"renormalized copies found: {recall:.4f}; unrelated cells flagged: {false_pos} of "
          f"{args.queries - n_copies:,}; distinct fingerprints: {np.unique(fp).size:,}")
    print(f"index: {index_mib:.1f} MiB ({(fp.nbytes + sk.nbytes) / args.cells:.0f} bytes per cell); "
          f"peak RSS {_peak_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
