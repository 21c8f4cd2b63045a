"""The embedding file (``.npz``) that an embed job writes and a scoring job reads: the array, the
cell IDs, and the run's descriptive columns as JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from cellarena.errors import DataError
from cellarena.results import DEFAULTS


@dataclasses.dataclass
class EmbeddingRun:
    """One model's embedding of a split's test cells, or the reason there is none."""

    columns: dict  # the run's descriptive result columns (task excepted)
    tasks: list  # the tasks the model's card declares
    kind: str
    has_corpus: bool
    embedding: np.ndarray | None = None
    obs_names: np.ndarray | None = None

    @property
    def status(self) -> str:
        return self.columns["status"]


def write_embedding(run: EmbeddingRun, path: str | Path) -> Path:
    """Store an embedding run as ``.npz`` (the array, the cell IDs, and the run as JSON), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"columns": run.columns, "tasks": run.tasks, "kind": run.kind, "has_corpus": run.has_corpus}
    emb = run.embedding if run.embedding is not None else np.zeros((0, 0), dtype=np.float32)
    names = run.obs_names if run.obs_names is not None else np.zeros(0, dtype=str)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, embedding=emb, obs_names=names, meta=np.array(json.dumps(meta, default=str)))
    tmp.replace(path)
    return path


def read_embedding(path: str | Path) -> EmbeddingRun:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            emb, names = z["embedding"], z["obs_names"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"cannot read embedding file: {exc}", where=path,
                        fix="delete it and re-run the workflow to re-create it") from None
    ok = meta["columns"]["status"] == "ok"
    columns = {**DEFAULTS, **meta["columns"]}  # a file written before a column existed gets its default
    return EmbeddingRun(columns=columns, tasks=meta["tasks"], kind=meta["kind"],
                        has_corpus=meta["has_corpus"], embedding=emb if ok else None,
                        obs_names=names if ok else None)
