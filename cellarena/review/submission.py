"""Submitted results: the route for models that cannot run where the benchmark runs (large GPU models).

The model's authors run cellarena on their own hardware (the same plan, splits and seeds), turn the
result rows into a submission with ``cellarena submit --model models/<id> RUN.parquet ...``, and
open a pull request with the folder: ``model.yaml`` plus ``submitted/results.csv`` (CSV, so the
reviewer reads every number in the diff), optionally with the ``model.py`` they ran.

Checks (``cellarena validate`` and the workflow's ``import_submission`` rule):

- each file is what its name says (a CSV file of text, a parquet file cellarena wrote); anything else
  (a pickle renamed ``.parquet``, damaged bytes, bad Arrow metadata) is a :class:`~cellarena.results.SchemaError`
  naming the file, what it holds (its first bytes) and the fix;
- every row passes the results schema and has variant ``submitted``;
- model id, version and kind are the card's; each task is one the card declares;
- each dataset is a card of this suite at the version the rows name;
- each row means what the suite's own rows mean (:func:`row_problems`): its metric is one of the
  task's own (for the plan's options), with the task's direction and metric group, and a row with
  status ``ok`` has a finite value inside the metric's range (``MetricSpec.range``); each run names
  one seed, one split hash, and a split id made of a split name and that seed;
- in the workflow, each row's split hash and seed must be those of the split this suite makes for
  that dataset, scheme and seed; a row that does not match becomes ``failed`` with both hashes; a
  run with a row that fails the checks above becomes ``failed`` rows of the plan's metrics, the
  reason naming the row;
- leakage is recomputed from the card's corpus manifest (a submission cannot claim ``clean``).

Submitted rows are shown on the leaderboard as ``<model> (submitted)``: validated, not re-run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from cellarena import results
from cellarena.data.splits import read_split
from cellarena.data.splits import split_id as make_split_id
from cellarena.errors import CellarenaError
from cellarena.tasks import EMBEDDING_SPLIT, TASKS

SUBMITTED_DIR = "submitted"
SUBMISSION_FILE = "results.csv"
# Without a plan (`cellarena validate`, `cellarena submit`) metric ids are checked against the task's
# metrics with its optional ones on (kBET, the batch metrics of a dataset with batches, the Cell
# Ontology metrics of a dataset whose card maps its labels to terms) and its other
# options at their defaults (those of every workflow config); the workflow checks them against the
# options its plan gives each run.
WIDEST_OPTIONS = {"include_kbet": True, "batch_role": "batch", "cell_ontology": {}}
SPLIT_HASH = re.compile(r"[0-9a-f]{16}")
READ_FIX = ("write the file with `cellarena submit --model <folder> RUN.parquet ...`, which writes "
            f"{SUBMITTED_DIR}/{SUBMISSION_FILE} (CSV); a parquet file must be one that cellarena wrote")


def submission_files(model_dir: str | Path) -> list[Path]:
    folder = Path(model_dir) / SUBMITTED_DIR
    return sorted(p for p in folder.glob("*") if p.suffix in (".csv", ".parquet")) if folder.is_dir() else []


def read_result_file(path: str | Path) -> pd.DataFrame:
    """One result file (CSV or parquet), validated against the results schema. A file that is not what
    its name says, or that pandas/pyarrow cannot read, is a :class:`~cellarena.results.SchemaError`
    naming the file, its first bytes and the fix, never a parser's traceback."""
    from cellarena.data.prepare import looks_like  # noqa: PLC0415

    path = Path(path)
    head, holds = looks_like(path)
    csv = path.suffix == ".csv"
    expected = "a CSV text file" if csv else "a parquet file"
    if not (holds.endswith("text") if csv else holds == "a Parquet file"):
        raise results.SchemaError(f"expected {expected}, but it holds {holds} (first bytes {head!r})",
                                  where=path, fix=READ_FIX)
    try:
        return results.read_table(path)
    except CellarenaError:
        raise
    except Exception as exc:  # noqa: BLE001  pyarrow and pandas raise many kinds for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise results.SchemaError(f"cannot read it as {expected} ({type(exc).__name__}: {first[:300]}; first "
                                  f"bytes {head[:16]!r})", where=path, fix=READ_FIX) from None


def read_submission(model_dir: str | Path) -> pd.DataFrame:
    """Every submitted row of a model folder, validated against the results schema."""
    files = submission_files(model_dir)
    if not files:
        raise results.SchemaError("no result files", where=Path(model_dir) / SUBMITTED_DIR,
                                  fix="write them with `cellarena submit --model <folder> RUN.parquet ...`")
    frames = [read_result_file(p) for p in files]
    return results.validate(pd.concat(frames, ignore_index=True), where=Path(model_dir) / SUBMITTED_DIR)


