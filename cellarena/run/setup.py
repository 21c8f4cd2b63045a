"""What every run shares, whatever its task: the job it was asked to do, the run's descriptive
columns and provenance, seeding, thread limits, the device, timing, peak memory, and the plug-in
constructed inside all of these.

A task driver (``cellarena/run/annotation.py``, ``embedding.py``, ``perturbation.py``) calls
:func:`start`, asks :func:`precheck` whether the run can go ahead, opens the run's :func:`sandbox`
(a child process with a time limit that never sees the prepared file: cellarena/run/sandbox.py)
and makes the plug-in there with :func:`plugin_instance`. A plug-in that raises, exits or runs out
of time yields ``failed`` rows carrying what happened (:func:`status_of`); a plug-in or a check that
finds the input unfit yields ``not_applicable`` rows with the reason. Either way the job succeeds,
so the rest of the workflow finishes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import logging
import os
import resource
import subprocess
import traceback
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellarena import REPO, SUITE_VERSION
from cellarena.cards.model import ModelCard, load_model_card
from cellarena.data.labels import UNASSIGNED
from cellarena.data.leakage import leakage_status
from cellarena.data.prepare import provenance
from cellarena.data.splits import read_split
from cellarena.errors import DataError, NotApplicable
from cellarena.results import make_rows
from cellarena.run.environment import environment_json
from cellarena.run.sandbox import (DEFAULT_TIME_LIMIT_S, Host, Sandbox, answers_on_disk, plugin_imports,
                                   readable_of)
from cellarena.run.tuning_record import check_record, summary_of
from cellarena.timing import CLOCK

log = logging.getLogger(__name__)
MAX_REASON = 2000


@dataclasses.dataclass(frozen=True)
class Job:
    """One model on one split of one dataset: everything a driver needs, passed as arguments.

    ``options``: the task's options (``batch_role``, ``include_kbet``, ``n_genes``, ``top_de``).
    ``checkpoint``: pretrained weights the workflow made for an in-suite model. ``tuning``: a tuning
    record (cellarena/run/tuning.py); the run becomes the ``tuned`` variant with its best parameters.
    ``datasets_dir``: where corpus cards are read for the leakage columns. ``checkpoints_dir``: where
    adapters find published releases (None: ``$CELLARENA_CHECKPOINTS`` or the data cache).
    ``device``: ``cpu`` or ``cuda``, for models whose card allows a GPU (never chosen implicitly).
    ``time_limit_s``: the plug-in's time limit, unless its card sets ``resources.time_limit_s``.
    """

    prepared: Path
    split: Path
    model_dir: Path
    seed: int
    variant: str = "default"
    params: dict | None = None
    threads: int = 1
    options: dict = dataclasses.field(default_factory=dict)
    checkpoint: Path | None = None
    tuning: dict | None = None
    datasets_dir: Path = REPO / "datasets"
    checkpoints_dir: Path | None = None
    device: str = "cpu"
    time_limit_s: float = DEFAULT_TIME_LIMIT_S

    @classmethod
    def of(cls, prepared, split, model_dir, *, seed: int, datasets_dir=None, checkpoint=None,
           checkpoints_dir=None, options=None, **rest) -> Job:
        """A job from paths given as strings or Paths (None keeps the default)."""
        return cls(Path(prepared), Path(split), Path(model_dir), int(seed),
                   options=dict(options or {}), checkpoint=Path(checkpoint) if checkpoint else None,
                   datasets_dir=Path(datasets_dir) if datasets_dir else REPO / "datasets",
                   checkpoints_dir=Path(checkpoints_dir) if checkpoints_dir else None, **rest)


def git_commit(repo: Path = REPO) -> str:
    """Commit of the suite's checkout, with '-dirty' when tracked files differ; 'unknown' outside git."""
    if os.environ.get("CELLARENA_GIT_COMMIT"):
        return os.environ["CELLARENA_GIT_COMMIT"]
    if _BATCH is None:  # the checkout may change between calls (commands that commit, tests)
        return _git_head(Path(repo))
    return shared(("git_commit", Path(repo).resolve()), lambda: _git_head(Path(repo)))


