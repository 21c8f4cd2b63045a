"""Hyperparameter tuning with optuna: one budget for every tuned model, training data only.

A model opts in by declaring a ``search_space`` in its ``model.yaml`` (:class:`ParamRange` per
parameter; every tuned parameter also has a default in ``params``, and the default lies in its
range). The workflow's config sets one :class:`TuningBudget` that every tuned model gets: the
same number of trials, wall-clock limit, inner folds and cells.

The objective never sees the test cells of the split:

- **annotation**: macro-F1 of a stratified K-fold cross-validation over the split's *training*
  cells (a seeded, stratified subsample of ``max_cells`` of them). The test cells, and their
  labels, are not even loaded into the objective.
- **integration** (embedding models): the model's own held-out loss (``held_out_loss``, e.g. the
  negative ELBO of scVI) over K folds of the cells it will embed. No label is used: neither the
  cell types nor anything the metrics score against.

Studies persist in an optuna storage (a SQLite file per study by default; any SQLAlchemy URL, e.g.
PostgreSQL, for trials run by many cluster jobs). Re-running the same tuning resumes: finished
trials are kept, trials of a killed process are marked failed through optuna's heartbeat (and, when
the process died between creating a trial and its first heartbeat, by the trial's age), and only
the missing trials run. Several workers (cluster jobs sharing ``tuning.storage``) may run one study
at once without exceeding the budget: a worker takes a trial only while fewer than ``n_trials``
trials are finished or running, and a trial two workers created at once runs only if the trials
numbered before it leave room; otherwise it is marked skipped and uses nothing. A worker with no
room left waits for the others' trials and reports the whole study. Trial 0 is always the card's
defaults. Each trial's TPE sampler is seeded from the run's seed and the number of trials already
used, so a resumed study proposes the same parameters as an uninterrupted one, and the same seed
gives the same best parameters (with one worker; concurrent workers' order is the scheduler's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import Field

from cellarena.cards.base import Strict
from cellarena.cards.model import ParamRange
from cellarena.errors import CellarenaError, NotApplicable
from cellarena.run.setup import Job, load, precheck, reason_of, sandbox
from cellarena.run.tuning_record import write_record
from cellarena.tasks import TUNED_TASKS, get

log = logging.getLogger(__name__)


class TuningBudget(Strict):
    """What every tuned model gets, set once in the workflow config (``tuning``)."""

    n_trials: int = Field(ge=1, description="trials per study, the defaults' trial included")
    timeout_s: float | None = Field(None, gt=0, description="stop starting trials after this many seconds")
    inner_folds: int = Field(3, ge=2, le=20)
    max_cells: int | None = Field(None, ge=20, description="cells the objective uses (seeded subsample)")

    def objective_key(self) -> dict:
        """What changes the objective (a different study); n_trials and timeout only extend or cut it."""
        return {"inner_folds": self.inner_folds, "max_cells": self.max_cells}


class TrialFailed(Exception):
    """A trial whose plug-in raised: it uses up budget but gives no value."""


class TrialSkipped(Exception):
    """A trial that another worker's trials left no budget for: it never ran and uses none."""


SKIPPED = "skipped"  # the user attribute of a skipped trial (its reason)


# --------------------------------------------------------------------------------------------------
# the objective's data: which cells, which folds
# --------------------------------------------------------------------------------------------------

def subsample(n: int, max_cells: int | None, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions of at most ``max_cells`` of ``n`` cells; stratified by ``labels`` when given."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng([seed, 7])
    if labels is None:
        return np.sort(rng.choice(n, size=max_cells, replace=False))
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    _, counts = np.unique(labels, return_counts=True)
    strat = labels if counts.min() >= 2 else None
    keep, _ = train_test_split(np.arange(n), train_size=max_cells, stratify=strat,
                               random_state=int(rng.integers(2**31)))
    return np.sort(keep)


def _folds(n: int, k: int, seed: int, labels: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    import warnings  # noqa: PLC0415

    from sklearn.model_selection import KFold, StratifiedKFold  # noqa: PLC0415

    if n < k:
        raise NotApplicable(f"{n} cells cannot make {k} inner folds")
    if labels is None:
        return list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n)))
    with warnings.catch_warnings():  # classes rarer than k cells are allowed: they miss some folds
        warnings.simplefilter("ignore", UserWarning)
        return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n), labels))