def row_name(row) -> str:
    """A submitted row as a reviewer finds it in the file: task/dataset/split, metric[subgroup] = value."""
    sub = f"[{row.subgroup}]" if row.subgroup else ""
    return f"{row.task}/{row.dataset_id}/{row.split_id} {row.metric_id}{sub} = {row.value!r}"


def _metric_problem(row, specs: dict) -> str:
    """Why one row's metric, direction, group or value is not what the task's metric says ('' if fine)."""
    spec = specs.get(row.metric_id)
    if spec is None:
        return f"{row.metric_id!r} is not a metric of {row.task} (its metrics: {', '.join(sorted(specs))})"
    if bool(row.higher_is_better) != spec.higher_is_better:
        return (f"higher_is_better is {bool(row.higher_is_better)}, but {row.metric_id} is "
                f"{'higher' if spec.higher_is_better else 'lower'} is better")
    if row.metric_group != spec.group:
        return f"metric_group is {row.metric_group!r}, but {row.metric_id} belongs to {spec.group!r}"
    if row.status == "ok":
        lo, hi = spec.range
        if not math.isfinite(row.value):
            return f"the value is not finite (status ok needs a finite {row.metric_id})"
        if not lo <= row.value <= hi:
            return f"the value is outside the range of {row.metric_id}, [{lo:g}, {hi:g}]"
    return ""


def _run_problem(task: str, split: str, rows: pd.DataFrame) -> str:
    """Why the rows of one (task, dataset, split) run do not name one run of the suite ('' if fine)."""
    seeds, hashes = sorted(set(rows["seed"])), sorted(set(rows["split_hash"]))
    if len(seeds) > 1 or len(hashes) > 1:
        return f"the run's rows name {len(seeds)} seeds {seeds[:3]} and {len(hashes)} split hashes {hashes[:3]}"
    seed = int(seeds[0])
    if TASKS[task].scores_embeddings and split != make_split_id(EMBEDDING_SPLIT, seed):
        return f"split {split!r}: {task} scores every cell, on split {make_split_id(EMBEDDING_SPLIT, seed)!r}"
    if not split.endswith(make_split_id("", seed)) or split == make_split_id("", seed):
        return f"split {split!r} does not name the rows' seed {seed} (a split id is <name>_seed<seed>)"
    if not SPLIT_HASH.fullmatch(hashes[0]) and (hashes[0] or rows["status"].eq("ok").any()):  # a failed split has none
        return f"split hash {hashes[0]!r} is not a split hash (16 hex digits, from the split file)"
    return ""


def row_problems(df: pd.DataFrame, options: Callable[[str, str, str], dict] | None = None) -> pd.Series:
    """Why each submitted row does not mean what the suite's own rows mean: '' where it does.

    ``options(task, dataset_id, split_id)`` gives the task options of a run (its metric ids depend on
    them); :data:`WIDEST_OPTIONS` without it. A row fails when its metric is not one of the task's
    own, when ``higher_is_better`` or ``metric_group`` differ from the metric's, when a row with
    status ``ok`` has a value that is not finite or lies outside the metric's range, or when its run
    (task, dataset, split) names several seeds or split hashes, or a split id that is not
    ``<name>_seed<seed>`` (``all_seed<seed>`` for the embedding tasks). Each reason names the row.
    """
    reasons = pd.Series("", index=df.index, dtype=object)
    for (task, dataset_id, split), rows in df.groupby(["task", "dataset_id", "split_id"], sort=True):
        specs = TASKS[task].metric_specs(options(task, dataset_id, split) if options else WIDEST_OPTIONS)
        run = _run_problem(task, split, rows)
        for row in rows.itertuples():
            why = run or _metric_problem(row, specs)
            if why:
                reasons[row.Index] = f"row {row_name(row)}: {why}"
    return reasons


def _row_failures(reasons: pd.Series, limit: int = 10) -> list[str]:
    """The rows that fail :func:`row_problems`, one line each (at most ``limit``, then a count)."""
    bad = [r for r in reasons if r]
    return bad[:limit] + ([f"... and {len(bad) - limit} more rows"] if len(bad) > limit else [])


