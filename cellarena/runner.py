"""The runner: one (task, dataset, split, model, variant) in, a small table of long result rows out.

The runner owns everything that must be the same for every model: seeding, thread limits, device
choice, timing, peak memory, output checks and the run's status. A plug-in that raises yields
``failed`` rows carrying the exception text; a plug-in (or the runner) that finds the input unfit
yields ``not_applicable`` rows with the reason. Either way the job succeeds, so the rest of the DAG
finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from cellarena.cards import CONTROL
from cellarena.environment import environment_json
from cellarena.errors import DataError, NotApplicable
from cellarena.labels import UNASSIGNED
from cellarena.models import ModelCard, load_model_card, load_plugin
from cellarena.plugin import RunContext
from cellarena.prepare import provenance
from cellarena.results import make_rows
from cellarena.splits import read_split

log = logging.getLogger(__name__)
_REPO = Path(__file__).resolve().parent.parent
# where corpus cards are looked up (datasets/corpora/<id>.yaml); the workflow passes its datasets_dir
DATASETS_DIR_ENV = "CELLARENA_DATASETS_DIR"
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


def _status_of(exc: Exception, card, info, split) -> tuple[str, str]:
    """A plug-in's exception as a run status: ``not_applicable`` with the plug-in's reason, or
    ``failed`` with the exception text (the traceback goes to the job's log). Call inside ``except``."""
    if isinstance(exc, NotApplicable):
        return "not_applicable", str(exc) or "not applicable"
    log.error("model %s failed on %s/%s:\n%s", card.id, info["dataset_id"], split["split_id"],
              traceback.format_exc())
    return "failed", _reason(exc)


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
    """Bookkeeping shared by every task: the run's descriptive columns and the model's parameters."""

    def __init__(self, columns: dict, params: dict):
        self.columns = columns
        self.params = params

    @classmethod
    def new(cls, task: str, card: ModelCard, info: dict, split: dict, variant: str, params: dict,
            seed: int, checkpoint: str | Path | None = None, tuning: dict | None = None) -> _Run:
        leakage, leaked_fraction = leakage_status(card, info, checkpoint)
        return cls({
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
            "leakage": leakage,
            "leaked_fraction": leaked_fraction,
            "status": "ok",
            "status_reason": "",
            "params_json": json.dumps(params, sort_keys=True, default=str),
            "tuning_json": json.dumps(tuning or {}, sort_keys=True, default=str),
            "runtime_json": "{}",
            "n_train": int(split.get("n_train", 0)),
            "n_test": int(split.get("n_test", 0)),
            "suite_version": SUITE_VERSION,
            "git_commit": git_commit(),
            "created_utc": "",
            "wall_s": float("nan"),
            "peak_rss_mb": float("nan"),
            "device": "cpu",
            "environment_json": environment_json(),
        }, params)

    def rows(self, values: dict, specs: dict, status: str = "ok", reason: str = "",
             stamp: bool = True) -> pd.DataFrame:
        """Long rows of this run. ``stamp``: set the finish time and peak memory now (a job that only
        scores keeps the model job's)."""
        cols = dict(self.columns, status=status, status_reason=reason)
        if stamp:
            cols.update(created_utc=_now(), peak_rss_mb=peak_rss_mb())
        if status != "ok":
            values = {k: None for k in values}
        return make_rows(cols, values, {m: s.higher_is_better for m, s in specs.items()},
                         {m: s.group for m, s in specs.items()})

    def status_rows(self, specs: dict, status: str, reason: str, stamp: bool = True) -> pd.DataFrame:
        return self.rows({mid: None for mid in specs}, specs, status, reason, stamp)


def leakage_status(card: ModelCard, info: dict, checkpoint: str | Path | None = None,
                   datasets_dir: str | Path | None = None) -> tuple[str, float]:
    """(leakage, leaked_fraction) of a model on a prepared dataset.

    - a model without a pretraining corpus: ``no_corpus``;
    - an in-suite model with its checkpoint: the cell-level exclusion the pretraining job recorded
      for this dataset (``clean`` when no evaluation cell was left in the corpus, with the fraction);
    - otherwise the dataset-level check of the dataset's identifiers against the corpus card
      (:func:`cellarena.corpora.dataset_leakage`); ``unknown`` when the corpus card is missing.
      Corpus cards are read from ``datasets_dir``, else ``$CELLARENA_DATASETS_DIR``, else datasets/.
    """
    if card.pretraining is None:
        return "no_corpus", float("nan")
    if checkpoint:
        from cellarena.transformer.checkpoint import CheckpointError, read_card  # noqa: PLC0415

        try:
            exclusion = read_card(checkpoint).get("extra", {}).get("exclusion", {})
        except (CheckpointError, OSError):
            exclusion = {}
        after = exclusion.get("datasets", {}).get(info.get("dataset_id"), {}).get("after")
        if after and after.get("n_cells"):
            fraction = after["n_found"] / after["n_cells"]
            return ("clean" if after["n_found"] == 0 else "leaked"), float(fraction)
    from cellarena.cards import DatasetCard  # noqa: PLC0415
    from cellarena.corpora import corpus_path, dataset_leakage, load_corpus  # noqa: PLC0415
    from cellarena.errors import CardError  # noqa: PLC0415

    try:
        dataset = DatasetCard.model_validate(json.loads(info["card"]))
        corpus = load_corpus(corpus_path(datasets_dir or os.environ.get(DATASETS_DIR_ENV, _REPO / "datasets"),
                                         card.pretraining.corpus))
    except (KeyError, ValueError, CardError):
        return "unknown", float("nan")
    return dataset_leakage(dataset, corpus)[0], float("nan")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _finite_numbers(arr: np.ndarray, who: str, dtype) -> np.ndarray:
    """``arr`` as ``dtype`` if it holds numbers, none of them NaN or inf; else a ValueError naming ``who``."""
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{who} returned dtype {arr.dtype}, expected a numeric array")
    arr = arr.astype(dtype)
    if not np.isfinite(arr).all():
        raise ValueError(f"{who} returned {int((~np.isfinite(arr)).sum())} non-finite values (NaN or inf)")
    return arr


def check_embedding(emb, n_expected: int) -> np.ndarray:
    """The runner's output check for embeddings: (n_cells, d), numeric, finite."""
    arr = np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] != n_expected or arr.shape[1] < 1:
        raise ValueError(f"embed returned shape {arr.shape}, expected ({n_expected}, d) with d >= 1")
    return _finite_numbers(arr, "embed", np.float32)


