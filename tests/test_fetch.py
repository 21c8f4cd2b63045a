"""Fetching: sha256 verification, atomic cache writes, a real https server on 127.0.0.1."""

from __future__ import annotations

import hashlib

import pytest

from cellarena.cards.dataset import parse_card
from cellarena.errors import ChecksumError
from cellarena.data.fetch import fetch_card, sha256_file
from cellarena.data.prepare import prepare


def _card(sources, labels=None, roles=None):
    return parse_card({
        "id": "toy_set", "version": 1, "title": "toy", "organism": "homo_sapiens",
        "gene_id_type": "symbol", "licence": "CC0", "citation": "nobody",
        "requires_network": any(s["kind"] == "url" for s in sources),
        "sources": sources, "roles": roles or {"cell_type": "label", "batch": "lane"},
        "labels": labels or {"quality": "expert"},
    }, where="toy_set.yaml")


def test_https_source_good_hash(https_server, small_h5ad, tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    served = https_server["root"] / "files" / "12345"  # opaque name, as figshare/zenodo serve
    served.parent.mkdir(exist_ok=True)
    served.write_bytes(small_h5ad.read_bytes())
    sha, size = sha256_file(served), served.stat().st_size
    card = _card([{"id": "main", "kind": "url", "url": f"{https_server['base']}/files/12345",
                   "sha256": sha, "size": size}])
    cache = tmp_path / "cache"
    paths = fetch_card(card, cache)
    assert paths["main"] == cache / sha / "main.h5ad"
    assert sha256_file(paths["main"]) == sha
    # the whole path through to the canonical AnnData
    adata = prepare(card, paths)
    assert adata.n_obs == 60 and adata.obs["cell_type"].nunique() == 3
    assert set(adata.obs["batch"]) == {"b1", "b2"}
    # a second fetch is served from the cache (the server no longer has the file)
    served.unlink()
    assert fetch_card(card, cache)["main"] == paths["main"]


def test_https_source_bad_hash(https_server, small_h5ad, tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    (https_server["root"] / "bad.h5ad").write_bytes(small_h5ad.read_bytes())
    actual = sha256_file(small_h5ad)
    wrong = hashlib.sha256(b"something else").hexdigest()
    card = _card([{"id": "main", "kind": "url", "url": f"{https_server['base']}/bad.h5ad",
                   "sha256": wrong, "size": small_h5ad.stat().st_size}])
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as err:
        fetch_card(card, cache)
    msg = str(err.value)
    assert "toy_set" in msg and wrong in msg and actual in msg
    # nothing with the wrong content is left where a later run would trust it
    assert not (cache / wrong).exists()
    assert not any(p.is_file() for p in (cache / ".partial").iterdir())


def test_https_wrong_size_is_rejected(https_server, small_h5ad, tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    (https_server["root"] / "sized.h5ad").write_bytes(small_h5ad.read_bytes())
    card = _card([{"id": "main", "kind": "url", "url": f"{https_server['base']}/sized.h5ad",
                   "sha256": sha256_file(small_h5ad), "size": 7}])
    with pytest.raises(ChecksumError, match="size mismatch"):
        fetch_card(card, tmp_path / "cache")


def test_untrusted_certificate_fails_clearly(https_server, small_h5ad, tmp_path, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    (https_server["root"] / "x.h5ad").write_bytes(small_h5ad.read_bytes())
    card = _card([{"id": "main", "kind": "url", "url": f"{https_server['base']}/x.h5ad",
                   "sha256": sha256_file(small_h5ad), "size": small_h5ad.stat().st_size}])
    with pytest.raises(Exception, match="download of https://127.0.0.1"):
        fetch_card(card, tmp_path / "cache")


def test_local_source_checksum_mismatch(small_h5ad, tmp_path):
    card = _card([{"id": "main", "kind": "local", "path": str(small_h5ad), "sha256": "0" * 64}])
    with pytest.raises(ChecksumError, match="expected 0000") as err:
        fetch_card(card, tmp_path / "cache")
    assert sha256_file(small_h5ad) in str(err.value)
    assert "datasets/toy_set.yaml" in str(err.value)


def test_corrupt_cache_entry_is_refetched(small_h5ad, tmp_path):
    sha = sha256_file(small_h5ad)
    card = _card([{"id": "main", "kind": "local", "path": str(small_h5ad), "sha256": sha}])
    cache = tmp_path / "cache"
    path = fetch_card(card, cache)["main"]
    path.write_bytes(b"corrupted")
    assert sha256_file(fetch_card(card, cache)["main"]) == sha


def test_pypi_wheel_member_real(data_cache, repo):
    """The real card: the member of the scanpy wheel, fetched with pip and verified."""
    from cellarena.cards.dataset import load_card

    card = load_card(repo / "datasets" / "pbmc68k_reduced.yaml")
    path = fetch_card(card, data_cache)["main"]
    assert sha256_file(path) == card.sources[0].sha256


def test_pypi_wheel_member_bad_hash(tmp_path, repo):
    from cellarena.cards.dataset import load_card

    good = load_card(repo / "datasets" / "pbmc68k_reduced.yaml")
    data = good.model_dump(mode="json")
    data["sources"][0]["sha256"] = "f" * 64
    card = parse_card(data, where="pbmc68k_reduced.yaml")
    with pytest.raises(ChecksumError, match=good.sources[0].sha256):
        fetch_card(card, tmp_path / "cache")
    assert not (tmp_path / "cache" / ("f" * 64)).exists()


def test_pypi_wheel_source_through_a_loopback_index(https_server, tmp_path, monkeypatch, small_h5ad):
    """The wheel code path offline: a PEP 691 JSON index and a wheel served on 127.0.0.1."""
    import zipfile

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    root = https_server["root"]
    wheel = root / "files" / "toypkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("toypkg/data/toy.h5ad", small_h5ad.read_bytes())
        zf.writestr("toypkg-1.0.dist-info/METADATA", "Name: toypkg\nRequires-Dist: broken (>=2.2x)\n")
    index = root / "simple" / "toypkg"
    index.mkdir(parents=True)
    import json

    (index / "index.html").write_text(json.dumps({"files": [
        {"filename": wheel.name, "url": f"{https_server['base']}/files/{wheel.name}",
         "hashes": {"sha256": sha256_file(wheel)}},
        {"filename": "toypkg-0.9-py3-none-any.whl", "url": "https://127.0.0.1:1/nothing", "hashes": {}},
    ]}))
    monkeypatch.setenv("CELLARENA_PYPI_SIMPLE", f"{https_server['base']}/simple")
    member_sha = sha256_file(small_h5ad)
    card = _card([{"id": "main", "kind": "pypi_wheel", "package": "toypkg", "version": "1.0",
                   "member": "toypkg/data/toy.h5ad", "sha256": member_sha}])
    path = fetch_card(card, tmp_path / "cache")["main"]
    assert path.name == "toy.h5ad" and sha256_file(path) == member_sha
    assert prepare(card, {"main": path}).n_obs == 60
    # wrong member hash: refused, nothing cached under the wrong name
    bad = _card([{"id": "main", "kind": "pypi_wheel", "package": "toypkg", "version": "1.0",
                  "member": "toypkg/data/toy.h5ad", "sha256": "e" * 64}])
    with pytest.raises(ChecksumError, match=member_sha):
        fetch_card(bad, tmp_path / "cache2")
    # the wheel itself no longer matches the index: pooch refuses it
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    with pytest.raises(ChecksumError, match="does not match the index"):
        fetch_card(card, tmp_path / "cache3")
