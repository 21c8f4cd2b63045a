"""The runner: one (task, dataset, split, model, variant) in, a small table of long result rows out.

The runner owns everything that must be the same for every model: seeding, thread limits, device
choice, timing, peak memory, output checks and the run's status. A plug-in that raises yields
``failed`` rows carrying the exception text; a plug-in (or the runner) that finds the input unfit
yields ``not_applicable`` rows with the reason. Either way the job succeeds, so the rest of the DAG
finishes.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import random
import resource
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellarena import SUITE_VERSION
from cellarena.errors import NotApplicable
from cellarena.models import ModelCard, load_model_card, load_plugin
from cellarena.plugin import RunContext
from cellarena.prepare import provenance
from cellarena.results import make_rows
from cellarena.splits import read_split

log = logging.getLogger(__name__)
_REPO = Path(__file__).resolve().parent.parent
MAX_REASON = 2000


def git_commit(repo: Path = _REPO) -> str:
    """Commit of the suite's checkout, with '-dirty' when tracked files differ; 'unknown' outside git."""
    env_commit = os.environ.get("CELLARENA_GIT_COMMIT")
    if env_commit:
        return env_commit
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def detect_device() -> str:
    try:
        import torch  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # for libraries that still read the global state
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def check_labels(pred, n_expected: int) -> np.ndarray:
    """The runner's output check for annotation predictions."""
    arr = np.asarray(pred)
    if arr.ndim != 1 or arr.shape[0] != n_expected:
        raise ValueError(f"predict returned shape {arr.shape}, expected ({n_expected},): one label per test cell")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError("predict returned NaN labels")
    if any(v is None for v in arr.tolist()):
        raise ValueError("predict returned None labels")
    return arr.astype(str)


class _Run:
    """Bookkeeping shared by every task: the run's descriptive columns."""

    def __init__(self, task: str, card: ModelCard, info: dict, split: dict, variant: str, params: dict,
                 seed: int):
        self.task = task
        self.columns = {
            "task": task,
            "dataset_id": info["dataset_id"],
            "dataset_version": int(info["dataset_version"]),
            "label_quality": info.get("label_quality", "none"),
            "split_id": split["split_id"],
            "split_hash": split.get("hash", ""),
            "seed": int(seed),
            "model_id": card.id,
            "model_version": card.version,
            "model_kind": card.kind,
            "variant": variant,
            "status": "ok",
            "status_reason": "",
            "params_json": json.dumps(params, sort_keys=True, default=str),
            "n_train": int(split.get("n_train", 0)),
            "n_test": int(split.get("n_test", 0)),
            "suite_version": SUITE_VERSION,
            "git_commit": git_commit(),
            "created_utc": "",
            "wall_s": float("nan"),
            "peak_rss_mb": float("nan"),
            "device": "cpu",
        }

    def rows(self, values: dict, directions: dict, status: str = "ok", reason: str = "") -> pd.DataFrame:
        cols = dict(self.columns, status=status, status_reason=reason,
                    created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    peak_rss_mb=peak_rss_mb())
        if status != "ok":
            values = {k: None for k in values}
        return make_rows(cols, values, directions)


def _annotation_metric_specs():
    from metrics.annotation import METRICS  # noqa: PLC0415

    return METRICS


def run_annotation(prepared: str | Path, split_path: str | Path, model_dir: str | Path, *, seed: int,
                   variant: str = "default", params: dict | None = None, threads: int = 1) -> pd.DataFrame:
    """Fit on the split's train cells, predict its test cells, score against the held-back labels."""
    specs = _annotation_metric_specs()
    directions = {mid: s.higher_is_better for mid, s in specs.items()}
    empty = {mid: None for mid in specs}
    card = load_model_card(model_dir)
    run_params = {**card.params, **(params or {})}
    adata = ad.read_h5ad(prepared)
    info = provenance(adata)
    split = read_split(split_path)
    run = _Run("annotation", card, info, split, variant, run_params, seed)

    if "annotation" not in card.tasks:
        return run.rows(empty, directions, "not_applicable", f"model {card.id} does not support annotation")
    if info.get("status") != "ok":
        return run.rows(empty, directions, "failed", f"dataset preparation failed: {info.get('reason')}")
    if split.get("status") != "ok":
        return run.rows(empty, directions, "failed", f"split failed: {split.get('reason')}")
    if "cell_type" not in adata.obs:
        return run.rows(empty, directions, "not_applicable", "dataset has no cell-type labels")
    if split["n_test"] == 0 or split["n_train"] == 0:
        return run.rows(empty, directions, "not_applicable",
                        f"split has {split['n_train']} train and {split['n_test']} test cells")

    train = adata[split["train"]].copy()
    test = adata[split["test"]].copy()
    y_train = train.obs["cell_type"].astype(str).to_numpy()
    solution = test.obs["cell_type"].astype(str).to_numpy()
    test.obs = test.obs.drop(columns=["cell_type"])  # the model's view of the test cells has no labels

    device = detect_device() if card.resources.gpu != "none" else "cpu"
    run.columns["device"] = device
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    try:
        with tempfile.TemporaryDirectory(prefix=f"cellarena-{card.id}-") as work, threadpool_limits(threads):
            seed_everything(seed)
            cls = load_plugin(model_dir)
            model = cls(run_params, RunContext(seed=seed, threads=threads, device=device, work_dir=Path(work)))
            t0 = time.perf_counter()
            model.fit(train, y_train)
            kwargs = {"solution": solution} if card.uses_solution else {}
            pred = model.predict(test, **kwargs)
            run.columns["wall_s"] = time.perf_counter() - t0
            pred = check_labels(pred, test.n_obs)
    except NotApplicable as exc:
        return run.rows(empty, directions, "not_applicable", str(exc) or "not applicable")
    except Exception as exc:  # a plug-in's failure is a result, not a crash
        log.error("model %s failed on %s/%s:\n%s", card.id, info["dataset_id"], split["split_id"],
                  traceback.format_exc())
        return run.rows(empty, directions, "failed", _reason(exc))

    values = {mid: spec.fn(solution, pred) for mid, spec in specs.items()}
    return run.rows(values, directions)