def metric_specs(task: str, options: dict) -> dict:
    """The metrics a task reports (the rows a failed run gets, too)."""
    if task == "annotation":
        from metrics.annotation import METRICS  # noqa: PLC0415
    elif task == "integration":
        from metrics.integration import METRICS  # noqa: PLC0415
    elif task == "zero_shot":
        from metrics.zero_shot import METRICS  # noqa: PLC0415
    elif task == "perturbation":
        from metrics.perturbation import metric_specs as _perturbation_specs  # noqa: PLC0415

        return _perturbation_specs(int(options.get("top_de", 20)))
    else:
        raise ValueError(f"unknown task {task!r}")
    specs = dict(METRICS)
    if not options.get("include_kbet"):
        specs.pop("kbet", None)
    if task == "zero_shot" and not options.get("batch_role"):
        specs = {k: v for k, v in specs.items() if v.group != "batch"}
    return specs


def annotate(model, adata, split, card):
    """Fit ``model`` on the split's training cells, predict its test cells (labels removed); returns
    (checked predictions, true test labels, number of cells fit on)."""
    train = adata[split["train"]]
    test = adata[split["test"]]
    train = train[_assigned(train.obs["cell_type"])].copy()
    test = test[_assigned(test.obs["cell_type"])].copy()
    y_train = train.obs["cell_type"].astype(str).to_numpy()
    solution = test.obs["cell_type"].astype(str).to_numpy()
    test.obs = test.obs.drop(columns=["cell_type"])  # the model's view of the test cells has no labels
    model.fit(train, y_train)
    kwargs = {"solution": solution} if card.uses_solution else {}
    pred = check_labels(model.predict(test, **kwargs), test.n_obs)
    known = set(y_train) | (set(solution) if card.uses_solution else set())
    unknown = sorted(set(pred) - known)
    if unknown:
        raise ValueError(f"predict returned labels that fit() never received, e.g. {unknown[:3]}: return the "
                         "label strings passed to fit (not class indices)")
    return pred, solution, train.n_obs