def submission_problems(df: pd.DataFrame, card, datasets_dir: str | Path) -> list[tuple[str, str]]:
    """What is wrong with submitted rows, as (problem, fix); empty when they are consistent."""
    from cellarena.cards.dataset import card_path, load_card  # noqa: PLC0415

    problems = []

    def bad(column: str, expected) -> list:
        return sorted({str(v) for v in df[column]} - {str(expected)})

    for column, expected, fix in (
            ("model_id", card.id, "the rows must be this model's; check --model of `cellarena submit`"),
            ("model_version", card.version, "re-run with the card's version, or set `version:` to the one you ran"),
            ("model_kind", card.kind, "make `kind:` in model.yaml match the rows"),
            ("variant", "submitted", "make the file with `cellarena submit`, which marks rows as submitted")):
        wrong = bad(column, expected)
        if wrong:
            problems.append((f"column {column} has {wrong[:3]}, expected {expected!r}", fix))
    undeclared = sorted(set(df["task"]) - set(card.tasks))
    if undeclared:
        problems.append((f"rows for tasks {undeclared} that model.yaml does not declare",
                         "add them to `tasks:` or drop those rows"))
    for (dataset_id, version), _ in df.groupby(["dataset_id", "dataset_version"], sort=True):
        try:
            dataset = load_card(card_path(datasets_dir, dataset_id))
        except CellarenaError:
            problems.append((f"dataset {dataset_id!r} has no card in {datasets_dir}",
                             "submit results only for datasets of this suite"))
            continue
        if dataset.version != int(version):
            problems.append((f"rows for {dataset_id} v{version}, but the card is v{dataset.version}",
                             f"re-run on {dataset_id} v{dataset.version} (the prepared data changed)"))
    if set(df["git_commit"]) & {"unknown", ""}:
        problems.append(("rows with git_commit 'unknown'",
                         "run cellarena from a git checkout so every number traces to a commit"))
    return problems


ROW_FIX = ("submit the rows cellarena wrote for this suite's runs, unchanged: re-run with `cellarena run` "
           "and make the file with `cellarena submit`")


def check_submission_folder(report, model_dir: Path, card, datasets_dir: Path) -> None:
    """The submission part of ``cellarena validate``."""
    try:
        df = read_submission(model_dir)
    except CellarenaError as exc:
        report.add("submitted results", "fail", f"{exc.where}: {exc.message}" if exc.where else exc.message,
                   exc.fix or "write the file with `cellarena submit`")
        return
    problems = submission_problems(df, card, datasets_dir)
    problems += [(line, ROW_FIX) for line in _row_failures(row_problems(df))]
    for problem, fix in problems:
        report.add("submitted results", "fail", problem, fix)
    if not problems:
        runs = df.drop_duplicates(["task", "dataset_id", "split_id"])
        envs = {json.loads(e).get("gpu", "cpu") for e in df["environment_json"]}
        report.add("submitted results", "pass", f"{len(df)} rows, {len(runs)} (task, dataset, split) runs, "
                                                f"ran on {', '.join(sorted(envs))}")


def make_submission(model_dir: str | Path, run_files: list[str | Path], *, datasets_dir: str | Path,
                    out: str | Path | None = None) -> tuple[Path, pd.DataFrame]:
    """Collect this model's rows from result files (per-run parquet files or a whole scores table),
    mark them ``submitted`` and write ``<model_dir>/submitted/results.csv``. Raises when they do not
    match the card."""
    from cellarena.cards.model import load_model_card  # noqa: PLC0415

    card = load_model_card(model_dir)
    frames = [read_result_file(p) for p in run_files]
    df = pd.concat(frames, ignore_index=True)
    df = df[df["model_id"] == card.id]
    if df.empty:
        raise CellarenaError(f"no rows of model {card.id!r} in {len(run_files)} file(s)",
                             fix="pass the result files of this model's runs")
    df = df[df["variant"] != "tuned"].assign(variant="submitted")  # default-parameter runs are submitted
    problems = submission_problems(df, card, datasets_dir)
    problems += [(line, ROW_FIX) for line in _row_failures(row_problems(df))]
    if problems:
        raise CellarenaError("; ".join(p for p, _ in problems), where=model_dir,
                             fix="; ".join(sorted({f for _, f in problems})))
    df = df.sort_values(["task", "dataset_id", "split_id", "metric_id", "subgroup"], kind="mergesort")
    out = Path(out) if out else Path(model_dir) / SUBMITTED_DIR / SUBMISSION_FILE
    return out, results.write(df, out)


