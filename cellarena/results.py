"""The long results table: one row per run x metric (x subgroup), the only thing the leaderboard reads.

Every job writes a small parquet file with these columns; ``aggregate`` validates and concatenates
them into ``results/scores.parquet``. Identifiers live in columns, never only in file paths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellarena.errors import CellarenaError
from cellarena.ids import is_valid_id
from cellarena.tasks import TASK_IDS

STATUSES = ("ok", "failed", "not_applicable")
MODEL_KINDS = ("baseline", "control", "transformer", "adapter")
VARIANTS = ("default", "tuned", "submitted")
LABEL_QUALITIES = ("expert", "silver", "synthetic", "none")
LEAKAGE = ("clean", "leaked", "unknown", "no_corpus")


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "str", "int", "float", "bool"
    description: str
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    is_id: bool = False
    default: str | None = None  # filled in when a file written before the column existed lacks it


SCHEMA: tuple[Column, ...] = (
    Column("task", "str", "task family", choices=TASK_IDS),
    Column("dataset_id", "str", "dataset card id", is_id=True),
    Column("dataset_version", "int", "dataset card version"),
    Column("label_quality", "str", "quality of the labels the metrics use", choices=LABEL_QUALITIES),
    Column("split_id", "str", "split id (scheme + seed)", is_id=True),
    Column("split_hash", "str", "sha256 (first 16 hex) of the split assignment"),
    Column("seed", "int", "seed of the split and of the model"),
    Column("model_id", "str", "model card id", is_id=True),
    Column("model_version", "str", "model card version"),
    Column("model_kind", "str", "baseline / control / transformer / adapter", choices=MODEL_KINDS),
    Column("variant", "str", "default parameters, tuned, or submitted results", choices=VARIANTS),
    Column("leakage", "str", "were the evaluation cells in the model's pretraining corpus? clean / "
                             "leaked / unknown; no_corpus for models that are not pretrained", choices=LEAKAGE),
    Column("leaked_fraction", "float", "fraction of the evaluation cells found in the corpus the model "
                                       "was trained on, where a cell-level check ran; else NaN", nullable=True),
    Column("metric_id", "str", "metric id", is_id=True),
    Column("metric_group", "str", "metric family within the task, e.g. 'bio' or 'batch'; '' if none"),
    Column("subgroup", "str", "'' for the whole test set, else e.g. the class of a per-class metric"),
    Column("value", "float", "metric value; NaN unless status is ok", nullable=True),
    Column("higher_is_better", "bool", "direction of the metric"),
    Column("status", "str", "ok / failed / not_applicable", choices=STATUSES),
    Column("status_reason", "str", "exception text or reason; '' when ok"),
    Column("params_json", "str", "model parameters used, as canonical JSON"),
    Column("tuning_json", "str", "tuned variant: the tuning that chose params_json (objective, budget, "
                                 "trials used, best and default inner-CV scores, study), canonical JSON; "
                                 "'{}' for the default variant", default="{}"),
    Column("runtime_json", "str", "how the model ran as the plug-in reported it (attention kernel, "
                                  "precision, checkpoint...), canonical JSON; '{}' if nothing"),
    Column("n_train", "int", "cells the model was fit on (0 if none; unassigned cells excluded)"),
    Column("n_test", "int", "cells scored (cells with an unassigned silver label excluded)"),
    Column("suite_version", "str", "cellarena version"),
    Column("git_commit", "str", "git commit of the suite ('unknown' outside a checkout)"),
    Column("created_utc", "str", "ISO-8601 UTC time the run finished"),
    Column("wall_s", "float", "wall seconds of the model's own work (fit + predict, or embed)", nullable=True),
    Column("peak_rss_mb", "float", "peak resident memory of the job process, MiB", nullable=True),
    Column("device", "str", "cpu, or the accelerator name"),
    Column("environment_json", "str", "what the run ran on: Python, the versions of the packages that compute "
                                      "scores, CPU model and count, GPU and CUDA (cellarena/run/environment.py), "
                                      "canonical JSON; '{}' if not recorded", default="{}"),
    Column("bootstrap_json", "str", "within-split bootstrap of value (overall rows of metrics that split into "
                                    "test units): the unit (cells / queries), their number and the metric on "
                                    "each resample, the same resamples for every model of the split "
                                    "(metrics/bootstrap.py), canonical JSON; '{}' where the metric does not "
                                    "split into units, for subgroups and for rows that are not ok",
           default="{}"),
)

COLUMNS: tuple[str, ...] = tuple(c.name for c in SCHEMA)
_BY_NAME = {c.name: c for c in SCHEMA}
# what a row written before a column existed gets for it
DEFAULTS: dict[str, str] = {c.name: c.default for c in SCHEMA if c.default is not None}


class SchemaError(CellarenaError):
    """A results table does not match the schema."""


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=df.index)
    for col in SCHEMA:
        s = df[col.name]
        if col.kind == "str":
            out[col.name] = s.astype(object).where(s.notna(), None)
        elif col.kind == "int":
            out[col.name] = s.astype("int64")
        elif col.kind == "float":
            out[col.name] = pd.to_numeric(s, errors="raise").astype("float64")
        elif col.kind == "bool":
            out[col.name] = s.astype(bool)
    return out.reset_index(drop=True)


def validate(df: pd.DataFrame, where: str | Path = "results table") -> pd.DataFrame:
    """Check ``df`` against :data:`SCHEMA` and return it with canonical dtypes and column order.

    Raises :class:`SchemaError` naming the offending column and rows.
    """
    added = {k: v for k, v in DEFAULTS.items() if k not in df.columns}
    if added:  # a file from before these columns existed: their default says "nothing recorded"
        df = df.assign(**added)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(
            f"missing columns {missing}", where=where,
            fix="write rows with cellarena.results.make_rows / the runner, which fill every column",
        )
    extra = [c for c in df.columns if c not in _BY_NAME]
    if extra:
        raise SchemaError(f"unknown columns {extra}", where=where,
                          fix=f"only these columns are allowed: {list(COLUMNS)}")
    try:
        out = _coerce(df[list(COLUMNS)])
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"a column has the wrong type: {exc}", where=where) from exc
    for col in SCHEMA:
        s = out[col.name]
        if not col.nullable and col.kind != "float" and s.isna().any():
            raise SchemaError(f"column {col.name!r} has missing values in rows "
                              f"{list(np.flatnonzero(s.isna().to_numpy())[:5])}", where=where)
        if col.choices is not None:
            bad = sorted(set(s.dropna()) - set(col.choices))
            if bad:
                raise SchemaError(f"column {col.name!r} has values {bad}; allowed: {list(col.choices)}",
                                  where=where)
        if col.is_id:
            bad = sorted({v for v in s.dropna() if not is_valid_id(v)})
            if bad:
                raise SchemaError(f"column {col.name!r} has invalid ids {bad[:5]} (snake_case required)",
                                  where=where)
    ok = out["status"] == "ok"
    if out.loc[ok, "value"].isna().any():
        raise SchemaError("rows with status 'ok' must have a value", where=where)
    if (out.loc[~ok, "status_reason"] == "").any():
        raise SchemaError("rows that are failed / not_applicable must give a status_reason", where=where)
    key = ["task", "dataset_id", "split_id", "model_id", "variant", "metric_id", "subgroup"]
    dup = out.duplicated(key, keep=False)
    if dup.any():
        first = out.loc[dup, key].iloc[0].to_dict()
        raise SchemaError(f"duplicate rows for {first}", where=where,
                          fix="each run x metric x subgroup must appear once")
    return out


def read(path: str | Path) -> pd.DataFrame:
    """Read and validate a results parquet file."""
    path = Path(path)
    if not path.exists():
        raise SchemaError("results file does not exist", where=path,
                          fix="run `make run` (or snakemake) to produce it")
    return validate(pd.read_parquet(path), where=path)


def from_text(df: pd.DataFrame, where: str | Path = "results table") -> pd.DataFrame:
    """Columns read as text (CSV with ``dtype=str, keep_default_na=False``) converted to the schema's
    kinds: '' is a missing number, 'True'/'False' are booleans."""
    out = df.copy()
    for col in SCHEMA:
        if col.name not in out or col.kind == "str":
            continue
        s = out[col.name].astype(str).str.strip()
        try:
            if col.kind == "float":
                out[col.name] = pd.to_numeric(s.mask(s.str.lower().isin(["", "nan"])), errors="raise")
            elif col.kind == "int":
                out[col.name] = pd.to_numeric(s, errors="raise")
            else:
                bad = sorted(set(s.str.lower()) - {"true", "false"})
                if bad:
                    raise ValueError(f"expected True or False, got {bad[:3]}")
                out[col.name] = s.str.lower() == "true"
        except ValueError as exc:
            raise SchemaError(f"column {col.name!r}: {exc}", where=where) from None
    return out


def read_table(path: str | Path) -> pd.DataFrame:
    """Read and validate a results table written as parquet or CSV (submitted results are CSV, so
    that a reviewer reads them in the pull request's diff)."""
    path = Path(path)
    if not path.exists():
        raise SchemaError("results file does not exist", where=path)
    if path.suffix == ".csv":
        try:
            raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as exc:
            raise SchemaError(f"not a readable CSV file: {exc}", where=path) from None
        return validate(from_text(raw, path), where=path)
    return read(path)


def write(df: pd.DataFrame, path: str | Path, *, unread: list[str] | None = None) -> pd.DataFrame:
    """Validate ``df`` and write it to ``path`` atomically: CSV (full float precision) when the name
    ends in .csv, else parquet. ``unread``: result files an aggregate left out and why, kept in the
    parquet file's metadata (:func:`unread_files`)."""
    path = Path(path)
    out = validate(df, where=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".csv":
        out.to_csv(tmp, index=False)
    elif unread:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(out, preserve_index=False)
        meta = {**(table.schema.metadata or {}), _UNREAD_KEY: json.dumps(unread).encode()}
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    else:
        out.to_parquet(tmp, index=False)
    tmp.replace(path)
    return out


_UNREAD_KEY = b"cellarena_unread"


def unread_files(path: str | Path) -> list[str]:
    """The result files the aggregate that wrote ``path`` could not read, each with the reason."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[_UNREAD_KEY]) if _UNREAD_KEY in meta else []


def aggregate(paths: list[str | Path], out_path: str | Path, logs: list[str | Path] | None = None) -> pd.DataFrame:
    """Validate each per-job file and write their concatenation (sorted, deterministic order).

    What exists is aggregated: a file that is missing (its job crashed before writing it) or does not
    validate is left out, and listed with the reason and its job's log (``logs``, in the order of
    ``paths``) in the returned frame's ``attrs["unread"]`` and in the written file's metadata, which
    ``cellarena summary`` prints. Raises only when no file can be read.
    """
    if logs is not None and len(logs) != len(paths):
        raise SchemaError(f"{len(logs)} logs for {len(paths)} result files", where=out_path,
                          fix="give one log per result file, in the same order")
    frames, unread = [], []
    for i, p in enumerate(paths):
        see = f"see its log {logs[i]}" if logs is not None else "see its job's log"
        if not Path(p).exists():
            unread.append(f"result file missing: {p} (the job crashed; {see})")
            continue
        try:
            frames.append(read(p))
        except (SchemaError, OSError, ValueError) as exc:  # pyarrow's errors are OSError/ValueError
            unread.append(f"result file unreadable: {p}: {exc} ({see})")
    if not frames:
        raise SchemaError("no per-job result files to aggregate", where=out_path,
                          fix="; ".join(unread) or "give the per-run result files")
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["task", "dataset_id", "split_id", "model_id", "variant", "metric_id",
                         "subgroup"], kind="mergesort").reset_index(drop=True)
    out = write(df, out_path, unread=unread)
    out.attrs["unread"] = unread
    return out


# Columns that describe the run (everything except the metric-specific ones).
RUN_COLUMNS: tuple[str, ...] = tuple(
    c for c in COLUMNS
    if c not in ("metric_id", "metric_group", "subgroup", "value", "higher_is_better", "bootstrap_json")
)


def make_rows(run: dict, values: dict[str, float | dict[str, float] | None],
              directions: dict[str, bool], groups: dict[str, str] | None = None,
              bootstrap: dict[str, str] | None = None) -> pd.DataFrame:
    """Build the long rows of one run.

    ``run`` holds every column of :data:`RUN_COLUMNS`. ``values`` maps metric id to a float, to a
    dict ``{subgroup: float}`` (per-class metrics), or to None (status not ok: the row gets NaN).
    ``directions`` maps metric id to ``higher_is_better``; ``groups`` optionally maps metric id
    to its metric group (default ''); ``bootstrap`` maps metric id to the ``bootstrap_json`` of its
    overall row (:func:`cellarena.metrics.bootstrap.encode`; default '{}').
    """
    run = {**{c: v for c, v in DEFAULTS.items() if c in RUN_COLUMNS}, **run}
    missing = [c for c in RUN_COLUMNS if c not in run]
    if missing:
        raise SchemaError(f"run description lacks {missing}", where="make_rows")
    rows = []
    for metric_id, val in values.items():
        items = val.items() if isinstance(val, dict) else [("", val)]
        for subgroup, v in items:
            row = {k: run[k] for k in RUN_COLUMNS}
            row.update(metric_id=metric_id, metric_group=(groups or {}).get(metric_id, ""),
                       subgroup=str(subgroup),
                       value=float("nan") if v is None else float(v),
                       higher_is_better=bool(directions[metric_id]),
                       bootstrap_json=(bootstrap or {}).get(metric_id, "{}") if subgroup == "" and v is not None
                       else "{}")
            rows.append(row)
    return validate(pd.DataFrame(rows, columns=list(COLUMNS)) if rows else
                    pd.DataFrame(columns=list(COLUMNS)), where="make_rows")