def _assigned(labels) -> np.ndarray:
    """Cells whose (silver) label is a real cell type; ``unassigned`` cells are never scored."""
    return labels.astype(str).to_numpy() != UNASSIGNED


def run_task(task: str, prepared: str | Path, split_path: str | Path, model_dir: str | Path, *, seed: int,
             variant: str = "default", params: dict | None = None, threads: int = 1,
             options: dict | None = None, checkpoint: str | Path | None = None,
             tuning: dict | None = None) -> pd.DataFrame:
    """Run one model on one split of one dataset for ``task`` and return its long result rows.

    ``options``: ``batch_role`` (the obs role that is the batch, for integration and zero-shot) and
    ``include_kbet``. The embedding tasks go through :func:`embed_cells` and
    :func:`score_embeddings`, the two halves the workflow runs as separate jobs. ``tuning``: a
    record of :func:`cellarena.tuning.tune`; the run becomes the ``tuned`` variant with its best
    parameters (and gets the tuning's status when tuning did not succeed).
    """
    options = dict(options or {})
    if task == "perturbation":
        if tuning is not None:
            raise ValueError("perturbation models are not tuned (yet): run them without a tuning record")
        return run_perturbation(prepared, split_path, model_dir, seed=seed, variant=variant, params=params,
                                threads=threads, options=options, checkpoint=checkpoint)
    if task in EMBEDDING_TASKS:
        run = embed_cells(prepared, split_path, model_dir, seed=seed, variant=variant, params=params,
                          threads=threads, batch_role=options.get("batch_role"), checkpoint=checkpoint,
                          tuning=tuning)
        return score_embeddings(task, prepared, split_path, [run], seed=seed, options=options)
    if task != "annotation":
        raise ValueError(f"unknown task {task!r}")
    specs = metric_specs(task, options)
    card, adata, info, split, run = _start(task, prepared, split_path, model_dir, variant, params, seed,
                                           checkpoint, tuning)
    reason = _precheck(card, info, split, adata) or _tuning_reason(tuning)
    if reason is None and task not in card.tasks:
        reason = ("not_applicable", f"model {card.id} does not support {task}")
    if reason is None and split["n_train"] == 0:
        reason = ("not_applicable", f"split has {split['n_train']} train and {split['n_test']} test cells")
    if reason is not None:
        return run.status_rows(specs, *reason)
    try:
        with plugin_instance(card, model_dir, run, seed, threads, checkpoint) as model:
            t0 = time.perf_counter()
            pred, solution, n_fit = annotate(model, adata, split, card)
            run.columns["wall_s"] = time.perf_counter() - t0
    except Exception as exc:  # a plug-in's failure is a result, not a crash
        return run.status_rows(specs, *_status_of(exc, card, info, split))
    run.columns.update(n_train=int(n_fit), n_test=int(solution.size))
    return run.rows({mid: spec.fn(solution, pred) for mid, spec in specs.items()}, specs)


def _start(task, prepared, split_path, model_dir, variant, params, seed, checkpoint=None, tuning=None):
    """Load what every run starts from: the model card, the prepared data and its provenance, the
    split, and the run's descriptive columns (card defaults overridden by ``params``, then by the
    best parameters of a ``tuning`` record, which makes the run the ``tuned`` variant)."""
    card = load_model_card(model_dir)
    adata = ad.read_h5ad(prepared)
    info = provenance(adata)
    split = read_split(split_path)
    params, summary = {**card.params, **(params or {})}, None
    if tuning is not None:
        from cellarena.tuning import summary_of  # noqa: PLC0415

        _check_tuning(tuning, card, info, split)
        variant = "tuned"
        params.update(tuning.get("best_params") or {})
        summary = summary_of(tuning)
    return card, adata, info, split, _Run.new(task, card, info, split, variant, params, seed, checkpoint, summary)


def _check_tuning(record: dict, card, info, split) -> None:
    """A tuning record must have been made for this model version, dataset version and split."""
    made = (record.get("model_id"), record.get("model_version"), record.get("dataset_id"),
            record.get("dataset_version"), record.get("split_id"), record.get("split_hash"))
    want = (card.id, card.version, info["dataset_id"], int(info["dataset_version"]), split["split_id"],
            split.get("hash", ""))
    if made != want:
        raise DataError(f"the tuning record was made for {made}, this run is {want}",
                        fix="re-run `cellarena tune` for this model, dataset and split")


