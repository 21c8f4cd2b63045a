"""Fetching: sha256 verification, atomic cache writes, a real https server on 127.0.0.1."""

from __future__ import annotations

import hashlib

import pytest

from cellarena.cards.dataset import parse_card
from cellarena.errors import CellarenaError, ChecksumError
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


def _serve_index(https_server, monkeypatch, project: str, served, unhashed: str) -> None:
    """A PEP 691 JSON simple index on the loopback server listing ``served`` (with its sha256) and a
    file named ``unhashed`` without one, which the fetch must skip; the fetch is pointed at it."""
    import json

    index = https_server["root"] / "simple" / project
    index.mkdir(parents=True)
    (index / "index.html").write_text(json.dumps({"files": [
        {"filename": served.name, "url": f"{https_server['base']}/files/{served.name}",
         "hashes": {"sha256": sha256_file(served)}},
        {"filename": unhashed, "url": "https://127.0.0.1:1/nothing", "hashes": {}},
    ]}))
    monkeypatch.setenv("CELLARENA_PYPI_SIMPLE", f"{https_server['base']}/simple")


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
    _serve_index(https_server, monkeypatch, "toypkg", wheel, "toypkg-0.9-py3-none-any.whl")
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


def test_pypi_sdist_member_through_a_loopback_index(https_server, tmp_path, monkeypatch, small_h5ad):
    """``archive: sdist``: the member is read out of the release's .tar.gz (test data often live only
    there), located and checked through the index like a wheel."""
    import io
    import tarfile

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    root = https_server["root"]
    sdist = root / "files" / "Toy.Pkg-2.0.tar.gz"  # an old-style name: not normalized
    sdist.parent.mkdir(exist_ok=True)
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in (("Toy.Pkg-2.0/tests/data/toy.h5ad", small_h5ad.read_bytes()),
                           ("Toy.Pkg-2.0/setup.py", b"raise SystemExit('never run')\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("Toy.Pkg-2.0/tests")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
    _serve_index(https_server, monkeypatch, "toy-pkg", sdist, "toy_pkg-2.0-py3-none-any.whl")
    member_sha = sha256_file(small_h5ad)
    source = {"id": "main", "kind": "pypi_wheel", "package": "toy_pkg", "version": "2.0", "archive": "sdist",
              "member": "Toy.Pkg-2.0/tests/data/toy.h5ad", "sha256": member_sha}
    card = _card([source])
    path = fetch_card(card, tmp_path / "cache")["main"]
    assert sha256_file(path) == member_sha and prepare(card, {"main": path}).n_obs == 60
    # a member that is not there, or is a folder: named, with the sdist's folder convention
    for member in ("tests/data/toy.h5ad", "Toy.Pkg-2.0/tests"):
        with pytest.raises(CellarenaError, match=r"(?s)Toy\.Pkg-2\.0\.tar\.gz has no member .*'<name>-<version>/'"):
            fetch_card(_card([{**source, "member": member}]), tmp_path / "cache2")
    # the same release without archive: sdist finds no wheel with a sha256, and says what to set
    with pytest.raises(CellarenaError, match="(?s)no wheel of toy_pkg==2.0 with a sha256.*archive: sdist"):
        fetch_card(_card([{**source, "archive": "wheel", "member": "toy/x.h5ad"}]), tmp_path / "cache3")


@pytest.fixture
def flaky_server(https_server, tmp_path):
    """A TLS server (the session's certificate) that answers 503 to the first two requests of
    /flaky.h5ad, 404 to /gone.h5ad, and counts every request."""
    import collections
    import functools
    import http.server
    import ssl
    import threading

    hits = collections.Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            if self.path == "/flaky.h5ad" and hits[self.path] <= 2:
                self.send_error(503, "busy")
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(https_server["cert"], https_server["cert"].parent / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"root": tmp_path, "hits": hits, "base": f"https://127.0.0.1:{server.server_address[1]}"}
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_is_retried_only_when_a_retry_can_help(flaky_server, small_h5ad, tmp_path, monkeypatch,
                                                          https_server):
    from cellarena.data import fetch

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server["cert"]))
    monkeypatch.setattr(fetch, "RETRY_DELAY_S", 0.01)
    (flaky_server["root"] / "flaky.h5ad").write_bytes(small_h5ad.read_bytes())
    sha, size = sha256_file(small_h5ad), small_h5ad.stat().st_size
    card = _card([{"id": "main", "kind": "url", "url": f"{flaky_server['base']}/flaky.h5ad", "sha256": sha,
                   "size": size}])
    assert sha256_file(fetch_card(card, tmp_path / "cache")["main"]) == sha  # a busy server: tried again
    assert flaky_server["hits"]["/flaky.h5ad"] == fetch.DOWNLOAD_ATTEMPTS == 3
    gone = _card([{"id": "main", "kind": "url", "url": f"{flaky_server['base']}/gone.h5ad", "sha256": sha,
                   "size": size}])
    with pytest.raises(Exception, match="download of .*/gone.h5ad failed: 404"):
        fetch_card(gone, tmp_path / "cache2")
    assert flaky_server["hits"]["/gone.h5ad"] == 1  # a 404 comes back the same: not retried


def test_a_failed_fetch_writes_a_failed_manifest_that_prepare_passes_on(tmp_path, small_h5ad, repo):
    """`cellarena fetch` records a checksum mismatch instead of failing the job; `cellarena prepare`
    turns it into a failed prepared file with the fetch's reason, which the runs report."""
    import json
    import subprocess
    import sys

    import anndata as ad
    import yaml

    from cellarena.data.prepare import provenance

    card = tmp_path / "toy_set.yaml"
    card.write_text(yaml.safe_dump(_card([{"id": "main", "kind": "local", "path": str(small_h5ad),
                                           "sha256": "0" * 64}]).model_dump(mode="json")))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cellarena", *args], capture_output=True, text=True, timeout=120)

    fetched = cli("fetch", "--card", str(card), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "m.json"))
    assert fetched.returncode == 0 and "sha256 mismatch" in fetched.stderr
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["status"] == "failed" and manifest["reason"].startswith("fetch failed: ")
    assert sha256_file(small_h5ad) in manifest["reason"]
    prepared = cli("prepare", "--card", str(card), "--manifest", str(tmp_path / "m.json"), "--out",
                   str(tmp_path / "p.h5ad"))
    assert prepared.returncode == 0, prepared.stderr
    info = provenance(ad.read_h5ad(tmp_path / "p.h5ad"))
    assert info["status"] == "failed" and info["reason"] == manifest["reason"]
