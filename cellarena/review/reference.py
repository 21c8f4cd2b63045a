"""Committed reference results and the score-regression check.

``results/reference/`` holds the scores of the default offline plan (``scores.csv``: one line per
run x metric x subgroup, sorted, so that ``git diff`` shows exactly which numbers moved), the
environment they were made in (``environment.json``) and the per-metric tolerances
(``tolerances.yaml``).

``cellarena regress`` compares a scores table with the reference: every reference row of a run
the table contains must be there with the same status, dataset version, split hash and model
version, and a value within tolerance; rows the reference lacks are reported too. CI runs the
cheapest deterministic subset of the default plan (``workflow/config.ci.yaml``) and checks it
against the reference, so a change that moves any of its scores fails with a table of what moved.
``cellarena reference`` (``make reference``) rewrites the reference from a new run and prints the
same table, for the reviewer of the pull request that changes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cellarena.run.environment import differences
from cellarena.errors import CellarenaError

RUN_KEY = ["task", "dataset_id", "split_id", "model_id", "variant"]
KEY = [*RUN_KEY, "metric_id", "subgroup"]
EXACT = ["status", "dataset_version", "split_hash", "model_version"]
RECORDED = [*KEY, *EXACT, "value"]
SCORES_FILE, ENVIRONMENT_FILE, TOLERANCES_FILE = "scores.csv", "environment.json", "tolerances.yaml"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    abs: float = 1e-4
    rel: float = 0.0

    def allows(self, reference: float, value: float) -> bool:
        if np.isnan(reference) or np.isnan(value):
            return bool(np.isnan(reference) and np.isnan(value))
        return abs(value - reference) <= self.abs + self.rel * abs(reference)

    def __str__(self) -> str:
        return f"{self.abs:g}" + (f" + {self.rel:g}·|ref|" if self.rel else "")


@dataclasses.dataclass(frozen=True)
class Tolerances:
    default: Tolerance = Tolerance()
    metrics: dict = dataclasses.field(default_factory=dict)  # metric_id -> Tolerance

    def of(self, metric_id: str) -> Tolerance:
        return self.metrics.get(metric_id, self.default)


def load_tolerances(path: str | Path) -> Tolerances:
    """``default: {abs, rel}`` and ``metrics: {metric_id: {abs, rel}}``; a missing file gives the defaults."""
    path = Path(path)
    if not path.exists():
        return Tolerances()
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"default", "metrics"}
    if unknown:
        raise CellarenaError(f"unknown keys {sorted(unknown)}", where=path, fix="use `default:` and `metrics:`")
    try:
        return Tolerances(Tolerance(**(data.get("default") or {})),
                          {m: Tolerance(**t) for m, t in (data.get("metrics") or {}).items()})
    except TypeError as exc:
        raise CellarenaError(f"bad tolerance: {exc}", where=path, fix="each tolerance is {abs: x, rel: y}") from None


def reference_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The recorded columns of a scores table, sorted. Submitted rows are left out: the plan does
    not produce them."""
    df = scores[scores["variant"] != "submitted"][RECORDED].copy()
    return df.sort_values(KEY, kind="mergesort").reset_index(drop=True)


def read_reference(ref_dir: str | Path) -> pd.DataFrame:
    path = Path(ref_dir) / SCORES_FILE
    if not path.exists():
        raise CellarenaError("no reference results", where=path,
                             fix="make them with `make run` then `make reference`, and commit them")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in RECORDED if c not in df.columns]
    if missing:
        raise CellarenaError(f"columns {missing} are missing", where=path, fix="re-make it with `make reference`")
    df["value"] = pd.to_numeric(df["value"].mask(df["value"].str.lower().isin(["", "nan"])))
    df["dataset_version"] = df["dataset_version"].astype(int)
    return df