def import_submission(model_dir: str | Path, planned: dict[tuple[str, str, str], tuple[str | Path, dict]], *,
                      datasets_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """The submitted rows the plan shows, checked against the plan's own splits.

    ``planned`` maps (task, dataset_id, split_id) to (split file, task options) for every split of
    the plan on which the model's tasks run. Returns (rows, notes). A submission that does not
    validate gives ``failed`` rows for every planned run, with the reason; a run with a row that
    fails :func:`row_problems` (with the plan's options) gives ``failed`` rows of the plan's metrics
    for that run, the reason naming the row; a run whose split hash or seed is not the plan's split's
    keeps its rows, marked ``failed`` with both hashes. Nothing else is lost.
    """
    from cellarena.cards.dataset import card_path, load_card  # noqa: PLC0415
    from cellarena.cards.model import load_model_card  # noqa: PLC0415

    card = load_model_card(model_dir)
    notes = []
    try:
        df = read_submission(model_dir)
        problems = submission_problems(df, card, datasets_dir)
        if problems:
            raise CellarenaError("; ".join(p for p, _ in problems))
    except CellarenaError as exc:
        reason = f"submission does not validate: {exc.message}" + (f" ({exc.where})" if exc.where else "")
        frames = [_failed_run(card, task, dataset_id, split_path, options, datasets_dir, reason)
                  for (task, dataset_id, _split_id), (split_path, options) in sorted(planned.items())]
        return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(results.COLUMNS))), \
            [reason]
    kept = []
    reasons = row_problems(df, lambda *run: planned.get(run, ("", {}))[1])  # the plan's options of each run
    for (task, dataset_id, split_id), rows in df.groupby(["task", "dataset_id", "split_id"], sort=True):
        if (task, dataset_id, split_id) not in planned:
            notes.append(f"left out {len(rows)} rows of {task}/{dataset_id}/{split_id}: not in this plan")
            continue
        split_path, options = planned[task, dataset_id, split_id]
        bad = [r for r in reasons[rows.index] if r]
        if bad:
            more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
            reason = f"submitted row rejected: {bad[0]}{more}"
            kept.append(_failed_run(card, task, dataset_id, split_path, options, datasets_dir, reason))
            notes.append(f"{task}/{dataset_id}/{split_id}: {len(bad)} submitted rows rejected, run marked failed: "
                         + "; ".join(bad[:3]))
            continue
        split = read_split(split_path)
        rows = rows.copy()
        if (rows["split_hash"] != split["hash"]).any() or (rows["seed"] != int(split["seed"])).any():
            theirs = sorted(set(rows["split_hash"]))
            rows = rows.assign(status="failed", value=float("nan"),
                               status_reason=f"submitted for split hash {theirs[0]} (seed {rows['seed'].iloc[0]}), "
                                             f"but this suite's {split_id} of {dataset_id} has hash {split['hash']} "
                                             f"(seed {split['seed']}): re-run on the current split")
            notes.append(f"{task}/{dataset_id}/{split_id}: split hash differs, rows marked failed")
        dataset = load_card(card_path(datasets_dir, dataset_id))
        rows["leakage"] = _leakage(card, dataset, datasets_dir, rows["leakage"])
        kept.append(rows)
    out = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=list(results.COLUMNS))
    return out, notes


def _failed_run(card, task: str, dataset_id: str, split_path: str | Path, options: dict, datasets_dir: str | Path,
                reason: str) -> pd.DataFrame:
    """``failed`` rows, with ``reason``, of every metric the plan gives the model's run on a split."""
    from cellarena.cards.dataset import card_path, load_card  # noqa: PLC0415
    from cellarena.run.setup import Run  # noqa: PLC0415

    split = read_split(split_path)
    dataset = load_card(card_path(datasets_dir, dataset_id))
    info = {"dataset_id": dataset.id, "dataset_version": dataset.version,
            "label_quality": dataset.label_quality, "card": dataset.model_dump_json()}
    run = Run.new(task, card, info, split, "submitted", dict(card.params), seed=int(split["seed"]),
                  datasets_dir=Path(datasets_dir))
    return run.status_rows(TASKS[task].metric_specs(options), "failed", reason)


def _leakage(card, dataset, datasets_dir, submitted: pd.Series) -> pd.Series:
    """Leakage from the card's corpus manifest (the runner's dataset-level check); a row the
    submitter marked ``leaked`` stays leaked."""
    from cellarena.data.leakage import leakage_status  # noqa: PLC0415

    status = leakage_status(card, {"card": dataset.model_dump_json()}, datasets_dir)[0]
    return submitted.where((submitted == "leaked") & (status != "no_corpus"), status)
