"""The CI plan on a real SLURM cluster (one node, on this machine: tests/local_slurm.py), through
Snakemake's SLURM executor plug-in and the repository's profile (workflow/profiles/slurm).

The run must give exactly the local run's scores, and a job cancelled with ``scancel`` while it runs
must be retried by the profile (``retries: 1``) so that the DAG still completes. Skipped only where a
cluster cannot be started (not root, or slurm-wlm, munge or bubblewrap missing: `.ci/run` installs
them); a cluster that is installed but does not come up fails.

Two command-line settings are the test cluster's, not the profile's: it has no accounting database,
so the plug-in reads job states from ``squeue`` (finished jobs stay listed for ``MinJobAge``), and
its first status check comes after 5 s instead of 40.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellarena import results
from cellarena.review import reference
from local_slurm import LocalSlurm, unavailable  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CANCELLED_RULE = "pretrain_transformer"  # the CI plan's longest job (about 40 s on 2 cores)
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(f"SLURM cannot start here: {reason}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
    except RuntimeError as exc:
        pytest.fail(f"SLURM is installed but the local cluster did not start: {exc}")
    yield slurm
    slurm.stop()


def _cancel_when_running(slurm: LocalSlurm, proc: subprocess.Popen, rule: str, after_s: float = 5,
                         timeout_s: float = 600) -> str:
    """Wait until a job of ``rule`` has run ``after_s`` seconds, scancel it, return its SLURM id."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for job in slurm.squeue():
            if job["comment"].startswith(f"rule_{rule}") and job["state"] == "RUNNING":
                first = seen.setdefault(job["job_id"], time.monotonic())
                if time.monotonic() - first >= after_s:
                    subprocess.run(["scancel", job["job_id"]], check=True, env=slurm.env)
                    return job["job_id"]
        time.sleep(0.5)
    raise AssertionError(f"no {rule} job ran for {after_s} s on the cluster (Snakemake exit: {proc.poll()})")


def _job_list(log: str, slurm: LocalSlurm) -> pd.DataFrame:
    """One row per SLURM job Snakemake submitted: rule, job id, final state, seconds it ran."""
    done = {j["JobId"]: j for j in slurm.completed_jobs()}
    rows = []
    for _, slurm_id, path in SUBMITTED.findall(log):
        rule = next((p[len("rule_"):] for p in Path(path).parts if p.startswith("rule_")), "?")
        j = done.get(slurm_id, {})
        start, end = (pd.Timestamp(j[k]) if j.get(k) not in (None, "Unknown") else pd.NaT for k in ("StartTime", "EndTime"))
        rows.append({"rule": rule, "slurm_job": int(slurm_id), "state": j.get("JobState", "?"),
                     "seconds": (end - start).total_seconds() if pd.notna(start) and pd.notna(end) else np.nan})
    return pd.DataFrame(rows)


def _same_scores(local: pd.DataFrame, cluster: pd.DataFrame) -> pd.DataFrame:
    """Rows whose status, versions, hash, value or interval differ between the two runs (NaN = NaN)."""
    cols = [*reference.KEY, *reference.EXACT, "value", "bootstrap_json"]
    merged = local[cols].merge(cluster[cols], on=reference.KEY, how="outer", suffixes=("_local", "_slurm"),
                               indicator=True)
    differs = merged["_merge"] != "both"
    for c in [*reference.EXACT, "bootstrap_json"]:
        differs |= merged[f"{c}_local"].astype(str) != merged[f"{c}_slurm"].astype(str)
    a, b = merged["value_local"].to_numpy(float), merged["value_slurm"].to_numpy(float)
    differs |= ~((a == b) | (np.isnan(a) & np.isnan(b)))
    return merged[differs]


def test_ci_plan_on_slurm_equals_the_local_run_and_a_cancelled_job_is_retried(cluster, ci_results, tmp_path,
                                                                               data_cache):
    out = tmp_path / "results"
    log_path = tmp_path / "snakemake.log"
    cmd = [sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/slurm",
           "--configfile", "workflow/config.ci.yaml", "--config", f"results_dir={out}",
           "--slurm-logdir", str(tmp_path / "slurm_logs"),
           # the test cluster's two settings (module docstring)
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5"]
    env = dict(cluster.env, CELLARENA_CACHE=str(data_cache))
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            cancelled = _cancel_when_running(cluster, proc, CANCELLED_RULE)
            rc = proc.wait(timeout=1200)
        finally:
            if proc.poll() is None:
                proc.kill()
    seconds = time.monotonic() - t0
    text = log_path.read_text()
    assert rc == 0, text[-6000:] + "\n" + cluster.logs()

    jobs = _job_list(text, cluster)
    print(f"\nthe CI plan on the local SLURM cluster: {seconds:.0f} s, {len(jobs)} SLURM jobs "
          f"({(jobs['state'] == 'COMPLETED').sum()} completed)\n{jobs.to_string(index=False)}")
    # every job went through the scheduler, the cancelled one was resubmitted and then completed
    assert len(jobs) >= 20 and set(jobs["rule"]) >= {"prepare_dataset", "run_annotation", "aggregate_scores"}
    retried = jobs[jobs["rule"] == CANCELLED_RULE].sort_values("slurm_job")
    assert list(retried["slurm_job"].astype(str))[0] == cancelled, retried
    assert list(retried["state"]) == ["CANCELLED", "COMPLETED"], retried
    assert (jobs.loc[jobs["rule"] != CANCELLED_RULE, "state"] == "COMPLETED").all(), jobs

    local = results.read(ci_results / "scores.parquet")
    slurm = results.read(out / "scores.parquet")
    assert (slurm["status"] == "ok").all(), slurm.loc[slurm["status"] != "ok", ["model_id", "status_reason"]]
    differs = _same_scores(local, slurm)
    assert differs.empty, differs.head(20).to_string()
    assert len(slurm) == len(local) > 300
