"""Hostile plug-ins (real model folders in tests/hostile_models/) end as `failed` rows with the reason,
in `cellarena run` and in `cellarena validate`: none of them scores, stops the runner or hangs it.

The label reader is the cheat of issue 18: in the runner's process it found the prepared file on the
command line and scored accuracy 1.0. In the sandbox (bubblewrap) it finds nothing and fails. CI
installs bubblewrap (.ci/run), so there the sandbox is required, not skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cellarena.review.validate import validate_model
from cellarena.run import run_task
from cellarena.run.sandbox import isolation_mode

HOSTILE = Path(__file__).resolve().parent / "hostile_models"


def _sandboxed() -> None:
    """Skip where bubblewrap cannot run, except in CI, where its absence is a failure."""
    if isolation_mode() != "bubblewrap":
        if os.environ.get("CI"):
            pytest.fail("bubblewrap cannot run on this CI machine: .ci/run installs it (apt-get install bubblewrap)")
        pytest.skip("bubblewrap cannot run here: plug-ins run as plain child processes")


def _run(model: str, prepared, split, **job):
    t0 = time.monotonic()
    rows = run_task("annotation", prepared, split, HOSTILE / model, seed=0, **job)
    return rows, time.monotonic() - t0


def _failed(rows) -> str:
    assert set(rows["status"]) == {"failed"}, rows[["metric_id", "status", "value"]]
    assert rows["value"].isna().all()
    (reason,) = set(rows["status_reason"])
    return reason


def test_the_label_reader_finds_no_labels_in_the_sandbox(pbmc68k_prepared, pbmc68k_split):
    _sandboxed()
    rows, _ = _run("label_reader", pbmc68k_prepared, pbmc68k_split)
    reason = _failed(rows)
    assert "FileNotFoundError: label_reader found no file holding the test labels" in reason, reason


def test_without_the_sandbox_the_label_reader_does_cheat(pbmc68k_prepared, pbmc68k_split, monkeypatch):
    """The control of the test above: in a plain child process (no bubblewrap) the same plug-in finds the
    prepared file on disk and scores 1.0, which is what the README says a plain process cannot stop."""
    monkeypatch.setenv("CELLARENA_SANDBOX", "process")
    rows, _ = _run("label_reader", pbmc68k_prepared, pbmc68k_split)
    ok = rows[rows["status"] == "ok"].set_index("metric_id")["value"]
    assert len(ok) == len(rows) and ok["accuracy"] == 1.0, rows[["metric_id", "status", "status_reason"]]


def test_the_label_reader_fails_validate(tiny):
    _sandboxed()
    report = validate_model(HOSTILE / "label_reader", data=tiny)
    failed = [c for c in report.checks if c.status == "fail"]
    assert not report.ok and any(c.name == "annotation" for c in failed), report.text()
    assert "found no file holding the test labels" in report.text()


def test_a_sleeper_is_stopped_at_its_time_limit(pbmc68k_prepared, pbmc68k_split):
    rows, seconds = _run("sleeper", pbmc68k_prepared, pbmc68k_split)
    reason = _failed(rows)
    assert "timed out after 5 s" in reason, reason
    assert seconds < 60  # the card's 5 s, plus starting the child and writing rows


def test_the_job_time_limit_applies_when_the_card_sets_none(pbmc68k_prepared, pbmc68k_split, tmp_path):
    import shutil

    folder = tmp_path / "sleeper"
    shutil.copytree(HOSTILE / "sleeper", folder)
    card = folder / "model.yaml"
    card.write_text(card.read_text().replace(", time_limit_s: 5", ""))
    rows = run_task("annotation", pbmc68k_prepared, pbmc68k_split, folder, seed=0, time_limit_s=3)
    assert "timed out after 3 s" in _failed(rows)


def test_os_exit_is_a_failed_run_not_a_dead_runner(pbmc68k_prepared, pbmc68k_split):
    rows, _ = _run("os_exit", pbmc68k_prepared, pbmc68k_split)
    reason = _failed(rows)
    assert "exited with code 3 before answering" in reason, reason


def test_sys_exit_is_a_failed_run(pbmc68k_prepared, pbmc68k_split):
    rows, _ = _run("sys_exit", pbmc68k_prepared, pbmc68k_split)
    reason = _failed(rows)
    assert "sys.exit(0)" in reason, reason


def test_nan_predictions_are_a_failed_run(pbmc68k_prepared, pbmc68k_split):
    rows, _ = _run("nan_labels", pbmc68k_prepared, pbmc68k_split)
    assert "predict returned NaN labels" in _failed(rows)


@pytest.mark.parametrize("model, says", [("sleeper", "timed out after"), ("os_exit", "exited with code 3"),
                                         ("sys_exit", "sys.exit(0)"), ("nan_labels", "NaN labels")])
def test_validate_fails_each_hostile_plugin_with_the_reason(model, says, tiny):
    # the sleeper's card sets 5 s; the others get a limit that a loaded machine cannot reach by starting up
    report = validate_model(HOSTILE / model, data=tiny, time_limit_s=120)
    assert not report.ok, report.text()
    assert says in report.text(), report.text()


def test_in_one_job_each_hostile_model_costs_its_own_rows_only(pbmc68k_prepared, pbmc68k_split, tmp_path):
    """A job of several models (the workflow's batch: one read of the data, one sandbox host forking a
    process per model): exits, crashes, a time-out and a model that kills the host each fail their
    own run, and the honest models between them score exactly what they score alone."""
    import subprocess
    import sys

    from cellarena import results

    repo = Path(__file__).resolve().parent.parent
    order = [repo / "models" / "majority_class", HOSTILE / "os_exit", HOSTILE / "host_killer", repo / "models" / "knn",
             HOSTILE / "sleeper", HOSTILE / "sys_exit", HOSTILE / "nan_labels", repo / "models" / "logistic_regression"]
    args = [sys.executable, "-m", "cellarena", "run", "--task", "annotation", "--prepared", str(pbmc68k_prepared),
            "--split", str(pbmc68k_split), "--seed", "0", "--threads", "1"]
    for folder in order:
        args += ["--model", str(folder), "--out", str(tmp_path / f"{folder.name}.parquet")]
    t0 = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 120  # the sleeper's 5 s limit, not its hour
    rows = {f.name: results.read(tmp_path / f"{f.name}.parquet") for f in order}
    reasons = {name: _failed(r) for name, r in rows.items() if name in {f.name for f in order if f.parent == HOSTILE}}
    assert "exited with code 3" in reasons["os_exit"], reasons
    assert "PluginExited: the plug-in's process " in reasons["host_killer"], reasons
    assert "timed out after 5 s" in reasons["sleeper"], reasons
    assert "sys.exit" in reasons["sys_exit"], reasons
    for name in ("majority_class", "knn", "logistic_regression"):
        alone = run_task("annotation", pbmc68k_prepared, pbmc68k_split, repo / "models" / name, seed=0, threads=1)
        assert set(rows[name]["status"]) == {"ok"}, rows[name]["status_reason"]
        assert rows[name]["value"].tolist() == alone["value"].tolist(), name
