"""Submitted results: the route for models that cannot run where the benchmark runs (large GPU models).

The model's authors run cellarena on their own hardware (the same plan, splits and seeds), turn the
result rows into a submission with ``cellarena submit --model models/<id> RUN.parquet ...``, and
open a pull request with the folder: ``model.yaml`` plus ``submitted/results.csv`` (CSV, so the
reviewer reads every number in the diff), optionally with the ``model.py`` they ran.

Checks (``cellarena validate`` and the workflow's ``import_submission`` rule):

- every row passes the results schema and has variant ``submitted``;
- model id, version and kind are the card's; each task is one the card declares;
- each dataset is a card of this suite at the version the rows name;
- in the workflow, each row's split hash must equal the hash of the split this suite makes for that
  dataset, scheme and seed; a row that does not match becomes ``failed`` with both hashes;
- leakage is recomputed from the card's corpus manifest (a submission cannot claim ``clean``).

Submitted rows are shown on the leaderboard as ``<model> (submitted)``: validated, not re-run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cellarena import results
from cellarena.errors import CellarenaError

SUBMITTED_DIR = "submitted"
SUBMISSION_FILE = "results.csv"


def submission_files(model_dir: str | Path) -> list[Path]:
    folder = Path(model_dir) / SUBMITTED_DIR
    return sorted(p for p in folder.glob("*") if p.suffix in (".csv", ".parquet")) if folder.is_dir() else []


def read_submission(model_dir: str | Path) -> pd.DataFrame:
    """Every submitted row of a model folder, validated against the results schema."""
    files = submission_files(model_dir)
    if not files:
        raise results.SchemaError("no result files", where=Path(model_dir) / SUBMITTED_DIR,
                                  fix="write them with `cellarena submit --model <folder> RUN.parquet ...`")
    frames = [results.read_table(p) for p in files]
    return results.validate(pd.concat(frames, ignore_index=True), where=Path(model_dir) / SUBMITTED_DIR)


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


def check_submission_folder(report, model_dir: Path, card, datasets_dir: Path) -> None:
    """The submission part of ``cellarena validate``."""
    try:
        df = read_submission(model_dir)
    except CellarenaError as exc:
        report.add("submitted results", "fail", f"{exc.where}: {exc.message}" if exc.where else exc.message,
                   exc.fix or "write the file with `cellarena submit`")
        return
    problems = submission_problems(df, card, datasets_dir)
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
    frames = [results.read_table(p) for p in run_files]
    df = pd.concat(frames, ignore_index=True)
    df = df[df["model_id"] == card.id]
    if df.empty:
        raise CellarenaError(f"no rows of model {card.id!r} in {len(run_files)} file(s)",
                             fix="pass the result files of this model's runs")
    df = df[df["variant"] != "tuned"].assign(variant="submitted")  # default-parameter runs are submitted
    problems = submission_problems(df, card, datasets_dir)
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
    validate gives ``failed`` rows for every planned run, with the reason; nothing else is lost.
    """
    from cellarena.cards.dataset import card_path, load_card  # noqa: PLC0415
    from cellarena.cards.model import load_model_card  # noqa: PLC0415
    from cellarena.run.setup import Run  # noqa: PLC0415
    from cellarena.tasks import get  # noqa: PLC0415
    from cellarena.data.splits import read_split  # noqa: PLC0415

    card = load_model_card(model_dir)
    notes = []
    try:
        df = read_submission(model_dir)
        problems = submission_problems(df, card, datasets_dir)
        if problems:
            raise CellarenaError("; ".join(p for p, _ in problems))
    except CellarenaError as exc:
        reason = f"submission does not validate: {exc.message}"
        frames = []
        for (task, dataset_id, _split_id), (split_path, options) in sorted(planned.items()):
            split = read_split(split_path)
            dataset = load_card(card_path(datasets_dir, dataset_id))
            info = {"dataset_id": dataset.id, "dataset_version": dataset.version,
                    "label_quality": dataset.label_quality, "card": dataset.model_dump_json()}
            run = Run.new(task, card, info, split, "submitted", dict(card.params), seed=int(split["seed"]),
                          datasets_dir=Path(datasets_dir))
            frames.append(run.status_rows(get(task).metric_specs(options), "failed", reason))
        return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(results.COLUMNS))), \
            [reason]
    kept = []
    for (task, dataset_id, split_id), rows in df.groupby(["task", "dataset_id", "split_id"], sort=True):
        if (task, dataset_id, split_id) not in planned:
            notes.append(f"left out {len(rows)} rows of {task}/{dataset_id}/{split_id}: not in this plan")
            continue
        split = read_split(planned[task, dataset_id, split_id][0])
        rows = rows.copy()
        if (rows["split_hash"] != split["hash"]).any():
            theirs = sorted(set(rows["split_hash"]))
            rows = rows.assign(status="failed", value=float("nan"),
                               status_reason=f"submitted for split hash {theirs[0]}, but this suite's "
                                             f"{split_id} of {dataset_id} has hash {split['hash']}: re-run "
                                             "on the current split")
            notes.append(f"{task}/{dataset_id}/{split_id}: split hash differs, rows marked failed")
        dataset = load_card(card_path(datasets_dir, dataset_id))
        rows["leakage"] = _leakage(card, dataset, datasets_dir, rows["leakage"])
        kept.append(rows)
    out = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=list(results.COLUMNS))
    return out, notes


def _leakage(card, dataset, datasets_dir, submitted: pd.Series) -> pd.Series:
    """Leakage from the card's corpus manifest (the runner's dataset-level check); a row the
    submitter marked ``leaked`` stays leaked."""
    from cellarena.data.leakage import leakage_status  # noqa: PLC0415

    status = leakage_status(card, {"card": dataset.model_dump_json()}, datasets_dir)[0]
    return submitted.where((submitted == "leaked") & (status != "no_corpus"), status)