def _reason_error(status: str, reason: str) -> Exception:
    """A (status, reason) of a run that cannot start, as the exception ``raise_errors`` raises."""
    return NotApplicable(reason) if status == "not_applicable" else DataError(reason)


def _tuning_reason(tuning: dict | None) -> tuple[str, str] | None:
    """A tuned run whose tuning did not succeed gets the tuning's status and reason."""
    if tuning is None or tuning.get("status") == "ok":
        return None
    return tuning.get("status", "failed"), f"tuning {tuning.get('status')}: {tuning.get('reason', '')}"


def _precheck(card, info, split, adata, role: str = "cell_type") -> tuple[str, str] | None:
    """Why a run cannot start, as (status, reason); None when it can. ``role``: the obs role the
    task's labels live in."""
    if info.get("status") != "ok":
        return "failed", f"dataset preparation failed: {info.get('reason')}"
    if split.get("status") != "ok":
        return "failed", f"split failed: {split.get('reason')}"
    if role not in adata.obs:
        return "not_applicable", f"dataset has no {role.replace('_', '-')} labels"
    if split["n_test"] == 0:
        return "not_applicable", f"split has {split['n_train']} train and {split['n_test']} test cells"
    organism = info.get("organism")
    if card.organisms and organism and organism not in card.organisms:
        return "not_applicable", (f"model {card.id} was trained on {', '.join(card.organisms)}; this dataset is "
                                  f"{organism}")
    return None


