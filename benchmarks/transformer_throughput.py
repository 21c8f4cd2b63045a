"""Throughput of the in-suite transformers: encoding x attention backend x context length.

    .venv/bin/python benchmarks/transformer_throughput.py [--device auto|cpu|cuda] [--preset tiny|base]
        [--contexts 256 512 1024] [--encodings rank bin projection] [--backends math sdpa sdpa_packed flash_varlen]
        [--tokens-per-batch N] [--iters N] [--threads N] [--ragged]

Defaults: on CPU the ``tiny`` preset and contexts up to 1024; on CUDA the ``base`` preset, contexts
256..4096 and bf16 autocast. Each row is one configuration on synthetic cells that fill the whole
context (``--ragged``: lengths uniform in [L/2, L], so padding and unpadding matter). The batch holds
about ``--tokens-per-batch`` tokens (batch = tokens // context).

Columns: forward cells/s and tokens/s (no grad, eval mode), training-step cells/s (forward, MLM loss,
backward, AdamW), peak memory (CUDA max allocated over forward and training; on CPU the peak RSS of a
subprocess that runs that row alone, so it includes the ~0.3 GB of the Python/torch baseline), model
FLOP/s of the training step (matmul FLOPs of the encoder and MLM head, attention counted on real
tokens, backward = 2 x forward) and MFU against a measured dense matmul peak (bf16 on CUDA; on CPU
the fp32 matmul rate of the same threads, for reference). ``ran`` is the attention kernel that
actually executed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cellarena.zoo.transformer.model import CellTransformer, flash_attn_available, preset  # noqa: E402
from cellarena.zoo.transformer.tokenize import CellTokenizer, GeneVocab  # noqa: E402
from cellarena.zoo.transformer.train import choose_masked  # noqa: E402

N_GENES = 20_000
MASK_FRACTION = 0.15
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)


def device_description(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}"
    cpu = cpu_model()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, load average {load:.1f}")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dev: torch.device) -> float:
    """Measured dense matmul FLOP/s: bf16 8192^3 on CUDA, fp32 1024^3 on CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if dev.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def synthetic_cells(context: int, n_cells: int, ragged: bool, seed: int = 0):
    """A vocabulary of N_GENES genes and ``n_cells`` cells with enough expressed genes to fill the context."""
    import scipy.sparse as sp  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    genes = [f"G{i:05d}" for i in range(N_GENES)]
    rows, cols, vals = [], [], []
    for i in range(n_cells):
        n_expr = context if not ragged else int(rng.integers(context // 2, context + 1))
        idx = rng.choice(N_GENES, size=n_expr, replace=False)
        rows.append(np.full(n_expr, i))
        cols.append(idx)
        vals.append(rng.geometric(0.3, size=n_expr).astype(np.float32))
    counts = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n_cells, N_GENES))
    medians = np.exp(rng.normal(0.0, 0.5, N_GENES)) * 5.0
    vocab = GeneVocab(genes=genes, sample_groups={"batch": ["b1"]}, sample_slots=4, medians=medians)
    return vocab, counts, genes


