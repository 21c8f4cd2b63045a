"""Shared fixtures: real data fetched once per session through the suite's own fetch code."""

from __future__ import annotations

import functools
import http.server
import shutil
import ssl
import os
import subprocess
import sys
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellarena.cards.dataset import load_card, parse_card
from cellarena.data.fetch import default_cache_dir, fetch_card, sha256_file
from cellarena.data.prepare import prepare, write_h5ad

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def run_ci_plan(results_dir: Path, data_cache: Path, *extra: str, cores: int = 2) -> subprocess.CompletedProcess:
    """The CI regression plan (workflow/config.ci.yaml) run locally by Snakemake into ``results_dir``."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile",
                           "workflow/config.ci.yaml", "--config", f"results_dir={results_dir}", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, CELLARENA_CACHE=str(data_cache)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="session")
def ci_results(tmp_path_factory, data_cache) -> Path:
    """One local run of the CI plan, shared by the regression and SLURM tests."""
    out = tmp_path_factory.mktemp("ci") / "results"
    run_ci_plan(out, data_cache)
    return out


@pytest.fixture(scope="session")
def data_cache() -> Path:
    """The user's cache (``$CELLARENA_CACHE`` or ~/.cache/cellarena), shared with `make run`."""
    return default_cache_dir()


@pytest.fixture(scope="session")
def pbmc68k_prepared(tmp_path_factory, data_cache) -> Path:
    card = load_card(REPO / "datasets" / "pbmc68k_reduced.yaml")
    paths = fetch_card(card, data_cache)
    out = tmp_path_factory.mktemp("prepared") / "pbmc68k_reduced.h5ad"
    return write_h5ad(prepare(card, paths), out)


@pytest.fixture(scope="session")
def pbmc68k_split(pbmc68k_prepared, tmp_path_factory) -> Path:
    """A seeded stratified split (70/30) of the prepared pbmc68k_reduced file."""
    from cellarena.data.splits import SplitSpec, make_split, write_split  # noqa: PLC0415

    split = make_split(ad.read_h5ad(pbmc68k_prepared).obs, dataset_id="pbmc68k_reduced", dataset_version=1,
                       name="stratified", spec=SplitSpec(scheme="stratified", test_fraction=0.3), seed=0)
    return write_split(split, tmp_path_factory.mktemp("split") / "pbmc68k_stratified.json")


@pytest.fixture(scope="session")
def kang_prepared(tmp_path_factory, data_cache) -> Path:
    card = load_card(REPO / "datasets" / "kang2018_ifnb.yaml")
    out = tmp_path_factory.mktemp("prepared") / "kang2018_ifnb.h5ad"
    return write_h5ad(prepare(card, fetch_card(card, data_cache)), out)


@pytest.fixture(scope="session")
def proxy_prepared(tmp_path_factory, data_cache, kang_prepared) -> Path:
    """The simulated screen, derived from the prepared Kang file as the workflow derives it."""
    card = load_card(REPO / "datasets" / "perturbseq_proxy.yaml")
    paths = fetch_card(card, data_cache, derived={"kang2018_ifnb": kang_prepared})
    out = tmp_path_factory.mktemp("prepared") / "perturbseq_proxy.h5ad"
    return write_h5ad(prepare(card, paths), out)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, kang_prepared):
    """`cellarena validate`'s tiny dataset and splits (200 Kang cells, 500 genes), made from the
    session's prepared Kang file, with its cache in a temp dir."""
    from cellarena.review.validate import tiny_data  # noqa: PLC0415

    work = tmp_path_factory.mktemp("validate")
    return tiny_data(work, prepared_kang=kang_prepared, cache_dir=work / "cache")


def small_counts_adata(n_cells: int = 60, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    """A small raw-count AnnData with three labelled groups and two batches."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(["alpha", "beta", "gamma"], n_cells // 3)
    rates = rng.gamma(2.0, 1.0, size=(3, n_genes))
    rates[0, :5] += 8
    rates[1, 5:10] += 8
    rates[2, 10:15] += 8
    lam = rates[np.searchsorted(["alpha", "beta", "gamma"], groups)]
    counts = rng.poisson(lam).astype(np.float32)
    obs = pd.DataFrame({"label": groups, "lane": np.tile(["b1", "b2"], n_cells // 2)},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def small_adata():
    """The factory :func:`small_counts_adata` (a fixture, so tests need no import of this module)."""
    return small_counts_adata


@pytest.fixture
def small_h5ad(tmp_path) -> Path:
    path = tmp_path / "small.h5ad"
    small_counts_adata().write_h5ad(path)
    return path


@pytest.fixture
def copy_models(tmp_path, repo):
    """Copy selected model folders into a temporary models dir and return it."""

    def _copy(*ids: str) -> Path:
        dest = tmp_path / "models"
        dest.mkdir(exist_ok=True)
        for mid in ids:
            shutil.copytree(repo / "models" / mid, dest / mid)
        return dest

    return _copy


@pytest.fixture
def prepare_local(tmp_path):
    """Prepare an in-memory raw AnnData through a local-source dataset card; returns the h5ad path.

    ``roles`` maps canonical roles to raw obs columns; labels are expert when a cell_type role is
    given, else none.
    """

    def _prepare(raw: ad.AnnData, dataset_id: str = "toy_set", roles: dict | None = None) -> Path:
        roles = {"cell_type": "label", "condition": "lane"} if roles is None else roles
        path = tmp_path / f"{dataset_id}_raw.h5ad"
        raw.write_h5ad(path)
        card = parse_card({
            "id": dataset_id, "version": 1, "title": "toy", "organism": "homo_sapiens",
            "gene_id_type": "symbol", "licence": "CC0", "citation": "nobody",
            "sources": [{"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path)}],
            "roles": roles, "labels": {"quality": "expert" if "cell_type" in roles else "none"},
        }, where=f"{dataset_id}.yaml")
        return write_h5ad(prepare(card, {"main": path}), tmp_path / f"{dataset_id}.h5ad")

    return _prepare


@pytest.fixture(scope="session")
def https_server(tmp_path_factory):
    """A real TLS server on 127.0.0.1 serving a folder, with a self-signed certificate."""
    root = tmp_path_factory.mktemp("www")
    certs = tmp_path_factory.mktemp("certs")
    cert, key = certs / "cert.pem", certs / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"root": root, "cert": cert, "base": f"https://127.0.0.1:{server.server_address[1]}"}
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def release_genes(tiny) -> list[str]:
    """The genes of an adapter's random test release: the tiny data's first 400 (80 % of its genes)."""
    return list(ad.read_h5ad(tiny.prepared, backed="r").var_names[:400])
