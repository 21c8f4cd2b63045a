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

A reference must be reproducible from the commit it is committed with, so ``make reference`` refuses
(:func:`check_provenance`) a scores table whose rows come from several commits (results of an older
commit were reused), from a dirty tree (``git_commit`` ends in ``-dirty``, see
``cellarena.run.setup.git_commit``) or from a commit other than ``HEAD``, and a checkout whose tracked
files outside ``results/`` differ from ``HEAD``. ``environment.json`` records the one commit that made
it. ``--allow-dirty`` (tests and development only) writes it anyway and records why it must not be
committed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
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
DIRTY = "-dirty"  # what cellarena.run.setup.git_commit appends when tracked files differ from HEAD
RESULTS_DIR = "results/"  # run outputs and the reference itself: not part of the code a commit names
# every ignored file under results/ is a run output (.gitignore: results/* but results/reference/), so
# this reruns every job at the current commit and keeps the reference
RERUN = "`git clean -fdX results/ && make run`, then `make reference`"


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


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def repo_of(path: str | Path) -> Path | None:
    """The top of the git checkout that holds ``path`` (which need not exist yet); None outside git."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    try:
        return Path(_git(path if path.is_dir() else path.parent, "rev-parse", "--show-toplevel").strip())
    except (OSError, subprocess.CalledProcessError):
        return None


def changed_files(repo: Path) -> list[str]:
    """Tracked files that differ from ``HEAD`` (staged or not), outside ``results/``: ``"XY path"``."""
    entries = _git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=no").split("\0")
    changed, i = [], 0
    while i < len(entries):
        entry, i = entries[i], i + 1
        if not entry:
            continue
        status, paths = entry[:2], [entry[3:]]
        if status[0] in "RC" and i < len(entries):  # a rename or copy: the next entry is its source
            paths.append(entries[i])
            i += 1
        if any(not p.startswith(RESULTS_DIR) for p in paths):
            changed.append(f"{status.strip()} {' <- '.join(paths)}")
    return changed


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a scores table came from. ``commit``: the one commit that made the reference's rows
    (the full sha of ``HEAD`` when every check passed), None when there is no single one.
    ``rows_per_commit``: the ``git_commit`` values of those rows and their counts. ``problems``:
    why the table must not become the committed reference (empty when it may)."""

    commit: str | None
    rows_per_commit: dict
    problems: tuple = ()