def write_reference(scores: pd.DataFrame, ref_dir: str | Path) -> Path:
    """Write ``scores.csv`` (values to 10 significant digits) and ``environment.json``.

    The runs of ``scores`` replace the reference's rows of the same runs; the reference's other runs
    are kept (so the CI subset can be updated alone; a full ``make run`` updates everything).
    """
    ref_dir = Path(ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    rows = reference_rows(scores)
    if (ref_dir / SCORES_FILE).exists():
        old = read_reference(ref_dir)
        runs_now = set(map(tuple, rows[RUN_KEY].drop_duplicates().to_numpy()))
        keep = np.array([tuple(r) not in runs_now for r in old[RUN_KEY].to_numpy()], dtype=bool)
        rows = pd.concat([old[keep], rows], ignore_index=True).sort_values(KEY, kind="mergesort")
    rows.to_csv(ref_dir / SCORES_FILE, index=False, float_format="%.10g")
    envs = Counter(e for e in scores["environment_json"] if e and e != "{}")
    env = json.loads(envs.most_common(1)[0][0]) if envs else {}
    commits = sorted(set(scores["git_commit"]))
    (ref_dir / ENVIRONMENT_FILE).write_text(json.dumps({"environment": env, "git_commits": commits,
                                                        "n_rows": len(rows)}, indent=1, sort_keys=True) + "\n")
    return ref_dir / SCORES_FILE


@dataclasses.dataclass
class Comparison:
    moved: pd.DataFrame  # rows in both whose value or exact fields differ beyond tolerance
    missing: pd.DataFrame  # reference rows of a compared run that the new table lacks
    added: pd.DataFrame  # rows of the new table that the reference lacks
    n_compared: int
    n_runs: int
    skipped_runs: int  # reference runs the new table does not contain (another plan)
    environment: list  # (what, reference, now) differences of the environment

    @property
    def ok(self) -> bool:
        return self.moved.empty and self.missing.empty and self.added.empty


def compare(reference: pd.DataFrame, scores: pd.DataFrame, tolerances: Tolerances,
            reference_environment: dict | None = None) -> Comparison:
    """Compare ``scores`` (a results table) with ``reference`` (:func:`read_reference`) on the runs
    that ``scores`` contains."""
    current = reference_rows(scores)
    runs_now = set(map(tuple, current[RUN_KEY].drop_duplicates().to_numpy()))
    in_plan = np.array([tuple(r) in runs_now for r in reference[RUN_KEY].to_numpy()], dtype=bool)
    skipped = len({tuple(r) for r in reference.loc[~in_plan, RUN_KEY].to_numpy()})
    # the exact fields compare as text: an outer merge would turn integers into floats where a side is missing
    ref = reference[in_plan].astype({c: str for c in EXACT})
    current = current.astype({c: str for c in EXACT})
    merged = ref.merge(current, on=KEY, how="outer", suffixes=("_ref", "_now"), indicator=True)
    both = merged[merged["_merge"] == "both"].copy()
    reasons = []
    for _, row in both.iterrows():
        why = [f"{c} {row[c + '_ref']} -> {row[c + '_now']}" for c in EXACT if str(row[c + "_ref"]) != str(row[c + "_now"])]
        if not tolerances.of(row["metric_id"]).allows(float(row["value_ref"]), float(row["value_now"])):
            why.append(f"beyond ±{tolerances.of(row['metric_id'])}")
        reasons.append("; ".join(why))
    both["why"] = reasons
    moved = both[both["why"] != ""].copy()
    moved["delta"] = moved["value_now"] - moved["value_ref"]
    moved = moved.reindex(moved["delta"].abs().sort_values(ascending=False, na_position="first").index)
    env_now = Counter(e for e in scores["environment_json"] if e and e != "{}")
    env = json.loads(env_now.most_common(1)[0][0]) if env_now else {}
    return Comparison(
        moved=moved.reset_index(drop=True),
        missing=merged[merged["_merge"] == "left_only"][KEY].reset_index(drop=True),
        added=merged[merged["_merge"] == "right_only"][KEY].reset_index(drop=True),
        n_compared=len(both), n_runs=len(runs_now), skipped_runs=skipped,
        environment=differences(reference_environment, env) if reference_environment and env else [])


def read_environment(ref_dir: str | Path) -> dict:
    path = Path(ref_dir) / ENVIRONMENT_FILE
    return json.loads(path.read_text()).get("environment", {}) if path.exists() else {}


def render(comparison: Comparison, console, max_rows: int = 40) -> None:
    """Print the comparison as tables (rich)."""
    from rich.table import Table  # noqa: PLC0415

    c = comparison
    if c.ok:
        console.print(f"[green]scores match the reference[/green]: {c.n_compared} values of {c.n_runs} runs "
                      f"within tolerance ({c.skipped_runs} reference runs not in this table)")
    else:
        console.print(f"[red]scores moved[/red]: {len(c.moved)} of {c.n_compared} values beyond tolerance, "
                      f"{len(c.missing)} reference rows missing, {len(c.added)} rows not in the reference "
                      f"({c.n_runs} runs compared)")
    if not c.moved.empty:
        table = Table(title="moved (largest change first)")
        for col in ("task", "dataset", "split", "model", "variant", "metric", "subgroup", "reference", "now", "Δ",
                    "why"):
            table.add_column(col)
        for _, r in c.moved.head(max_rows).iterrows():
            table.add_row(r["task"], r["dataset_id"], r["split_id"], r["model_id"], r["variant"], r["metric_id"],
                          r["subgroup"], f"{r['value_ref']:.6g}", f"{r['value_now']:.6g}", f"{r['delta']:+.6g}",
                          r["why"])
        console.print(table)
        if len(c.moved) > max_rows:
            console.print(f"... and {len(c.moved) - max_rows} more")
    for name, frame in (("missing from this table", c.missing), ("not in the reference", c.added)):
        if not frame.empty:
            runs = frame.groupby(RUN_KEY, sort=True).size().reset_index(name="rows")
            table = Table(title=f"rows {name}")
            for col in (*RUN_KEY, "rows"):
                table.add_column(col)
            for r in runs.head(max_rows).itertuples(index=False):
                table.add_row(*map(str, r))
            console.print(table)
    if c.environment and not c.ok:
        table = Table(title="environment: reference vs this run (where to look first)")
        for col in ("what", "reference", "now"):
            table.add_column(col)
        for row in c.environment:
            table.add_row(*row)
        console.print(table)
    if not c.ok:
        console.print("If the change is intended: `make run`, then `make reference`, and commit "
                      "results/reference/ so the reviewer reads the diff.")
