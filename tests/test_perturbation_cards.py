"""The genetic-screen cards (Norman 2019, Adamson 2016, Replogle 2022) load their published layouts.

The real files cannot be downloaded here, so each test writes a small file in the layout the card
describes (scPerturb's obs columns and label conventions, raw counts in X, symbols as the var
index), serves it from a real https server on 127.0.0.1, points a copy of the real card at it (only
url, sha256 and size change) and runs the suite's own fetch and prepare.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from cellarena.cards.dataset import CONTROL, parse_card
from cellarena.data.fetch import fetch_card, sha256_file
from cellarena.data.prepare import prepare

GENES = ["CBL", "CNN1", "ATF6", "AARS", "GAPDH", "XBP1", "HSPA5", "DDIT3"]

# raw obs labels in each file's published convention -> the canonical label (None: dropped)
LAYOUTS = {
    "norman2019_k562_crispra": {
        "perturbation": {"control": CONTROL, "CBL": "CBL", "CNN1_CBL": "CBL+CNN1", "CBL_CNN1": "CBL+CNN1"},
        "extra_obs": {"guide_id": "g", "nperts": 1, "perturbation_type": "CRISPR"},
    },
    "adamson2016_k562_upr": {
        "perturbation": {"63(mod)_pBA580": CONTROL, "Gal4-4(mod)_pBA582": CONTROL, "ATF6_pDS123": "ATF6",
                         "XBP1_pDS456": "XBP1", "*": None, None: None},
        "extra_obs": {"nperts": 2, "perturbation_type": "CRISPR"},
    },
    "replogle2022_k562_essential": {
        "perturbation": {"control": CONTROL, "AARS": "AARS", "HSPA5": "HSPA5"},
        "extra_obs": {"batch": "gem1", "gene": "x", "nperts": 1, "perturbation_type": "CRISPR"},
    },
}


def _published_file(card_id: str, path, cells_per_label: int = 4):
    layout = LAYOUTS[card_id]
    raw = [label for label in layout["perturbation"] for _ in range(cells_per_label)]
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(len(raw), len(GENES))).astype(np.float32)
    obs = pd.DataFrame({"perturbation": pd.Categorical(raw)},
                       index=[f"AAAC{i:04d}-1" for i in range(len(raw))])
    for col, value in layout["extra_obs"].items():
        obs[col] = value
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES))
    adata.write_h5ad(path)
    return raw, counts


@pytest.mark.parametrize("card_id", sorted(LAYOUTS))
def test_card_loads_its_published_layout_over_https(card_id, repo, https_server, tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    data = yaml.safe_load((repo / "datasets" / f"{card_id}.yaml").read_text())
    assert data["requires_network"] is True and data["sources"][0]["url"].startswith("https://zenodo.org/")
    served = https_server["root"] / card_id / data["sources"][0]["url"].rsplit("/", 1)[-1]
    served.parent.mkdir(exist_ok=True)
    raw, counts = _published_file(card_id, served)
    data["sources"][0].update(url=f"{https_server['base']}/{card_id}/{served.name}",
                              sha256=sha256_file(served), size=served.stat().st_size)
    card = parse_card(data, where=f"{card_id}.yaml")

    paths = fetch_card(card, tmp_path / "cache")
    prepared = prepare(card, paths)

    expected = [LAYOUTS[card_id]["perturbation"][label] for label in raw]
    keep = np.array([e is not None for e in expected])
    assert prepared.n_obs == int(keep.sum())
    assert prepared.obs["perturbation"].astype(str).tolist() == [e for e in expected if e is not None]
    np.testing.assert_array_equal(prepared.layers["counts"].toarray(), counts[keep])
    assert list(prepared.var_names) == GENES
    if not keep.all():
        assert '"perturbation_labels"' in prepared.uns["cellarena"]["excluded_cells"]
    if card_id == "replogle2022_k562_essential":
        assert set(prepared.obs["batch"]) == {"gem1"}


def test_a_wrong_checksum_names_the_card(repo, https_server, tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    data = yaml.safe_load((repo / "datasets" / "norman2019_k562_crispra.yaml").read_text())
    served = https_server["root"] / "norman_bad.h5ad"
    _published_file("norman2019_k562_crispra", served)
    data["sources"][0].update(url=f"{https_server['base']}/norman_bad.h5ad", size=served.stat().st_size)
    card = parse_card(data, where="norman2019_k562_crispra.yaml")  # keeps the real file's sha256
    with pytest.raises(Exception, match="sha256 mismatch") as err:
        fetch_card(card, tmp_path / "cache")
    assert "norman2019_k562_crispra" in str(err.value)