def _listed(counts: dict, limit: int = 10) -> str:
    items = [f"{c} ({n} rows)" for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return ", ".join(items[:limit]) + (f", and {len(items) - limit} more" if len(items) > limit else "")


def provenance_problems(scores: pd.DataFrame, repo: Path | None, *,
                        where: str | Path = "scores table") -> tuple[Provenance, list[CellarenaError]]:
    """Everything that makes ``scores`` unfit to be the reference committed in ``repo``, each as an
    error that names the file, what was found and the fix."""
    rows = scores[scores["variant"] != "submitted"]
    counts = {str(c): int(n) for c, n in Counter(rows["git_commit"].astype(str)).items()}
    found: list[CellarenaError] = []
    if not counts:
        found.append(CellarenaError("no rows of the plan's runs (submitted rows are not part of the reference)",
                                    where=where, fix=f"make the table with {RERUN}"))
    if len(counts) > 1:
        found.append(CellarenaError(
            f"rows come from {len(counts)} git commits: {_listed(counts)}; a reference is one run of one "
            f"commit (results of other commits were reused)", where=where,
            fix=f"rerun every job from one clean commit: {RERUN} (`git clean -fdX results/` removes every "
                f"run output under results/ and keeps results/reference/; for a table elsewhere, remove its "
                f"results folder)"))
    dirty = {c: n for c, n in counts.items() if c.endswith(DIRTY)}
    if dirty:
        found.append(CellarenaError(
            f"rows were made from a tree with uncommitted changes: {_listed(dirty)}", where=where,
            fix=f"commit your changes, then {RERUN} from a clean tree"))
    unknown = {c: n for c, n in counts.items() if c in ("", "unknown")}
    if unknown:
        found.append(CellarenaError(
            f"rows have no git commit: {_listed(unknown)} (made outside a git checkout)", where=where,
            fix=f"run the plan in a clone of the suite: {RERUN}"))
    if repo is None:
        found.append(CellarenaError("not inside a git checkout, so the reference cannot name a commit",
                                    where=where, fix="make the reference in a clone of the suite"))
        return Provenance(next(iter(counts)) if len(counts) == 1 else None, counts, ()), found
    try:
        head = _git(repo, "rev-parse", "HEAD").strip()
        changed = changed_files(repo)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        found.append(CellarenaError(f"git cannot tell the checkout's commit: {detail.strip()}", where=repo,
                                    fix="make the reference in a clone of the suite with at least one commit"))
        return Provenance(None, counts, ()), found
    others = {c: n for c, n in counts.items()
              if c not in unknown and not (len(c.removesuffix(DIRTY)) >= 7 and head.startswith(c.removesuffix(DIRTY)))}
    if others:
        found.append(CellarenaError(
            f"rows were made at commit(s) {_listed(others)}, but the checkout is at {head[:12]} (HEAD)",
            where=where, fix=f"the reference must come from the commit it is committed with: {RERUN} at HEAD"))
    if changed:
        shown = ", ".join(changed[:10]) + (f", and {len(changed) - 10} more" if len(changed) > 10 else "")
        found.append(CellarenaError(
            f"tracked files outside results/ differ from HEAD {head[:12]}: {shown}", where=repo,
            fix=f"commit your changes (or revert them), then {RERUN} from the clean tree"))
    commit = head if not found else (next(iter(counts)) if len(counts) == 1 else None)
    return Provenance(commit, counts, ()), found


def check_provenance(scores: pd.DataFrame, repo: Path | None, *, where: str | Path = "scores table",
                     allow_dirty: bool = False) -> Provenance:
    """The provenance of a table that may become the committed reference; raises the first
    problem found (:func:`provenance_problems`, the others appended) unless ``allow_dirty``, which
    is for tests and development only: its problems are recorded in ``environment.json`` and such a
    reference must never be committed."""
    provenance, found = provenance_problems(scores, repo, where=where)
    if found and not allow_dirty:
        first, others = found[0], found[1:]
        message = f"refusing to write the reference: {first.message}"
        if others:  # each problem with its own fix, in order
            message += f"\n  fix: {first.fix}" + "".join(
                f"\n  also: {e}".replace("\n  fix:", "\n    fix:") for e in others)
        raise CellarenaError(message, where=first.where, fix=None if others else first.fix)
    return dataclasses.replace(provenance, problems=tuple(str(e) for e in found))


def write_reference(scores: pd.DataFrame, ref_dir: str | Path, provenance: Provenance) -> Path:
    """Write ``scores.csv`` (values to 10 significant digits) and ``environment.json``.

    ``provenance`` comes from :func:`check_provenance`. The runs of ``scores`` replace the
    reference's rows of the same runs; the reference's other runs are kept (so the CI subset can be
    updated alone; a full ``make run`` updates everything), and ``environment.json`` says how many
    rows were kept and from which commit.
    ``environment.json``: ``git_commit`` (the one commit that made the rows written now),
    ``git_commits`` (their ``git_commit`` values and row counts), ``n_rows``, ``environment``, and
    ``kept_rows``/``kept_from`` or ``not_for_commit`` (the problems ``--allow-dirty`` let through)
    where they apply.
    """
    ref_dir = Path(ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    rows = reference_rows(scores)
    kept = 0
    kept_from = None
    if (ref_dir / SCORES_FILE).exists():
        old = read_reference(ref_dir)
        runs_now = set(map(tuple, rows[RUN_KEY].drop_duplicates().to_numpy()))
        keep = np.array([tuple(r) not in runs_now for r in old[RUN_KEY].to_numpy()], dtype=bool)
        kept = int(keep.sum())
        if kept and (ref_dir / ENVIRONMENT_FILE).exists():
            before = json.loads((ref_dir / ENVIRONMENT_FILE).read_text())
            kept_from = before.get("git_commit") or before.get("git_commits")
        rows = pd.concat([old[keep], rows], ignore_index=True).sort_values(KEY, kind="mergesort")
    rows.to_csv(ref_dir / SCORES_FILE, index=False, float_format="%.10g")
    envs = Counter(e for e in scores["environment_json"] if e and e != "{}")
    env = json.loads(envs.most_common(1)[0][0]) if envs else {}
    record = {"environment": env, "git_commit": provenance.commit, "git_commits": provenance.rows_per_commit,
              "n_rows": len(rows)}
    if kept:
        record.update(kept_rows=kept, kept_from=kept_from)
    if provenance.problems:
        record["not_for_commit"] = list(provenance.problems)
    (ref_dir / ENVIRONMENT_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
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
