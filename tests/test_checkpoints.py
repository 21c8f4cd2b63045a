"""The checkpoints directory (the run's, else the environment's default): missing files, published sizes and
sha256 (hashed once, then stamped)."""

from __future__ import annotations

import hashlib
import os

import pytest

from cellarena.zoo.adapters.releases import (
    CHECKPOINTS_ENV,
    checkpoints_dir,
    file_sha256,
    is_random_release,
    locate,
    mark_random_release,
    match_genes,
)
from cellarena.errors import NotApplicable
from cellarena.cards.model import ModelCard

BLOB = b"released weights " * 1000


def _card(files):
    return ModelCard.model_validate({
        "id": "some_adapter", "version": "1.0.0", "name": "x", "kind": "adapter", "tasks": ["zero_shot"],
        "citation": "c", "licence": "MIT", "pretraining": {"corpus": "uce_36m"},
        "checkpoint": {"release": "r1", "folder": "release_one", "files": files, "source": "https://example.org/r1"}})


@pytest.fixture
def release(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "ck"))
    folder = tmp_path / "ck" / "release_one"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "weights.bin").write_bytes(BLOB)
    (folder / "vocab.json").write_text("{}")
    return folder


def test_directory_comes_from_the_environment(release):
    assert checkpoints_dir() == release.parent


def test_a_root_given_to_locate_wins_over_the_environment(release, tmp_path):
    card = _card([{"name": "vocab.json"}])
    assert locate(card) == release
    with pytest.raises(NotApplicable, match=f"missing {tmp_path / 'other' / 'release_one' / 'vocab.json'}"):
        locate(card, tmp_path / "other")


def test_missing_files_are_named_with_where_to_get_them(release):
    card = _card([{"name": "sub/weights.bin"}, {"name": "args.json"}, {"name": "other.pt"}])
    with pytest.raises(NotApplicable) as err:
        locate(card)
    message = str(err.value)
    assert f"missing {release / 'args.json'}, {release / 'other.pt'}" in message
    assert "https://example.org/r1" in message and CHECKPOINTS_ENV in message


def test_wrong_size_is_not_the_release(release):
    with pytest.raises(NotApplicable, match=f"{release / 'sub' / 'weights.bin'} has {len(BLOB)} bytes, the "
                                            f"release has {len(BLOB) + 1}"):
        locate(_card([{"name": "sub/weights.bin", "size_bytes": len(BLOB) + 1}]))


def test_sha256_is_checked_once_then_stamped(release):
    good = hashlib.sha256(BLOB).hexdigest()
    card = _card([{"name": "sub/weights.bin", "size_bytes": len(BLOB), "sha256": good}, {"name": "vocab.json"}])
    assert locate(card) == release
    stamps = list((release.parent.parent / "cache" / "checkpoint-stamps").glob("*.json"))
    assert len(stamps) == 1
    # same size and modification time: the stamp is trusted, the file is not read again
    path = release / "sub" / "weights.bin"
    st = path.stat()
    path.write_bytes(BLOB.replace(b"released", b"tampered"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(path) == good
    # a new modification time: hashed again, and the changed file is refused, naming it and the fix
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=f"{path} is not the published file of r1: its sha256 is "
                                         f"{hashlib.sha256(path.read_bytes()).hexdigest()}.*Download it again"):
        locate(card)


def test_match_genes_reports_the_fraction():
    found, ids = match_genes(["A", "B", "C", "D"], {"B": 7, "D": 9}, min_fraction=0.5, what="vocabulary")
    assert found.tolist() == [1, 3] and ids.tolist() == [7, 9]
    with pytest.raises(NotApplicable, match=r"only 1 of 4 genes \(25.0%\) are in the vocabulary; .* at least 30%"):
        match_genes(["A", "B", "C", "E"], {"B": 7}, min_fraction=0.3, what="vocabulary")


def test_a_random_release_is_checked_for_presence_only(release):
    card = _card([{"name": "sub/weights.bin", "size_bytes": 5, "sha256": "0" * 64}, {"name": "vocab.json"}])
    with pytest.raises(NotApplicable, match="the release has 5"):
        locate(card)
    mark_random_release(release)
    assert is_random_release(release) and locate(card) == release
    (release / "vocab.json").unlink()
    with pytest.raises(NotApplicable, match="missing"):
        locate(card)
