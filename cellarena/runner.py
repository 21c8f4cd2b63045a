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

    def rows(self, values: dict, directions: dict, status: str = "ok", reason: str = "",
             groups: dict | None = None) -> pd.DataFrame:
        cols = dict(self.columns, status=status, status_reason=reason,
                    created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    peak_rss_mb=peak_rss_mb())
        if status != "ok":
            values = {k: None for k in values}
        return make_rows(cols, values, directions, groups)


def check_embedding(emb, n_expected: int) -> np.ndarray:
    """The runner's output check for embeddings: (n_cells, d), numeric, finite."""
    arr = np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] != n_expected or arr.shape[1] < 1:
        raise ValueError(f"embed returned shape {arr.shape}, expected ({n_expected}, d) with d >= 1")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"embed returned dtype {arr.dtype}, expected a numeric array")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"embed returned {int((~np.isfinite(arr)).sum())} non-finite values (NaN or inf)")
    return arr


def metric_specs(task: str, options: dict) -> dict:
    """The metrics a task reports (the rows a failed run gets, too)."""
    if task == "annotation":
        from metrics.annotation import METRICS  # noqa: PLC0415
    elif task == "integration":
        from metrics.integration import METRICS  # noqa: PLC0415
    elif task == "zero_shot":
        from metrics.zero_shot import METRICS  # noqa: PLC0415
    else:
        raise ValueError(f"unknown task {task!r}")
    specs = dict(METRICS)
    if not options.get("include_kbet"):
        specs.pop("kbet", None)
    if task == "zero_shot" and not options.get("batch_role"):
        specs = {k: v for k, v in specs.items() if v.group != "batch"}
    return specs


def _annotation(model, adata, split, card):
    train = adata[split["train"]].copy()
    test = adata[split["test"]].copy()
    y_train = train.obs["cell_type"].astype(str).to_numpy()
    solution = test.obs["cell_type"].astype(str).to_numpy()
    test.obs = test.obs.drop(columns=["cell_type"])  # the model's view of the test cells has no labels
    model.fit(train, y_train)
    kwargs = {"solution": solution} if card.uses_solution else {}
    return check_labels(model.predict(test, **kwargs), test.n_obs), solution


def _embedding(model, adata, split, card, batch_role):
    cells = adata[split["test"]].copy()
    solution = cells.obs["cell_type"].astype(str).to_numpy()
    view_obs = pd.DataFrame(index=cells.obs_names)
    if batch_role:
        view_obs["batch"] = pd.Categorical(cells.obs[batch_role].astype(str))
    view = ad.AnnData(X=None, obs=view_obs, var=cells.var.copy(), layers={"counts": cells.layers["counts"]})
    kwargs = {"solution": solution} if card.uses_solution else {}
    return check_embedding(model.embed(view, **kwargs), view.n_obs), cells


def _score(task, output, options, seed, specs):
    if task == "annotation":
        pred, solution = output
        return {mid: spec.fn(solution, pred) for mid, spec in specs.items()}
    emb, cells = output
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    role = options.get("batch_role")
    batch = cells.obs[role].astype(str).to_numpy() if role else None
    if task == "integration":
        from cellarena.features import LogPCA  # noqa: PLC0415
        from metrics.integration import score_integration  # noqa: PLC0415

        unintegrated = LogPCA(50, 2000, seed).fit_transform(cells)
        values = score_integration(emb, labels, batch, X_unintegrated=unintegrated,
                                   include_kbet=bool(options.get("include_kbet")), seed=seed)
    else:
        from metrics.zero_shot import score_zero_shot  # noqa: PLC0415

        values = score_zero_shot(emb, labels, batch, seed=seed, include_kbet=bool(options.get("include_kbet")))
    return {mid: values.get(mid) for mid in specs if mid in values}


def run_task(task: str, prepared: str | Path, split_path: str | Path, model_dir: str | Path, *, seed: int,
             variant: str = "default", params: dict | None = None, threads: int = 1,
             options: dict | None = None) -> pd.DataFrame:
    """Run one model on one split of one dataset for ``task`` and return its long result rows.

    ``options``: ``batch_role`` (the obs role that is the batch, for integration and zero-shot) and
    ``include_kbet``.
    """
    options = dict(options or {})
    specs = metric_specs(task, options)
    directions = {mid: s.higher_is_better for mid, s in specs.items()}
    groups = {mid: s.group for mid, s in specs.items()}
    card = load_model_card(model_dir)
    run_params = {**card.params, **(params or {})}
    adata = ad.read_h5ad(prepared)
    info = provenance(adata)
    split = read_split(split_path)
    run = _Run(task, card, info, split, variant, run_params, seed)

    def status_rows(status: str, reason: str) -> pd.DataFrame:
        return run.rows({mid: None for mid in specs}, directions, status, reason, groups)

    role = options.get("batch_role")
    if task not in card.tasks:
        return status_rows("not_applicable", f"model {card.id} does not support {task}")
    if info.get("status") != "ok":
        return status_rows("failed", f"dataset preparation failed: {info.get('reason')}")
    if split.get("status") != "ok":
        return status_rows("failed", f"split failed: {split.get('reason')}")
    if "cell_type" not in adata.obs:
        return status_rows("not_applicable", "dataset has no cell-type labels")
    if split["n_test"] == 0 or (task == "annotation" and split["n_train"] == 0):
        return status_rows("not_applicable",
                           f"split has {split['n_train']} train and {split['n_test']} test cells")
    if task == "zero_shot" and card.kind in ("transformer", "adapter") and card.pretraining is None:
        return status_rows("not_applicable", "zero-shot needs the model's pretraining corpus declared")
    if role and role not in adata.obs:
        return status_rows("not_applicable", f"dataset has no {role!r} role to use as the batch")
    if task == "integration" and (not role or adata.obs[role].nunique() < 2):
        return status_rows("not_applicable", "integration needs a batch role with at least two batches")

    device = detect_device() if card.resources.gpu != "none" else "cpu"
    run.columns["device"] = device
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    try:
        with tempfile.TemporaryDirectory(prefix=f"cellarena-{card.id}-") as work, threadpool_limits(threads):
            seed_everything(seed)
            cls = load_plugin(model_dir)
            model = cls(run_params, RunContext(seed=seed, threads=threads, device=device, work_dir=Path(work)))
            t0 = time.perf_counter()
            if task == "annotation":
                output = _annotation(model, adata, split, card)
            else:
                output = _embedding(model, adata, split, card, role)
            run.columns["wall_s"] = time.perf_counter() - t0
    except NotApplicable as exc:
        return status_rows("not_applicable", str(exc) or "not applicable")
    except Exception as exc:  # a plug-in's failure is a result, not a crash
        log.error("model %s failed on %s/%s:\n%s", card.id, info["dataset_id"], split["split_id"],
                  traceback.format_exc())
        return status_rows("failed", _reason(exc))
    return run.rows(_score(task, output, options, seed, specs), directions, groups=groups)


def run_annotation(prepared, split_path, model_dir, **kwargs) -> pd.DataFrame:
    """Fit on the split's train cells, predict its test cells, score against the held-back labels."""
    return run_task("annotation", prepared, split_path, model_dir, **kwargs)