@contextlib.contextmanager
def plugin_instance(card, model_dir, run, seed, threads, checkpoint):
    """The plug-in, constructed inside the run's seed, thread limit and scratch folder."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    device = detect_device() if card.resources.gpu != "none" else "cpu"
    run.columns["device"] = device
    if card.resources.gpu == "required" and device == "cpu":
        raise NotApplicable(f"model {card.id} needs a GPU (resources.gpu: required) and this machine has none")
    with tempfile.TemporaryDirectory(prefix=f"cellarena-{card.id}-") as work, threadpool_limits(threads):
        seed_everything(seed)
        cls = load_plugin(model_dir)
        # the row records the GPU's name; the plug-in gets a device torch accepts
        ctx = RunContext(seed=seed, threads=threads, device="cuda" if device.startswith("cuda") else "cpu",
                         work_dir=Path(work), checkpoint=Path(checkpoint) if checkpoint else None)
        yield cls(run.params, ctx)
        run.columns["runtime_json"] = json.dumps(ctx.runtime, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------------
# embedding tasks: one job per model writes an embedding, one job per (task, dataset) scores them all
# --------------------------------------------------------------------------------------------------

EMBEDDING_TASKS = ("integration", "zero_shot")


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


def embed_cells(prepared: str | Path, split_path: str | Path, model_dir: str | Path, *, seed: int,
                variant: str = "default", params: dict | None = None, threads: int = 1,
                batch_role: str | None = None, checkpoint: str | Path | None = None,
                tuning: dict | None = None, raise_errors: bool = False) -> EmbeddingRun:
    """Have the model embed every test cell of the split.

    The model's view holds the counts and, when ``batch_role`` is given, ``obs["batch"]``; never the
    labels (except for a control whose card sets ``uses_solution``). Failures and unfit inputs are
    recorded in the returned run's status, never raised (``raise_errors``, for ``cellarena validate``:
    the plug-in's exception is raised instead).
    """
    card, adata, info, split, run = _start("", prepared, split_path, model_dir, variant, params, seed, checkpoint,
                                           tuning)
    out = EmbeddingRun(columns=run.columns, tasks=list(card.tasks), kind=card.kind,
                       has_corpus=card.pretraining is not None)

    def finish(status, reason):
        run.columns.update(status=status, status_reason=reason, created_utc=_now(), peak_rss_mb=peak_rss_mb())
        return out

    reason = _precheck(card, info, split, adata) or _tuning_reason(tuning)
    if reason is None and not set(card.tasks) & set(EMBEDDING_TASKS):
        reason = ("not_applicable", f"model {card.id} does not embed cells (tasks: {card.tasks})")
    if reason is None and batch_role and batch_role not in adata.obs:
        reason = ("not_applicable", f"dataset has no {batch_role!r} role to use as the batch")
    if reason is not None:
        if raise_errors:
            raise _reason_error(*reason)
        return finish(*reason)
    cells = adata[split["test"]]
    solution = cells.obs["cell_type"].astype(str).to_numpy()
    view = embedding_view(cells, batch_role)
    kwargs = {"solution": solution} if card.uses_solution else {}
    try:
        with plugin_instance(card, model_dir, run, seed, threads, checkpoint) as model:
            t0 = time.perf_counter()
            emb = check_embedding(model.embed(view, **kwargs), view.n_obs)
            run.columns["wall_s"] = time.perf_counter() - t0
    except Exception as exc:  # a plug-in's failure is a result, not a crash
        if raise_errors:
            raise
        return finish(*_status_of(exc, card, info, split))
    out.embedding = emb
    out.obs_names = np.asarray(view.obs_names, dtype=str)
    return finish("ok", "")


def embedding_view(cells: ad.AnnData, batch_role: str | None) -> ad.AnnData:
    """What an embedding model sees of ``cells``: the counts and, with ``batch_role``, that role as
    ``obs["batch"]``; never a label."""
    obs = pd.DataFrame(index=cells.obs_names.copy())
    if batch_role:
        obs["batch"] = pd.Categorical(cells.obs[batch_role].astype(str))
    return ad.AnnData(X=None, obs=obs, var=cells.var.copy(), layers={"counts": cells.layers["counts"]})


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
    from cellarena.results import DEFAULTS  # noqa: PLC0415

    columns = {**DEFAULTS, **meta["columns"]}  # a file written before a column existed gets its default
    return EmbeddingRun(columns=columns, tasks=meta["tasks"], kind=meta["kind"],
                        has_corpus=meta["has_corpus"], embedding=emb if ok else None,
                        obs_names=names if ok else None)


def score_embeddings(task: str, prepared: str | Path, split_path: str | Path, runs: list[EmbeddingRun], *,
                     seed: int, options: dict | None = None) -> pd.DataFrame:
    """Score every model's embedding of one (dataset, split) for ``task`` in one process.

    The expensive shared parts (reading the data, the unintegrated PCA, JAX compilation) are paid
    once per dataset instead of once per model. Cells labelled ``unassigned`` are left out of every
    metric. A run that failed upstream, or whose scoring raises, gets status rows; the others are
    unaffected.
    """
    if task not in EMBEDDING_TASKS:
        raise ValueError(f"{task!r} is not an embedding task; choose one of {EMBEDDING_TASKS}")
    options = dict(options or {})
    specs = metric_specs(task, options)
    role = options.get("batch_role")
    adata = ad.read_h5ad(prepared)
    info = provenance(adata)
    split = read_split(split_path)
    cells = labels = batch = unintegrated = None
    if info.get("status") == "ok" and split.get("status") == "ok" and "cell_type" in adata.obs:
        cells = adata[split["test"]]
        keep = _assigned(cells.obs["cell_type"])
        cells = cells[keep].copy()
        labels = cells.obs["cell_type"].astype(str).to_numpy()
        batch = cells.obs[role].astype(str).to_numpy() if role and role in cells.obs else None
    frames = []
    for emb_run in runs:
        run = _Run(dict(emb_run.columns, task=task), json.loads(emb_run.columns["params_json"]))
        reason = _task_reason(task, emb_run, role, batch, cells is not None)
        if reason is not None:
            frames.append(run.status_rows(specs, *reason, stamp=False))
            continue
        try:
            emb = _aligned(emb_run, cells)
            if task == "integration" and unintegrated is None:
                from cellarena.features import LogPCA  # noqa: PLC0415

                unintegrated = LogPCA(50, 2000, seed).fit_transform(cells)
            values = _embedding_metrics(task, emb, labels, batch, unintegrated, options, seed)
        except Exception as exc:  # one model's scoring failure stays its own
            log.error("scoring %s failed:\n%s", emb_run.columns["model_id"], traceback.format_exc())
            frames.append(run.status_rows(specs, "failed", f"scoring failed: {_reason(exc)}", stamp=False))
            continue
        run.columns["n_test"] = int(labels.size)
        frames.append(run.rows({mid: values.get(mid) for mid in specs if mid in values}, specs, stamp=False))
    if not frames:
        from cellarena.results import COLUMNS  # noqa: PLC0415

        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True)


def _task_reason(task, emb_run, role, batch, data_ok) -> tuple[str, str] | None:
    """Why ``emb_run`` gets no scores for ``task``, as (status, reason); None when it is scored."""
    cols = emb_run.columns
    if task not in emb_run.tasks:
        return "not_applicable", f"model {cols['model_id']} does not support {task}"
    if task == "zero_shot" and emb_run.kind in ("transformer", "adapter") and not emb_run.has_corpus:
        return "not_applicable", "zero-shot needs the model's pretraining corpus declared"
    if data_ok and task == "integration" and (batch is None or np.unique(batch).size < 2):
        what = f"the {role!r} role" if role else "no batch role"
        return "not_applicable", f"integration needs a batch with at least two values; this plan gives {what}"
    if emb_run.status != "ok":
        return emb_run.status, cols["status_reason"]
    return None


def _aligned(emb_run: EmbeddingRun, cells: ad.AnnData) -> np.ndarray:
    """The embedding rows of the scored cells, matched by cell ID."""
    index = pd.Index(emb_run.obs_names)
    pos = index.get_indexer(cells.obs_names)
    if (pos < 0).any():
        raise DataError(f"{int((pos < 0).sum())} scored cells are missing from the embedding file",
                        fix="re-run the model's embedding job on this prepared dataset")
    return emb_run.embedding[pos]


def _embedding_metrics(task, emb, labels, batch, unintegrated, options, seed) -> dict:
    kbet = bool(options.get("include_kbet"))
    if task == "integration":
        from metrics.integration import score_integration  # noqa: PLC0415

        return score_integration(emb, labels, batch, X_unintegrated=unintegrated, include_kbet=kbet, seed=seed)
    from metrics.zero_shot import score_zero_shot  # noqa: PLC0415

    return score_zero_shot(emb, labels, batch, seed=seed, include_kbet=kbet)


def run_annotation(prepared, split_path, model_dir, **kwargs) -> pd.DataFrame:
    """Fit on the split's train cells, predict its test cells, score against the held-back labels."""
    return run_task("annotation", prepared, split_path, model_dir, **kwargs)


