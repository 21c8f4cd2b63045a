"""Score regression: the CI plan (a subset of the default plan) must reproduce the committed reference;
`cellarena reference` writes a reference only from one run of the clean HEAD."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from cellarena import results
from cellarena.cli import main
from cellarena.review import reference
from cellarena.run.setup import git_commit
from conftest import run_ci_plan  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parent.parent
REF = REPO / "results" / "reference"


def _compare(scores: Path) -> tuple[reference.Comparison, str]:
    comparison = reference.compare(reference.read_reference(REF), results.read(scores),
                                   reference.load_tolerances(REF / reference.TOLERANCES_FILE),
                                   reference.read_environment(REF))
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    reference.render(comparison, console)
    return comparison, console.export_text()


@pytest.mark.slow
def test_ci_plan_reproduces_the_reference(ci_results):
    comparison, text = _compare(ci_results / "scores.parquet")
    assert comparison.ok, text
    # every task family, baselines, controls, a tuned baseline and an in-suite transformer were compared
    runs = results.read(ci_results / "scores.parquet").drop_duplicates(reference.RUN_KEY)
    assert set(runs["task"]) == {"annotation", "integration", "zero_shot", "perturbation"}
    assert {"baseline", "control", "transformer"} <= set(runs["model_kind"]) and "tuned" in set(runs["variant"])
    assert comparison.n_runs == len(runs) and comparison.n_compared > 300


@pytest.mark.slow
def test_changing_a_baseline_default_fails_with_a_readable_diff(ci_results, tmp_path, data_cache):
    """A pull request that changes knn's default neighbour count: only knn's jobs re-run, and the
    regression check names knn's metrics with reference, new value and change."""
    shutil.copytree(ci_results, tmp_path / "results")  # copy2: modification times kept
    shutil.copytree(REPO / "models", tmp_path / "models")
    card = tmp_path / "models" / "knn" / "model.yaml"
    text = card.read_text()
    assert "  n_neighbors: 15\n" in text
    card.write_text(text.replace("  n_neighbors: 15\n", "  n_neighbors: 3\n"))
    proc = run_ci_plan(tmp_path / "results", data_cache, f"models_dir={tmp_path / 'models'}",
                      "--rerun-triggers", "mtime")
    assert "run_annotation" in proc.stdout + proc.stderr
    comparison, text = _compare(tmp_path / "results" / "scores.parquet")
    assert not comparison.ok
    assert set(comparison.moved["model_id"]) == {"knn"} and "default" in set(comparison.moved["variant"])
    assert {"accuracy", "macro_f1"} <= set(comparison.moved["metric_id"])
    assert comparison.missing.empty and comparison.added.empty
    assert "scores moved" in text and "knn" in text and "make reference" in text
    # the CLI says the same and exits 1
    proc = subprocess.run([sys.executable, "-m", "cellarena", "regress", "--scores",
                           str(tmp_path / "results" / "scores.parquet"), "--reference", str(REF)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1 and "moved (largest change first)" in proc.stdout


def _table(n_runs: int = 1, git_commit: str = "abc") -> pd.DataFrame:
    """A scores table of the committed reference's first ``n_runs`` runs, as a run would write it."""
    ref = reference.read_reference(REF)
    runs = ref[reference.RUN_KEY].drop_duplicates().head(n_runs)
    rows = ref.merge(runs, on=reference.RUN_KEY)
    scores = rows.assign(
        dataset_version=rows["dataset_version"].astype(int), label_quality="expert", seed=0, model_kind="baseline",
        leakage="no_corpus", leaked_fraction=float("nan"), metric_group="", higher_is_better=True,
        status_reason="", params_json="{}", tuning_json="{}", runtime_json="{}", n_train=1, n_test=1,
        suite_version="0.1.0", git_commit=git_commit, created_utc="", wall_s=1.0, peak_rss_mb=1.0, device="cpu",
        environment_json='{"python": "3.11.7"}')
    return results.validate(scores)


def test_compare_reports_missing_and_new_rows_and_status_changes():
    ref = reference.read_reference(REF)
    scores = _table(1)
    tol = reference.Tolerances()
    assert reference.compare(ref, scores, tol).ok
    first = scores.index[0]
    nudged = scores.copy()
    nudged.loc[first, "value"] += 0.5 * tol.default.abs  # within tolerance
    assert reference.compare(ref, nudged, tol).ok
    nudged.loc[first, "value"] += 2 * tol.default.abs
    moved = reference.compare(ref, nudged, tol).moved
    assert len(moved) == 1 and "beyond" in moved["why"].iloc[0]
    failed = scores.copy()
    failed.loc[first, ["status", "status_reason", "value"]] = ["failed", "boom", float("nan")]
    assert "status ok -> failed" in reference.compare(ref, failed, tol).moved["why"].iloc[0]
    dropped = scores.drop(index=first)
    assert len(reference.compare(ref, dropped, tol).missing) == 1
    extra = pd.concat([scores, scores.iloc[[0]].assign(metric_id="new_metric")], ignore_index=True)
    with_new = reference.compare(ref, extra, tol)
    assert len(with_new.added) == 1 and with_new.moved.empty  # a new row moves nothing else
    # per-metric tolerance
    loose = reference.Tolerances(metrics={scores.loc[first, "metric_id"]: reference.Tolerance(abs=1.0)})
    assert reference.compare(ref, nudged, loose).ok


# --- `cellarena reference` writes only a reference made in one run of the clean HEAD ---------------------

def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A git checkout with a committed code file and a committed results/reference/tolerances.yaml."""
    monkeypatch.delenv("CELLARENA_GIT_COMMIT", raising=False)
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    repo = tmp_path / "suite"
    (repo / "results" / "reference").mkdir(parents=True)
    _git(repo, "init", "--quiet")
    _git(repo, "config", "user.email", "test@example.org")
    _git(repo, "config", "user.name", "test")
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results" / "reference" / reference.TOLERANCES_FILE).write_text("default: {abs: 0.0001}\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "--quiet", "-m", "first")
    return repo


def _commit_change(repo: Path, text: str) -> None:
    (repo / "code.py").write_text(text)
    _git(repo, "commit", "--quiet", "-am", text)


def _reference(repo: Path, scores: pd.DataFrame, *extra: str) -> int:
    path = repo / "results" / "scores.parquet"
    results.write(scores, path)
    return main(["reference", "--scores", str(path), "--reference", str(repo / "results" / "reference"), *extra])


def _refused(capsys, repo: Path, scores: pd.DataFrame, *needles: str) -> str:
    """Refused with exit 2, an error naming the file, ``needles`` and the fix; nothing written."""
    assert _reference(repo, scores) == 2
    err = capsys.readouterr().err
    assert "refusing to write the reference" in err and "fix:" in err, err
    for needle in needles:
        assert needle in err, err
    assert not (repo / "results" / "reference" / reference.SCORES_FILE).exists()
    assert not (repo / "results" / "reference" / reference.ENVIRONMENT_FILE).exists()
    return err


def test_reference_from_one_run_of_the_clean_head_is_written_with_its_commit(checkout, capsys):
    head = _git(checkout, "rev-parse", "HEAD")
    sha = git_commit(checkout)
    assert sha and not sha.endswith(reference.DIRTY) and head.startswith(sha)
    scores = _table(2, git_commit=sha)
    # a submission's rows carry the submitter's commit and are not part of the reference
    submitted = _table(1, git_commit="feed1234").assign(variant="submitted")
    (checkout / "notes.txt").write_text("untracked files do not matter\n")
    assert _reference(checkout, pd.concat([scores, submitted], ignore_index=True)) == 0
    out = capsys.readouterr().out
    assert f"from commit {head[:12]}" in out and "commit it" in out
    written = reference.read_reference(checkout / "results" / "reference")
    assert len(written) == len(scores)
    env = json.loads((checkout / "results" / "reference" / reference.ENVIRONMENT_FILE).read_text())
    assert env["git_commit"] == head and env["git_commits"] == {sha: len(scores)}
    assert env["n_rows"] == len(scores) and env["environment"] == {"python": "3.11.7"}
    assert "not_for_commit" not in env and "kept_rows" not in env

    # the reference itself is under results/: a changed tracked file there does not make the tree dirty;
    # an update of one run at a new clean commit keeps the other run's rows and says so
    (checkout / "results" / "reference" / reference.TOLERANCES_FILE).write_text("default: {abs: 0.001}\n")
    _git(checkout, "add", "results/reference")
    _commit_change(checkout, "x = 2\n")
    one_run = _table(1, git_commit=git_commit(checkout))  # the run: clean
    (checkout / "results" / "reference" / reference.TOLERANCES_FILE).write_text("default: {abs: 0.01}\n")
    assert _git(checkout, "status", "--porcelain", "--untracked-files=no")  # dirty, but only under results/
    assert _reference(checkout, one_run) == 0
    capsys.readouterr()
    env = json.loads((checkout / "results" / "reference" / reference.ENVIRONMENT_FILE).read_text())
    assert env["git_commit"] == _git(checkout, "rev-parse", "HEAD") != head
    assert env["kept_rows"] == len(scores) - len(one_run) and env["kept_from"] == head
    assert env["n_rows"] == len(scores)


def test_reference_refuses_rows_of_several_commits(checkout, capsys):
    first = git_commit(checkout)
    _commit_change(checkout, "x = 2\n")
    second = git_commit(checkout)
    old, new = _table(1, git_commit=first), _table(2, git_commit=second)
    new = new[~new.set_index(reference.RUN_KEY).index.isin(old.set_index(reference.RUN_KEY).index)]
    err = _refused(capsys, checkout, pd.concat([old, new], ignore_index=True),
                   "scores.parquet", "2 git commits", f"{first} ({len(old)} rows)", f"{second} ({len(new)} rows)",
                   "git clean -fdX results/ && make run")
    assert err.startswith("error: ") and str(checkout / "results" / "scores.parquet") in err


def test_reference_refuses_rows_from_a_dirty_tree(checkout, capsys):
    (checkout / "code.py").write_text("x = 3\n")
    sha = git_commit(checkout)
    assert sha.endswith(reference.DIRTY)  # how a run marks a dirty tree
    _git(checkout, "checkout", "--quiet", "code.py")  # the tree is clean again; the rows are not
    scores = _table(1, git_commit=sha)
    _refused(capsys, checkout, scores, "scores.parquet", "uncommitted changes", f"{sha} ({len(scores)} rows)",
             "commit your changes", "from a clean tree")


def test_reference_refuses_a_dirty_checkout(checkout, capsys):
    scores = _table(1, git_commit=git_commit(checkout))
    (checkout / "code.py").write_text("x = 4\n")
    _refused(capsys, checkout, scores, str(checkout), "tracked files outside results/ differ from HEAD",
             "M code.py", "commit your changes")
    _git(checkout, "add", "code.py")  # staged counts too
    _refused(capsys, checkout, scores, "M code.py")


def test_reference_refuses_a_table_of_another_commit(checkout, capsys):
    old = git_commit(checkout)
    _commit_change(checkout, "x = 5\n")
    head = _git(checkout, "rev-parse", "HEAD")
    _refused(capsys, checkout, _table(1, git_commit=old), "scores.parquet", f"made at commit(s) {old}",
             f"checkout is at {head[:12]} (HEAD)", "at HEAD")
    _refused(capsys, checkout, _table(1, git_commit="unknown"), "no git commit", "clone of the suite")


def test_allow_dirty_writes_and_records_why_it_must_not_be_committed(checkout, capsys):
    first = git_commit(checkout)
    (checkout / "code.py").write_text("x = 6\n")
    scores = pd.concat([_table(1, git_commit=first), _table(2, git_commit=git_commit(checkout)).iloc[-3:]],
                       ignore_index=True)
    assert _reference(checkout, scores, "--allow-dirty") == 0
    out = capsys.readouterr().out
    assert "do NOT commit it" in out and "--allow-dirty let through" in out
    env = json.loads((checkout / "results" / "reference" / reference.ENVIRONMENT_FILE).read_text())
    assert env["git_commit"] is None  # no single commit made it
    assert env["git_commits"] == {first: len(scores) - 3, f"{first}{reference.DIRTY}": 3}
    problems = " ".join(env["not_for_commit"])
    assert "2 git commits" in problems and "uncommitted changes" in problems and "M code.py" in problems
    assert len(reference.read_reference(checkout / "results" / "reference")) == len(reference.reference_rows(scores))


def test_reference_outside_a_git_checkout_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("GIT_DIR", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    with pytest.raises(reference.CellarenaError, match="not inside a git checkout"):
        reference.check_provenance(_table(1, git_commit="abcdef123456"), reference.repo_of(tmp_path / "ref"),
                                   where="scores.parquet")