# --------------------------------------------------------------------------------------------------
# studies
# --------------------------------------------------------------------------------------------------

def default_storage(out: str | Path) -> str:
    """A SQLite file next to the tuning record (one study per file: no lock contention between jobs)."""
    return f"sqlite:///{Path(out).resolve().with_suffix('.db')}"


def public_url(url: str) -> str:
    """The storage URL with any password hidden, for the record."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (an unusual URL is recorded without its credentials part)
        return url.split("@")[-1]


def _storage(url: str, heartbeat_s: int):
    import warnings  # noqa: PLC0415

    import optuna  # noqa: PLC0415

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are stable
    return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s)


def _fail_silent_trials(study, storage, grace_s: float) -> list[int]:
    """Fail running trials that never recorded a heartbeat and are older than the grace period.

    optuna's ``fail_stale_trials`` only judges trials by their last heartbeat, so a process killed
    between creating a trial and its heartbeat thread's first beat leaves that trial RUNNING for
    ever. A live worker beats within milliseconds of creating its trial, so age past the grace
    period without a single beat means its process is gone.
    """
    from datetime import datetime, timedelta  # noqa: PLC0415

    import sqlalchemy  # noqa: PLC0415
    from optuna.exceptions import UpdateFinishedTrialError  # noqa: PLC0415
    from optuna.trial import TrialState  # noqa: PLC0415

    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.datetime_start is not None and datetime.now() - t.datetime_start > timedelta(seconds=grace_s)]
    if not running:
        return []
    with storage.engine.connect() as con:
        beating = {row[0] for row in con.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))}
    failed = []
    for t in running:
        if t._trial_id in beating:
            continue  # optuna's own heartbeat check judges it
        try:
            if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                failed.append(t.number)
        except UpdateFinishedTrialError:  # another worker finished it meanwhile
            pass
    return failed


def study_name(task: str, info: dict, split: dict, card, budget: TuningBudget) -> str:
    """Names one study: same data, split, model version, search space and objective -> same study."""
    objective = get(task).tuning
    key = json.dumps({"space": {k: v.model_dump() for k, v in card.search_space.items()},
                      "objective": (objective.metric, objective.direction), **budget.objective_key()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return (f"{task}:{info['dataset_id']}@{info['dataset_version']}:{split['split_id']}:"
            f"{split.get('hash', '')}:{card.id}@{card.version}:{digest}")


def _trial_seed(seed: int, n_used: int) -> int:
    return int(np.random.SeedSequence([seed, n_used]).generate_state(1)[0])


def _used(trials) -> list:
    """Trials that count against the budget: finished ones, and those whose plug-in raised (not killed ones)."""
    from optuna.trial import TrialState  # noqa: PLC0415

    return [t for t in trials
            if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)]


def _taken(trials) -> list:
    """Trials that hold a place in the budget: used ones, and running ones (maybe another worker's)."""
    from optuna.trial import TrialState  # noqa: PLC0415

    return _used(trials) + [t for t in trials if t.state == TrialState.RUNNING and SKIPPED not in t.user_attrs]


def _skip_reason(trial, n_trials: int) -> str | None:
    """Why the just-created ``trial`` must not run, or None.

    Workers sharing a study each check the budget before creating a trial, and two may pass the check
    at once. Trial numbers order the contenders: a trial runs only while fewer than ``n_trials``
    trials numbered below it hold a place, and the defaults' trial runs once (two workers may both
    have queued it).
    """
    earlier = [t for t in _taken(trial.study.get_trials(deepcopy=False)) if t.number < trial.number]
    if len(earlier) >= n_trials:
        return "over_budget"
    if trial.user_attrs.get("default") and any(t.user_attrs.get("default") for t in earlier):
        return "duplicate_default"
    return None


class Progress:
    """One line per trial on stderr (the job's log): trial count, this trial's score, best so far."""

    def __init__(self, label: str, n_trials: int, metric: str, stream=None):
        self.label, self.n_trials, self.metric = label, n_trials, metric
        self.stream = stream or sys.stderr

    def __call__(self, n_used: int, trial, best) -> None:
        if trial is None:
            return
        value = trial.value if trial.value is not None else float("nan")
        err = trial.user_attrs.get("error")
        what = f"failed ({err[:120]})" if err else f"{self.metric} {value:.4f}"
        best_txt = f"best {best.value:.4f} (trial {best.number})" if best is not None else "no best yet"
        print(f"[tune {self.label}] trial {n_used}/{self.n_trials}: {what}; {best_txt}; "
              f"{trial.user_attrs.get('seconds', float('nan')):.1f} s", file=self.stream, flush=True)


def _best(used, direction: str):
    """Best finished trial of ``used`` (ties: the earliest), or None."""
    from optuna.trial import TrialState  # noqa: PLC0415

    done = [t for t in used if t.state == TrialState.COMPLETE]
    if not done:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(done, key=lambda t: (sign * t.value, t.number))


def optimize(name: str, storage_url: str, direction: str, space: dict[str, ParamRange], defaults: dict,
             evaluate: Callable[[dict], float], *, seed: int, budget: TuningBudget, heartbeat_s: int = 10,
             progress: Callable | None = None) -> dict:
    """Run (or resume) the study ``name`` until ``budget.n_trials`` trials are used or the time is up.

    ``evaluate(params)`` returns the objective for the full parameter dict (card defaults overridden
    by the trial's values); it may raise :class:`NotApplicable` (stops tuning) or any other exception
    (the trial fails and counts against the budget). Returns a summary of the study.
    """
    import optuna  # noqa: PLC0415
    from optuna.trial import TrialState  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(storage_url, heartbeat_s)
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True)
    optuna.storages.fail_stale_trials(study)
    _fail_silent_trials(study, storage, 2 * heartbeat_s)
    trials = study.get_trials(deepcopy=False)
    has_default = any(t.user_attrs.get("default") for t in _used(trials) + [t for t in trials
                      if t.state == TrialState.WAITING])
    if not has_default:  # a new study, or one whose defaults' trial was killed
        study.enqueue_trial({k: defaults[k] for k in space}, user_attrs={"default": True})

    def objective(trial):
        skip = _skip_reason(trial, budget.n_trials)
        if skip:
            trial.set_user_attr(SKIPPED, skip)
            raise TrialSkipped(skip)
        params = {**defaults, **{k: rng.suggest(trial, k) for k, rng in space.items()}}
        t0 = time.perf_counter()
        try:
            value = float(evaluate(params))
            if not math.isfinite(value):
                raise ValueError(f"the objective is {value}")
        except NotApplicable:
            raise
        except Exception as exc:  # a trial's failure uses budget, and tuning goes on
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            trial.set_user_attr("error", reason_of(exc)[:500])
            raise TrialFailed(str(exc)) from exc
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        return value

    t_start = time.monotonic()
    n_startup = min(10, max(2, budget.n_trials // 2))
    stopped_by = "n_trials"
    resumed_with = len(_used(study.get_trials(deepcopy=False)))
    while True:
        trials = study.get_trials(deepcopy=False)
        used = _used(trials)
        if len(used) >= budget.n_trials:
            break
        if budget.timeout_s is not None and time.monotonic() - t_start >= budget.timeout_s:
            stopped_by = "timeout_s"
            break
        if len(_taken(trials)) >= budget.n_trials:
            # other workers run the rest of the budget: wait for them (a dead one's trial is failed
            # by the heartbeat checks, and its place taken here)
            time.sleep(min(2.0, heartbeat_s / 2))
            optuna.storages.fail_stale_trials(study)
            _fail_silent_trials(study, storage, 2 * heartbeat_s)
            continue
        sampler = optuna.samplers.TPESampler(seed=_trial_seed(seed, len(used)), n_startup_trials=n_startup)
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        study.optimize(objective, n_trials=1, catch=(TrialFailed, TrialSkipped))
        if progress is not None:
            trials = study.get_trials(deepcopy=False)
            used = _used(trials)
            last = max(used, key=lambda t: t.number, default=None)  # not a skipped trial
            progress(len(used), last, _best(used, direction))
    # the first n_trials used trials decide, however many parallel workers added
    used = sorted(_used(study.get_trials(deepcopy=False)), key=lambda t: t.number)[: budget.n_trials]
    best = _best(used, direction)
    default_trial = next((t for t in used if t.user_attrs.get("default")), None)
    return {
        "study": name,
        "direction": direction,
        "n_trials": len(used),
        "n_failed_trials": sum(1 for t in used if t.state != TrialState.COMPLETE),
        "resumed_with": resumed_with,
        "stopped_by": stopped_by,
        "best_trial": None if best is None else best.number,
        "best_value": None if best is None else best.value,
        "best_params": None if best is None else {k: best.params[k] for k in space},
        "default_value": default_trial.value if default_trial else None,
        "first_error": next((t.user_attrs["error"] for t in used if "error" in t.user_attrs), ""),
        "trials": [{"number": t.number, "params": t.params, "value": t.value, "default": bool(t.user_attrs.get("default")),
                    "seconds": t.user_attrs.get("seconds"), "error": t.user_attrs.get("error", "")}
                   for t in used],
    }


# --------------------------------------------------------------------------------------------------
# tuning one model on one split (what `cellarena tune` and the workflow's tune rule run)
# --------------------------------------------------------------------------------------------------

def tune(task_id: str, job: Job, *, budget: TuningBudget, out: str | Path, storage: str | None = None,
         heartbeat_s: int = 10, stream=None) -> dict:
    """Tune one model on one split of one dataset for ``task_id``; write and return the tuning record.

    The objective is the task driver's ``tuning_objective`` (the task's declaration names it and its
    direction), on the split's training side only. The record (JSON at ``out``) has ``status``
    (ok / failed / not_applicable) and ``reason``; when ok, the best parameters, the number of trials
    used, the objective of the best trial and of the defaults, and the study's name and storage. It
    never raises for a model's or dataset's fault.
    """
    task = get(task_id)
    if task.tuning is None:
        raise CellarenaError(f"task {task_id!r} cannot be tuned; choose one of {TUNED_TASKS}")
    card, adata, info, split = load(job)
    objective = task.tuning
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(out)
    record = {
        "status": "ok", "reason": "", "task": task.id, "dataset_id": info["dataset_id"],
        "dataset_version": int(info["dataset_version"]), "split_id": split["split_id"],
        "split_hash": split.get("hash", ""), "seed": int(job.seed), "model_id": card.id,
        "model_version": card.version, "metric": objective.metric, "direction": objective.direction,
        "objective": objective.description.format(k=budget.inner_folds), "budget": budget.model_dump(),
        "storage": public_url(storage),
    }
    reason = precheck(card, info, split, adata)
    if reason is None and task.id not in card.tasks:
        reason = ("not_applicable", f"model {card.id} does not support {task.id}")
    if reason is None and not card.search_space:
        reason = ("not_applicable", f"model {card.id} declares no search_space in model.yaml")
    if reason is None:
        name = study_name(task.id, info, split, card, budget)
        label = f"{card.id} {info['dataset_id']}/{split['split_id']}"
        t0 = time.perf_counter()

        def select(n: int, labels: np.ndarray | None):
            keep = subsample(n, budget.max_cells, job.seed, labels)
            return keep, _folds(keep.size, budget.inner_folds, job.seed, None if labels is None else labels[keep])

        try:  # every trial's plug-in lives in one sandbox, which sees the training side only
            with sandbox(card, job) as box:
                evaluate = task.driver_module().tuning_objective(task, card, job, adata, split, select, box)
                defaults = {**card.params, **(job.params or {})}  # the card's, with the plan's budget
                summary = optimize(name, storage, objective.direction, card.search_space, defaults,
                                   evaluate, seed=job.seed, budget=budget, heartbeat_s=heartbeat_s,
                                   progress=Progress(label, budget.n_trials, objective.metric, stream))
        except NotApplicable as exc:
            reason = ("not_applicable", str(exc) or "not applicable")
        else:
            record.update(summary, tuning_s=time.perf_counter() - t0)
            if summary["best_params"] is None:
                reason = ("failed", f"every trial failed; first error: {summary['first_error']}")
    if reason is not None:
        record.update(status=reason[0], reason=reason[1])
    write_record(record, out)
    return record