def _git_head(repo: Path) -> str:
    """:func:`git_commit` as git says it (asked once per batch: a job's models share it)."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_rss_mb() -> float:
    """The larger peak memory of this process and of its finished children (the plug-in's sandbox)."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024.0


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def reason_of(exc: BaseException) -> str:
    """An exception as a row's status_reason: ``Type: message``, cut to :data:`MAX_REASON`."""
    text = f"{getattr(exc, 'type_name', type(exc).__name__)}: {exc}".strip()
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def status_of(exc: Exception, card, info, split) -> tuple[str, str]:
    """A plug-in's exception as a run status: ``not_applicable`` with the plug-in's reason, or
    ``failed`` with the exception text (the traceback goes to the job's log). Call inside ``except``."""
    if isinstance(exc, NotApplicable):
        return "not_applicable", str(exc) or "not applicable"
    log.error("model %s failed on %s/%s:\n%s", card.id, info["dataset_id"], split["split_id"],
              getattr(exc, "remote_traceback", "") or traceback.format_exc())
    return "failed", reason_of(exc)


def reason_error(status: str, reason: str) -> Exception:
    """A (status, reason) of a run that cannot start, as the exception a probe (validate) raises."""
    return NotApplicable(reason) if status == "not_applicable" else DataError(reason)


def assigned(labels) -> np.ndarray:
    """Cells whose (silver) label is a real cell type; ``unassigned`` cells are never scored."""
    return labels.astype(str).to_numpy() != UNASSIGNED


class Run:
    """Bookkeeping shared by every task: the run's descriptive columns and the model's parameters."""

    def __init__(self, columns: dict, params: dict):
        self.columns = columns
        self.params = params
        self.sandboxes: list[Sandbox] = []  # the processes the plug-in ran in (their peak memory counts)

    def peak_rss_mb(self) -> float:
        """The run's peak memory: the runner's, or the plug-in's process's where that was larger."""
        return max([peak_rss_mb(), *(box.peak_rss_mb for box in self.sandboxes)])

    @classmethod
    def new(cls, task: str, card: ModelCard, info: dict, split: dict, variant: str, params: dict, *, seed: int,
            datasets_dir: Path, checkpoint: Path | None = None, tuning: dict | None = None) -> Run:
        """The columns of a run that has not run yet (``tuning``: the summary of its tuning record)."""
        leakage, leaked_fraction = leakage_status(card, info, datasets_dir, _exclusion(checkpoint))
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
             stamp: bool = True, bootstrap: dict[str, str] | None = None) -> pd.DataFrame:
        """Long rows of this run. ``stamp``: set the finish time and peak memory now (a job that only
        scores keeps the model job's); ``bootstrap``: each metric's replicates within the split
        (``bootstrap_json``)."""
        cols = dict(self.columns, status=status, status_reason=reason)
        if stamp:
            cols.update(created_utc=now(), peak_rss_mb=self.peak_rss_mb())
        if status != "ok":
            values = {k: None for k in values}
        return make_rows(cols, values, {m: s.higher_is_better for m, s in specs.items()},
                         {m: s.group for m, s in specs.items()}, bootstrap if status == "ok" else None)

    def resamples(self, n_units: int, options: dict):
        """The split's bootstrap resamples of ``n_units`` test units, as many as the job's option
        ``bootstrap_replicates`` says (the same for every model of this split and seed:
        :func:`cellarena.metrics.bootstrap.resamples`); None when it says 0 or there is no unit."""
        from cellarena.metrics.bootstrap import DEFAULT_REPLICATES, resamples  # noqa: PLC0415

        replicates = int(options.get("bootstrap_replicates", DEFAULT_REPLICATES))
        if replicates == 0 or n_units == 0:
            return None
        return resamples(n_units, f"{self.columns['split_id']}|{self.columns['split_hash']}", replicates)

    def status_rows(self, specs: dict, status: str, reason: str, stamp: bool = True) -> pd.DataFrame:
        return self.rows({mid: None for mid in specs}, specs, status, reason, stamp)

    def finish(self, status: str, reason: str) -> None:
        """Record the run's status, finish time and peak memory in its columns."""
        self.columns.update(status=status, status_reason=reason, created_utc=now(), peak_rss_mb=self.peak_rss_mb())