# --------------------------------------------------------------------------------------------------
# perturbation response: one job per (dataset, split, model); a split may hold several folds
# --------------------------------------------------------------------------------------------------

def check_profiles(pred, n_queries: int, n_genes: int) -> np.ndarray:
    """The runner's output check for perturbation predictions: (n_queries, n_genes), finite."""
    arr = np.asarray(pred)
    if arr.ndim != 2 or arr.shape != (n_queries, n_genes):
        raise ValueError(f"predict_perturbation returned shape {arr.shape}, expected ({n_queries}, {n_genes}): "
                         "one profile over the panel genes per query")
    return _finite_numbers(arr, "predict_perturbation", np.float64)


def _dense_lognorm(panel) -> np.ndarray:
    return np.asarray(panel.X.toarray(), dtype=np.float64)


def _fold_truth(adata, fold, ctx_all, spec_top_de, train_view):
    """Per query of ``fold``: observed profile, control, reference, top DE genes, and the true cells."""
    from cellarena.perturbation import TrainingProfiles  # noqa: PLC0415
    from metrics.perturbation import top_de_genes  # noqa: PLC0415

    profiles = TrainingProfiles(train_view)
    pert = adata.obs["perturbation"].astype(str).to_numpy()
    test = adata.obs_names.isin(fold["test"])
    train_ctrl = adata.obs_names.isin(fold["train"]) & (pert == CONTROL)
    controls = {c: _dense_lognorm(adata[train_ctrl & (ctx_all == c)])  # once per context, not per query
                for c in sorted({q["context"] for q in fold["queries"]})}
    out = []
    for q in fold["queries"]:
        cells = test & (pert == q["perturbation"]) & (ctx_all == q["context"])
        x = _dense_lognorm(adata[cells])
        ctrl_x = controls[q["context"]]
        # the control profile is the one models get from the same training view, bit for bit, so a
        # no-change prediction has exactly zero change
        out.append({"truth": x.mean(axis=0), "ctrl": profiles.control(q["context"]), "cells": x,
                    "ref": profiles.reference(q["context"]), "de": top_de_genes(x, ctrl_x, spec_top_de),
                    "category": q["category"]})
    return out