def train_flops(cfg, lengths: np.ndarray, n_masked: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward)."""
    d, f, layers = cfg.d_model, cfg.d_ff, cfg.n_layers
    tokens = float(lengths.sum())
    dense = 2 * tokens * layers * (4 * d * d + 2 * d * f)
    attn = 2 * 2 * layers * d * float((lengths.astype(np.float64) ** 2).sum())
    out = {"rank": cfg.n_genes, "bin": cfg.n_bins, "projection": 1}[cfg.encoding]
    head = 2 * n_masked * (d * d + d * out)
    return 3 * (dense + attn + head)


def run_one(encoding: str, backend: str, context: int, args) -> dict:
    dev = torch.device(args.device)
    batch_size = max(1, args.tokens_per_batch // context)
    vocab, counts, genes = synthetic_cells(context, batch_size, args.ragged)
    cfg = preset(args.preset, encoding, context_length=context, attention=backend).with_vocab(vocab)
    cells = CellTokenizer.from_config(vocab, cfg).encode(counts, genes, {"batch": ["b1"] * batch_size})
    batch = cells.batch(np.arange(batch_size)).to(dev)
    lengths = cells.lengths
    torch.manual_seed(0)
    model = CellTransformer(cfg).to(dev)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    masked = choose_masked(batch.to("cpu"), cfg.gene_offset, MASK_FRACTION,
                           torch.Generator().manual_seed(0)).to(dev)
    row = {"encoding": encoding, "backend": backend, "context": context, "batch": batch_size,
           "tokens": int(lengths.sum())}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        model.eval()
        with torch.inference_mode(), amp:
            for _ in range(args.warmup):
                model.forward_batch(batch)
            _sync(dev)
            t = time.perf_counter()
            for _ in range(args.iters):
                model.forward_batch(batch)
            _sync(dev)
            fwd = (time.perf_counter() - t) / args.iters
        row["ran"] = model.last_attention_backend
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with amp:
                out = model.forward_batch(batch, masked=masked)
                loss = model.mlm_loss(out.hidden, batch, masked)
            loss.backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        _sync(dev)
        t = time.perf_counter()
        for _ in range(args.iters):
            step()
        _sync(dev)
        trn = (time.perf_counter() - t) / args.iters
    except torch.OutOfMemoryError:
        row.update(error="OOM")
        if dev.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        return row
    row.update(fwd_cells_s=batch_size / fwd, fwd_tokens_s=row["tokens"] / fwd, train_cells_s=batch_size / trn,
               train_flops_s=train_flops(cfg, lengths, int(masked.sum())) / trn)
    if dev.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return row


def run_isolated(encoding: str, backend: str, context: int, args) -> dict:
    """Run one row in a fresh interpreter so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--one", encoding, backend, str(context), "--device", args.device,
           "--preset", args.preset, "--tokens-per-batch", str(args.tokens_per_batch), "--iters",
           str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.ragged:
        cmd.append("--ragged")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"encoding": encoding, "backend": backend, "context": context, "error": tail[0][:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default=None, choices=["tiny", "base"])
    ap.add_argument("--contexts", type=int, nargs="+")
    ap.add_argument("--encodings", nargs="+", default=["rank", "bin", "projection"])
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--tokens-per-batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ragged", action="store_true")
    ap.add_argument("--no-isolate", action="store_true", help="CPU: run rows in this process")
    ap.add_argument("--one", nargs=3, metavar=("ENCODING", "BACKEND", "CONTEXT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("base" if gpu else "tiny")
    args.contexts = args.contexts or ([256, 512, 1024, 2048, 4096] if gpu else [256, 512, 1024])
    args.tokens_per_batch = args.tokens_per_batch or (32768 if gpu else 8192)
    args.iters = args.iters or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    torch.set_num_threads(args.threads)

    if args.one:
        enc, backend, ctx = args.one
        print(json.dumps(run_one(enc, backend, int(ctx), args)))
        return 0

    dev = torch.device(args.device)
    backends = args.backends or (["math", "sdpa", "sdpa_packed"] + (["flash_varlen"] if gpu and flash_attn_available() else []))
    peak = matmul_peak(dev)
    print(f"device: {device_description(dev)}")
    print(f"preset: {args.preset} ({'bf16 autocast' if gpu else 'fp32'}), vocabulary {N_GENES} genes, "
          f"~{args.tokens_per_batch} tokens per batch, {'ragged' if args.ragged else 'full-length'} cells, "
          f"{args.iters} timed iterations after {args.warmup} warm-up")
    print(f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s ({'bf16' if gpu else 'fp32'})")
    if not gpu and "flash_varlen" not in backends:
        print("flash_varlen: not run (needs CUDA and the flash-attn package)")
    elif gpu and not flash_attn_available():
        print("flash_varlen: not run (flash-attn is not importable)")
    header = (f"{'encoding':<10} {'backend':<12} {'ran':<17} {'ctx':>5} {'batch':>5} {'fwd cells/s':>11} "
              f"{'fwd tok/s':>10} {'train cells/s':>13} {'peak MiB':>9} {'train TFLOP/s':>13} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    isolate = not gpu and not args.no_isolate
    for enc in args.encodings:
        for backend in backends:
            for ctx in args.contexts:
                r = (run_isolated if isolate else run_one)(enc, backend, ctx, args)
                if "error" in r:
                    print(f"{enc:<10} {backend:<12} {r.get('ran', '-'):<17} {ctx:>5} {r.get('batch', 0):>5} "
                          f"{r['error']:>11} {'':>10} {'':>13} {fmt(r.get('peak_mib'), '9.0f')}")
                    continue
                tf = r["train_flops_s"] / 1e12
                print(f"{enc:<10} {backend:<12} {r['ran']:<17} {ctx:>5} {r['batch']:>5} "
                      f"{r['fwd_cells_s']:>11.1f} {r['fwd_tokens_s']:>10.0f} {r['train_cells_s']:>13.1f} "
                      f"{r['peak_mib']:>9.0f} {tf:>13.4f} {100 * r['train_flops_s'] / peak:>5.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