def _exclusion(checkpoint: Path | None) -> dict:
    """The evaluation cells an in-suite checkpoint's pretraining excluded, as its card records them
    ({} without a readable checkpoint card)."""
    if not checkpoint:
        return {}
    from cellarena.zoo.transformer.checkpoint import CheckpointError, read_card  # noqa: PLC0415

    try:
        return read_card(checkpoint).get("extra", {}).get("exclusion", {})
    except (CheckpointError, OSError):
        return {}


@dataclasses.dataclass
class Started:
    """What every run starts from."""

    card: ModelCard
    adata: ad.AnnData
    info: dict  # the prepared dataset's provenance
    split: dict
    run: Run


class Batch:
    """What the jobs of one process share (:func:`batch`): the plug-ins' host process and each
    prepared file and split, read once (a job of several seeds reads its data once for all of them)."""

    def __init__(self, host: Host):
        self.host = host
        self.derived: dict[tuple, object] = {}  # what :func:`shared` made: data, splits, derived work


_BATCH: Batch | None = None


@contextlib.contextmanager
def batch(jobs: list[Job]):
    """Run ``jobs`` (models on the same prepared file, on one split or one per seed) in one process: the data is read
    once and every model's run is forked from one sandbox host that has imported the libraries
    their plug-ins use (cellarena/run/sandbox.py), instead of a new Python per model. Each model
    still runs in a process of its own, with its own time limit; what it sees is unchanged."""
    global _BATCH
    readable, hidden, preload, gpu = [], [], [], False
    for job in jobs:
        readable += readable_of(job.model_dir, job.checkpoint, job.checkpoints_dir)
        preload += plugin_imports(job.model_dir)
        gpu = gpu or job.device == "cuda"
    for key in dict.fromkeys((job.prepared, job.split, job.datasets_dir) for job in jobs):
        hidden += answers_on_disk(*key)
    previous = _BATCH
    with Host(readable=tuple(readable), hidden=tuple(dict.fromkeys(hidden)), gpu=gpu,
              preload=tuple(dict.fromkeys(preload))) as host:
        _BATCH = Batch(host)
        try:
            yield _BATCH
        finally:
            _BATCH = previous


def hidden_from(job: Job) -> tuple[Path, ...]:
    """:func:`answers_on_disk` for ``job`` (worked out once per batch for each data file: reading the
    dataset cards is not free)."""
    key = (job.prepared, job.split, job.datasets_dir)
    return shared(("answers_on_disk", *map(str, key)), lambda: answers_on_disk(*key))


def shared(key: tuple, make):
    """``make()``, computed once per batch for ``key`` (work several models' runs repeat on the same
    data, e.g. the perturbation task's gene panel); outside a batch, simply ``make()``."""
    if _BATCH is None:
        return make()
    if key not in _BATCH.derived:
        _BATCH.derived[key] = make()
    return _BATCH.derived[key]


