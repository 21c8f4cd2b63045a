"""Score regression: the CI plan (a subset of the default plan) must reproduce the committed reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from cellarena import results
from cellarena.review import reference

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
REF = REPO / "results" / "reference"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "workflow/config.ci.yaml"]


def _snakemake(results_dir: Path, data_cache: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SNAKEMAKE, "--config", f"results_dir={results_dir}", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, CELLARENA_CACHE=str(data_cache)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory, data_cache) -> Path:
    out = tmp_path_factory.mktemp("ci") / "results"
    _snakemake(out, data_cache)
    return out


def _compare(scores: Path) -> tuple[reference.Comparison, str]:
    comparison = reference.compare(reference.read_reference(REF), results.read(scores),
                                   reference.load_tolerances(REF / reference.TOLERANCES_FILE),
                                   reference.read_environment(REF))
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    reference.render(comparison, console)
    return comparison, console.export_text()


def test_ci_plan_reproduces_the_reference(ci_results):
    comparison, text = _compare(ci_results / "scores.parquet")
    assert comparison.ok, text
    # every task family, baselines, controls, a tuned baseline and an in-suite transformer were compared
    runs = results.read(ci_results / "scores.parquet").drop_duplicates(reference.RUN_KEY)
    assert set(runs["task"]) == {"annotation", "integration", "zero_shot", "perturbation"}
    assert {"baseline", "control", "transformer"} <= set(runs["model_kind"]) and "tuned" in set(runs["variant"])
    assert comparison.n_runs == len(runs) and comparison.n_compared > 300


def test_changing_a_baseline_default_fails_with_a_readable_diff(ci_results, tmp_path, data_cache):
    """A pull request that changes knn's default neighbour count: only knn's jobs re-run, and the
    regression check names knn's metrics with reference, new value and change."""
    shutil.copytree(ci_results, tmp_path / "results")  # copy2: modification times kept
    shutil.copytree(REPO / "models", tmp_path / "models")
    card = tmp_path / "models" / "knn" / "model.yaml"
    text = card.read_text()
    assert "  n_neighbors: 15\n" in text
    card.write_text(text.replace("  n_neighbors: 15\n", "  n_neighbors: 3\n"))
    proc = _snakemake(tmp_path / "results", data_cache, f"models_dir={tmp_path / 'models'}",
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


def test_compare_reports_missing_and_new_rows_and_status_changes():
    ref = reference.read_reference(REF)
    run = ref[reference.RUN_KEY].iloc[0]
    rows = ref[(ref[reference.RUN_KEY] == run).all(axis=1)].copy()
    scores = rows.assign(
        dataset_version=rows["dataset_version"].astype(int), label_quality="expert", seed=0, model_kind="baseline",
        leakage="no_corpus", leaked_fraction=float("nan"), metric_group="", higher_is_better=True,
        status_reason="", params_json="{}", tuning_json="{}", runtime_json="{}", n_train=1, n_test=1,
        suite_version="0.1.0", git_commit="abc", created_utc="", wall_s=1.0, peak_rss_mb=1.0, device="cpu",
        environment_json="{}")
    scores = results.validate(scores)
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
