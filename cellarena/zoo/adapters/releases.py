"""Where published checkpoints live, and what an adapter does when one is missing or does not fit.

Every adapter's files are found in one directory: the run's ``checkpoints_dir`` (``RunContext``,
from the job or ``--checkpoints-dir``); without one, :func:`checkpoints_dir`, the user's default:
``$CELLARENA_CHECKPOINTS``, else ``<data cache>/checkpoints``. A card's ``checkpoint.folder`` is the
subfolder, ``checkpoint.files`` the published file names. Nothing is downloaded at run time: a
missing file makes the run ``not_applicable``, naming the exact path expected and where to obtain it.

Where the card records a file's published sha256, the file is hashed once and the result kept as a
stamp in ``<data cache>/checkpoint-stamps/`` (keyed by the file's absolute path, valid while its size
and modification time stay the same), so a multi-gigabyte release is read in full only the first
time. A file whose hash differs from the release's is an error (a failed run naming the file), not
``not_applicable``: it is there, but it is not the published file.

A release folder written by :mod:`cellarena.zoo.adapters.random_weights` (tests, ``cellarena
validate``, benchmarks at published sizes) holds the marker file :data:`RANDOM_RELEASE_MARKER`: its
files are checked for presence only, never against the published sizes and hashes, and plug-ins
record ``random_weights: true`` in the run's ``runtime_json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from cellarena.errors import NotApplicable

CHECKPOINTS_ENV = "CELLARENA_CHECKPOINTS"
RANDOM_RELEASE_MARKER = ".cellarena-random-release"


def checkpoints_dir() -> Path:
    """The user's default checkpoints directory: ``$CELLARENA_CHECKPOINTS``, else the data cache's."""
    from cellarena.data.fetch import default_cache_dir  # noqa: PLC0415

    env = os.environ.get(CHECKPOINTS_ENV)
    return Path(env).expanduser() if env else default_cache_dir() / "checkpoints"


def locate(card, root: str | Path | None = None) -> Path:
    """The folder of ``card``'s checkpoint under ``root`` (None: :func:`checkpoints_dir`) with every
    published file present (sizes checked where the card records them); :class:`NotApplicable` naming
    what is missing otherwise."""
    spec = card.checkpoint
    if spec is None:
        raise NotApplicable(f"model {card.id} declares no checkpoint")
    folder = (Path(root) if root else checkpoints_dir()) / spec.folder
    published = not is_random_release(folder)
    missing, wrong = [], []
    for f in spec.files:
        path = folder / f.name
        if not path.is_file():
            missing.append(str(path))
        elif published and f.size_bytes is not None and path.stat().st_size != f.size_bytes:
            wrong.append(f"{path} has {path.stat().st_size} bytes, the release has {f.size_bytes}")
    if missing or wrong:
        what = (f"missing {', '.join(missing)}" if missing else "") + ("; " if missing and wrong else "") + \
            "; ".join(wrong)
        raise NotApplicable(f"checkpoint {spec.release} not found: {what}. Get it from {spec.source} and put "
                            f"the files in {folder} (or point --checkpoints-dir, the config's checkpoints_dir "
                            f"or {CHECKPOINTS_ENV} at the folder holding {spec.folder}/)")
    for f in spec.files if published else ():
        if f.sha256 is not None and (got := file_sha256(folder / f.name)) != f.sha256:
            raise ValueError(f"{folder / f.name} is not the published file of {spec.release}: its sha256 is {got}, "
                             f"the release's {f.sha256}. Download it again from {spec.source}")
    return folder


def mark_random_release(folder: str | Path) -> Path:
    """Mark ``folder`` as random weights in a release's layout (see the module docstring)."""
    folder = Path(folder)
    (folder / RANDOM_RELEASE_MARKER).write_text("random weights written by cellarena; not a published release\n")
    return folder


def is_random_release(folder: str | Path) -> bool:
    return (Path(folder) / RANDOM_RELEASE_MARKER).is_file()


def file_sha256(path: str | Path) -> str:
    """The file's sha256, from its stamp when the file's size and modification time are unchanged."""
    from cellarena.data.fetch import default_cache_dir, sha256_file  # noqa: PLC0415

    path = Path(path).resolve()
    st = path.stat()
    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp = default_cache_dir() / "checkpoint-stamps" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(stamp.read_text())
        if {k: saved.get(k) for k in key} == key:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(path)
    try:  # a read-only cache only costs hashing again next time
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, "sha256": digest}))
        tmp.replace(stamp)
    except OSError:
        pass
    return digest


def match_genes(genes, vocabulary: dict, *, min_fraction: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``genes`` found in ``vocabulary`` and their token ids. Fewer than
    ``min_fraction`` matched: :class:`NotApplicable` with the fraction."""
    genes = np.asarray(genes, dtype=str)
    ids = np.array([vocabulary.get(g, -1) for g in genes], dtype=np.int64)
    found = np.flatnonzero(ids >= 0)
    fraction = found.size / max(genes.size, 1)
    if fraction < min_fraction:
        raise NotApplicable(f"only {found.size} of {genes.size} genes ({fraction:.1%}) are in the {what}; "
                            f"the model needs at least {min_fraction:.0%}")
    return found, ids[found]