def load(job: Job) -> tuple[ModelCard, ad.AnnData, dict, dict]:
    """What a job reads: the model card, the prepared data and its provenance, and the split (in a
    :func:`batch`, the data and split are read once for all of its jobs; each job gets its own copy
    of the split's record)."""
    def read_prepared():
        with CLOCK.span("read"):
            adata = ad.read_h5ad(job.prepared)
            return adata, provenance(adata)

    def read_split_file():
        with CLOCK.span("read"):
            return read_split(job.split)

    # keyed by file: a job of several seeds shares the prepared file and reads each seed's split once
    adata, info = shared(("prepared", str(Path(job.prepared).resolve())), read_prepared)
    split = shared(("split", str(Path(job.split).resolve())), read_split_file)
    return load_model_card(job.model_dir), adata, copy.deepcopy(info), copy.deepcopy(split)


def start(task: str, job: Job) -> Started:
    """:func:`load`, and the run's columns (card defaults overridden by ``job.params``, then by the
    best parameters of a tuning record, which makes the run the ``tuned`` variant)."""
    card, adata, info, split = load(job)
    params, summary, variant = {**card.params, **(job.params or {})}, None, job.variant
    if job.tuning is not None:
        check_record(job.tuning, card, info, split)
        variant = "tuned"
        params.update(job.tuning.get("best_params") or {})
        summary = summary_of(job.tuning)
    run = Run.new(task, card, info, split, variant, params, seed=job.seed, datasets_dir=job.datasets_dir,
                  checkpoint=job.checkpoint, tuning=summary)
    return Started(card, adata, info, split, run)


def precheck(card, info, split, adata, role: str = "cell_type") -> tuple[str, str] | None:
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
    from cellarena.cards.model import unfit_reason  # noqa: PLC0415

    unfit = unfit_reason(card, info.get("organism"), info.get("gene_id_type"))
    if unfit:
        return "not_applicable", unfit
    return None


def tuning_reason(tuning: dict | None) -> tuple[str, str] | None:
    """A tuned run whose tuning did not succeed gets the tuning's status and reason."""
    if tuning is None or tuning.get("status") == "ok":
        return None
    return tuning.get("status", "failed"), f"tuning {tuning.get('status')}: {tuning.get('reason', '')}"


def run_device(card: ModelCard, job: Job) -> str:
    """The device a run uses: the job's (``cpu`` unless asked), ``cpu`` for a model that runs on no
    GPU; :class:`NotApplicable` for a model that needs one on a CPU run."""
    if card.resources.gpu == "required" and job.device == "cpu":
        raise NotApplicable(f"model {card.id} needs a GPU (resources.gpu: required) and this run's device is cpu "
                            "(set `device: cuda` in the config, or --device cuda)")
    return job.device if card.resources.gpu != "none" else "cpu"


@contextlib.contextmanager
def sandbox(card: ModelCard, job: Job):
    """The run's child process (cellarena/run/sandbox.py): the plug-in's folder and checkpoints, the
    job's seed, threads and device, and a time limit (the card's ``resources.time_limit_s``, else the
    job's); never the prepared file or the split."""
    limit = card.resources.time_limit_s or job.time_limit_s
    with Sandbox(job.model_dir, seed=job.seed, threads=job.threads, device=run_device(card, job),
                 checkpoint=job.checkpoint, checkpoints_dir=job.checkpoints_dir, time_limit_s=limit,
                 hidden=hidden_from(job), host=_BATCH.host if _BATCH is not None else None) as box:
        yield box


@contextlib.contextmanager
def plugin_instance(box: Sandbox, params: dict, run: Run | None = None):
    """A plug-in instance with ``params`` in the run's sandbox, made inside the run's seed, thread
    limit and a scratch folder of its own; on a clean exit its runtime report goes to ``run``."""
    model = box.instance(params)
    if run is not None:
        run.columns["device"] = box.device
        if box not in run.sandboxes:
            run.sandboxes.append(box)
    try:
        yield model
    except BaseException:
        if box.alive():  # a tuning study goes on in the same sandbox: free the failed instance
            with contextlib.suppress(Exception):
                model.close()
        raise
    runtime = model.close()
    if run is not None:
        run.columns["runtime_json"] = json.dumps(runtime, sort_keys=True, default=str)