def run_perturbation(prepared: str | Path, split_path: str | Path, model_dir: str | Path, *, seed: int,
                     variant: str = "default", params: dict | None = None, threads: int = 1,
                     options: dict | None = None, checkpoint: str | Path | None = None,
                     raise_errors: bool = False) -> pd.DataFrame:
    """Fit on each fold's training cells, predict its queries' profiles, score against the held-out cells.

    ``options``: ``n_genes`` (panel size, default 2000) and ``top_de`` (N of the top-N DE metrics,
    default 20). Metrics are averaged over queries (subgroup '') and over the queries of each
    category (subgroup = category: the held-out cell type, or single_unseen / double_seenK).
    ``raise_errors`` (for ``cellarena validate``): raise the plug-in's exception instead of recording it.
    """
    from cellarena.perturbation import PerturbationSplitSpec, contexts, model_view, panel_data  # noqa: PLC0415
    from metrics.perturbation import score_queries  # noqa: PLC0415

    options = dict(options or {})
    specs = metric_specs("perturbation", options)
    card, adata, info, split, run = _start("perturbation", prepared, split_path, model_dir, variant, params, seed,
                                           checkpoint)
    reason = _precheck(card, info, split, adata, role="perturbation")
    if reason is None and "perturbation" not in card.tasks:
        reason = ("not_applicable", f"model {card.id} does not support perturbation")
    if reason is not None:
        if raise_errors:
            raise _reason_error(*reason)
        return run.status_rows(specs, *reason)
    spec = PerturbationSplitSpec.model_validate(split["scheme"])
    adata = panel_data(adata, int(options.get("n_genes", 2000)))
    ctx_all = contexts(adata.obs, spec)
    queries, wall, summed = [], 0.0, {}
    try:
        for fold in split["folds"]:
            is_train = adata.obs_names.isin(fold["train"])
            train = model_view(adata[is_train], ctx_all[is_train])
            truth = _fold_truth(adata, fold, ctx_all, int(options.get("top_de", 20)), train)
            asked = pd.DataFrame([{"context": q["context"], "perturbation": q["perturbation"]}
                                  for q in fold["queries"]])
            kwargs = {"solution": [t["cells"] for t in truth]} if card.uses_solution else {}
            with plugin_instance(card, model_dir, run, seed, threads, checkpoint) as model:
                t0 = time.perf_counter()
                model.fit_perturbation(train)
                pred = check_profiles(model.predict_perturbation(asked, **kwargs), len(asked), adata.n_vars)
                wall += time.perf_counter() - t0
            runtime = json.loads(run.columns["runtime_json"])  # this fold's; counters add up over folds
            for key in ("finetune_s", "finetune_steps"):
                if key in runtime:
                    summed[key] = summed.get(key, 0) + runtime[key]
            run.columns["runtime_json"] = json.dumps({**runtime, **summed, "folds": len(split["folds"])},
                                                     sort_keys=True, default=str)
            for t, p in zip(truth, pred):
                t.pop("cells")
                queries.append(dict(t, pred=p))
    except Exception as exc:  # a plug-in's failure is a result, not a crash
        if raise_errors:
            raise
        return run.status_rows(specs, *_status_of(exc, card, info, split))
    per_query = score_queries(queries, specs)
    categories = np.array([q["category"] for q in queries])
    values = {}
    for mid, arr in per_query.items():
        finite = np.isfinite(arr)
        entry = {"": float(arr[finite].mean()) if finite.any() else None}
        for c in sorted(set(categories)):
            sel = finite & (categories == c)
            if sel.any():
                entry[c] = float(arr[sel].mean())
        values[mid] = entry
    run.columns.update(wall_s=wall, n_train=int(split["n_train"]), n_test=int(split["n_test"]))
    if any(v[""] is None for v in values.values()):
        missing = [m for m, v in values.items() if v[""] is None]
        log.warning("metrics %s undefined on this split (e.g. centroid accuracy with one query)", missing)
    return run.rows({m: v for m, v in values.items() if v[""] is not None}, specs)
