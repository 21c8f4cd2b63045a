"""Tuning: search spaces in cards, training-cells-only objective, determinism, resuming a killed study."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from cellarena import results
from cellarena.errors import CardError, DataError
from cellarena.cards.model import load_model_card
from cellarena.run import run_task
from cellarena.data.splits import read_split
from cellarena.cards.model import ParamRange
from cellarena.run.setup import Job
from cellarena.run.tuning import TuningBudget, tune
from cellarena.run.tuning_record import read_record

# A kNN on PCA that writes every cell it is shown (and with which labels) to a file, and sleeps a
# little per fit so that a test can kill it mid-study.
RECORDING = '''\
import json, os, time
import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from cellarena.data.features import LogPCA
from cellarena.plugin import BaseModel


class Model(BaseModel):
    def _log(self, what, adata):
        path = os.environ.get("CELLARENA_TEST_SEEN")
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps({"what": what, "cells": list(map(str, adata.obs_names)),
                                     "columns": list(adata.obs.columns)}) + "\\n")

    def fit(self, train, labels):
        self._log("fit", train)
        time.sleep(float(self.params["sleep_s"]))
        self._pca = LogPCA(int(self.params["n_comps"]), 500, self.context.seed)
        z = self._pca.fit_transform(train)
        self._clf = KNeighborsClassifier(n_neighbors=min(int(self.params["k"]), len(labels)),
                                         weights=self.params["weights"]).fit(z, labels)

    def predict(self, test, *, solution=None):
        self._log("predict", test)
        return self._clf.predict(self._pca.transform(test))
'''
CARD = '''\
id: {id}
version: "0.1"
name: recording knn
kind: baseline
tasks: [annotation]
citation: test
licence: MIT
params: {{k: 15, weights: uniform, n_comps: 20, sleep_s: {sleep}}}
search_space:
  k: {{type: int, low: 1, high: 40, log: true}}
  weights: {{type: categorical, choices: [uniform, distance]}}
  n_comps: {{type: int, low: 5, high: 40}}
'''
BUDGET = TuningBudget(n_trials=5, inner_folds=3, max_cells=300)


def _model(tmp_path, model_id="recorder", sleep=0.0):
    folder = tmp_path / "models" / model_id
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text(CARD.format(id=model_id, sleep=sleep))
    (folder / "model.py").write_text(RECORDING)
    return folder


@pytest.fixture(scope="module")
def split(pbmc68k_split):
    data = read_split(pbmc68k_split)
    return {"path": pbmc68k_split, "train": set(data["train"]), "test": set(data["test"])}


# --------------------------------------------------------------------------------------------------
# search spaces in model cards
# --------------------------------------------------------------------------------------------------

def test_param_range_rules():
    assert ParamRange(type="float", low=1e-3, high=1.0, log=True).contains(0.1)
    assert not ParamRange(type="int", low=1, high=5).contains(2.5)
    assert ParamRange(type="categorical", choices=["a", "b"]).contains("b")
    for bad in ({"type": "float", "low": 1.0, "high": 1.0}, {"type": "float", "low": 0.0, "high": 1.0, "log": True},
                {"type": "categorical", "choices": []}, {"type": "int", "low": 1, "high": 5, "choices": [1]}):
        with pytest.raises(ValueError):
            ParamRange.model_validate(bad)


def test_card_with_default_outside_its_range_names_the_fix(tmp_path):
    folder = _model(tmp_path)
    card = folder / "model.yaml"
    card.write_text(card.read_text().replace("k: {type: int, low: 1, high: 40", "k: {type: int, low: 20, high: 40"))
    with pytest.raises(CardError) as err:
        load_model_card(folder)
    text = str(err.value)
    assert "model.yaml" in text and "search_space.k" in text and "widen the range or change the default" in text


def test_every_shipped_search_space_is_valid(repo):
    tuned = {m: load_model_card(repo / "models" / m) for m in
             ("logistic_regression", "xgboost", "knn", "scvi", "sctab", "sctab_mlp", "sctab_linear")}
    assert all(card.search_space for card in tuned.values())


# --------------------------------------------------------------------------------------------------
# the objective sees training cells only
# --------------------------------------------------------------------------------------------------

def test_tuning_never_touches_the_test_split(pbmc68k_prepared, split, tmp_path, monkeypatch):
    seen_file = tmp_path / "seen.jsonl"
    monkeypatch.setenv("CELLARENA_TEST_SEEN", str(seen_file))
    monkeypatch.setenv("CELLARENA_SANDBOX_WRITABLE", str(tmp_path))  # the sandbox lets the recorder write here
    record = tune("annotation", Job.of(pbmc68k_prepared, split["path"], _model(tmp_path), seed=0), budget=BUDGET, out=tmp_path / "best.json")
    assert record["status"] == "ok" and record["n_trials"] == 5
    seen = [json.loads(line) for line in seen_file.read_text().splitlines()]
    assert len(seen) == 2 * 5 * 3  # fit + predict, per trial, per inner fold
    cells = set().union(*(s["cells"] for s in seen))
    assert not cells & split["test"], "tuning showed the model test cells"
    assert cells <= split["train"] and len(cells) == 300  # the max_cells subsample of the training cells
    # the inner validation cells come without their labels
    assert all("cell_type" not in s["columns"] for s in seen if s["what"] == "predict")
    assert record["best_params"].keys() == {"k", "weights", "n_comps"}
    assert record["trials"][0]["default"] and record["trials"][0]["params"] == {"k": 15, "weights": "uniform",
                                                                                 "n_comps": 20}
    assert record["default_value"] == record["trials"][0]["value"]


def test_same_seed_same_best_params(pbmc68k_prepared, split, tmp_path):
    model = _model(tmp_path)
    runs = [tune("annotation", Job.of(pbmc68k_prepared, split["path"], model, seed=seed), budget=BUDGET, out=tmp_path / f"run{i}" / "best.json") for i, seed in enumerate((0, 0, 1))]
    a, b, c = runs
    assert a["best_params"] == b["best_params"] and a["best_value"] == b["best_value"]
    assert [(t["params"], t["value"]) for t in a["trials"]] == [(t["params"], t["value"]) for t in b["trials"]]
    assert [t["params"] for t in a["trials"][1:]] != [t["params"] for t in c["trials"][1:]]


def test_tuned_run_uses_best_params_and_records_the_tuning(pbmc68k_prepared, split, tmp_path):
    model = _model(tmp_path)
    record = tune("annotation", Job.of(pbmc68k_prepared, split["path"], model, seed=0), budget=BUDGET, out=tmp_path / "best.json")
    rows = run_task("annotation", pbmc68k_prepared, split["path"], model, seed=0, tuning=read_record(tmp_path / "best.json"))
    assert set(rows.variant) == {"tuned"} and (rows.status == "ok").all()
    params = json.loads(rows.params_json.iloc[0])
    assert {k: params[k] for k in record["best_params"]} == record["best_params"]
    tuning = json.loads(rows.tuning_json.iloc[0])
    assert tuning["n_trials"] == 5 and tuning["budget"]["max_cells"] == 300 and tuning["metric"] == "macro_f1"
    default = run_task("annotation", pbmc68k_prepared, split["path"], model, seed=0)
    assert set(default.variant) == {"default"} and set(default.tuning_json) == {"{}"}
    both = results.validate(__import__("pandas").concat([rows, default]))  # side by side in one table
    assert len(both) == len(rows) + len(default)


def test_tuning_record_for_another_split_is_refused(pbmc68k_prepared, split, tmp_path):
    model = _model(tmp_path)
    tune("annotation", Job.of(pbmc68k_prepared, split["path"], model, seed=0), budget=TuningBudget(n_trials=1), out=tmp_path / "best.json")
    record = read_record(tmp_path / "best.json")
    record["split_hash"] = "0" * 16
    with pytest.raises(DataError, match="re-run `cellarena tune`"):
        run_task("annotation", pbmc68k_prepared, split["path"], model, seed=0, tuning=record)


def test_failed_tuning_gives_failed_tuned_rows(pbmc68k_prepared, split, tmp_path):
    model = _model(tmp_path)
    (model / "model.py").write_text(RECORDING.replace('self._log("fit", train)', 'raise ValueError("bad fit")'))
    record = tune("annotation", Job.of(pbmc68k_prepared, split["path"], model, seed=0), budget=TuningBudget(n_trials=2), out=tmp_path / "best.json")
    assert record["status"] == "failed" and "bad fit" in record["reason"] and record["n_trials"] == 2
    rows = run_task("annotation", pbmc68k_prepared, split["path"], model, seed=0, tuning=record)
    assert set(rows.status) == {"failed"} and rows.status_reason.iloc[0].startswith("tuning failed")


def test_model_without_search_space_is_not_applicable(pbmc68k_prepared, split, tmp_path, repo):
    record = tune("annotation", Job.of(pbmc68k_prepared, split["path"], repo / "models" / "majority_class", seed=0), budget=BUDGET, out=tmp_path / "best.json")
    assert record["status"] == "not_applicable" and "search_space" in record["reason"]


# --------------------------------------------------------------------------------------------------
# a killed study resumes
# --------------------------------------------------------------------------------------------------

def _complete_trials(db) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def test_killed_study_resumes_where_it_stopped(pbmc68k_prepared, split, tmp_path, repo):
    model = _model(tmp_path, sleep=0.5)
    budget = TuningBudget(n_trials=6, inner_folds=2, max_cells=200)
    out = tmp_path / "killed" / "best.json"
    cmd = [sys.executable, "-m", "cellarena", "tune", "--task", "annotation", "--prepared", str(pbmc68k_prepared),
           "--split", str(split["path"]), "--model", str(model), "--seed", "0", "--heartbeat", "1",
           "--budget", budget.model_dump_json(), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    db = out.with_suffix(".db")
    deadline = time.monotonic() + 120
    while _complete_trials(db) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # like a job killed by the scheduler, mid-trial
    proc.wait()
    done_before = _complete_trials(db)
    assert 3 <= done_before < 6 and not out.exists()
    time.sleep(2.5)  # past the grace period of two heartbeats: the interrupted trial is stale
    resumed = tune("annotation", Job.of(pbmc68k_prepared, split["path"], model, seed=0), budget=budget, out=out, heartbeat_s=1)
    assert resumed["status"] == "ok" and resumed["n_trials"] == 6
    assert resumed["resumed_with"] == done_before  # finished trials were kept, not re-run
    with sqlite3.connect(db) as con:
        states = dict(con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    assert states["COMPLETE"] == 6 and states.get("RUNNING", 0) == 0
    # the same parameters as a study that was never interrupted
    fresh = tune("annotation", Job.of(pbmc68k_prepared, split["path"], model, seed=0), budget=budget, out=tmp_path / "fresh" / "best.json")
    assert [t["params"] for t in resumed["trials"]] == [t["params"] for t in fresh["trials"]]
    assert resumed["best_params"] == fresh["best_params"]


def test_trial_killed_before_its_first_heartbeat_is_failed_on_resume(tmp_path):
    # The window that once made CI fail: a process dies after optuna created its trial (RUNNING) but
    # before the heartbeat thread's first beat; optuna's own stale check never looks at such a trial.
    import optuna
    from optuna.trial import TrialState
    from cellarena.run.tuning import optimize

    url = f"sqlite:///{tmp_path / 'silent.db'}"
    space = {"x": ParamRange(type="float", low=0.0, high=1.0)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    orphan = optuna.create_study(study_name="s", storage=url, direction="maximize").ask()  # no heartbeat, ever
    live = optuna.create_study(study_name="s", storage=url, direction="maximize", load_if_exists=True)
    budget = TuningBudget(n_trials=3, inner_folds=2, max_cells=200)
    t0 = time.monotonic()
    young = optimize("s", url, "maximize", space, {"x": 0.5}, lambda p: p["x"], seed=0, budget=budget, heartbeat_s=1)
    # younger than the grace period, the orphan may be another worker's live trial: it holds the
    # budget's last place until the grace period (two heartbeats) is over, then is failed, and its
    # place taken
    assert time.monotonic() - t0 >= 2
    states = {t.number: t.state for t in live.get_trials(deepcopy=False)}
    assert states[orphan.number] == TrialState.FAIL
    assert young["n_trials"] == 3 and young["n_failed_trials"] == 0
    optimize("s", url, "maximize", space, {"x": 0.5}, lambda p: p["x"], seed=0,
             budget=TuningBudget(n_trials=4, inner_folds=2, max_cells=200), heartbeat_s=1)
    states = [t.state for t in live.get_trials(deepcopy=False)]
    assert states.count(TrialState.RUNNING) == 0 and states.count(TrialState.COMPLETE) == 4
    assert states[orphan.number] == TrialState.FAIL


def test_cli_tune_prints_progress(pbmc68k_prepared, split, tmp_path, repo):
    model = _model(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cellarena", "tune", "--task", "annotation", "--prepared",
                           str(pbmc68k_prepared), "--split", str(split["path"]), "--model", str(model), "--seed", "0",
                           "--budget", '{"n_trials": 3, "max_cells": 200}', "--out", str(tmp_path / "b.json")],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[tune recorder")]
    assert [line.split("trial ")[1].split(":")[0] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("best " in line for line in lines)
    assert "tuned recorder" in proc.stdout and "3 trials" in proc.stdout
    assert textwrap.dedent(proc.stdout).count("best params") == 1


def test_two_workers_share_one_study_within_the_budget(pbmc68k_prepared, split, tmp_path, repo):
    """Two `cellarena tune` processes (as two cluster jobs would) on one study in one shared storage:
    together they run exactly the budget's trials, each fit counted where it ran, and both report
    the whole study."""
    model = _model(tmp_path, sleep=0.4)  # 3 inner folds: about 1.3 s per trial, so the workers overlap
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    n_trials = 6
    procs = []
    for worker in ("a", "b"):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cellarena", "tune", "--task", "annotation", "--prepared", str(pbmc68k_prepared),
             "--split", str(split["path"]), "--model", str(model), "--seed", "0", "--storage", storage,
             "--heartbeat", "2", "--budget", json.dumps({"n_trials": n_trials, "inner_folds": 3, "max_cells": 300}),
             "--out", str(tmp_path / f"{worker}.json")],
            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, CELLARENA_TEST_SEEN=str(tmp_path / f"seen_{worker}.jsonl"),
                     CELLARENA_SANDBOX_WRITABLE=str(tmp_path))))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]

    fits = {w: sum(json.loads(line)["what"] == "fit" for line in (tmp_path / f"seen_{w}.jsonl").read_text().splitlines())
            for w in ("a", "b")}
    assert fits["a"] % 3 == 0 and fits["b"] % 3 == 0, fits
    assert fits["a"] > 0 and fits["b"] > 0, f"the workers did not share the study: {fits}"
    assert fits["a"] + fits["b"] == 3 * n_trials, f"trials run beyond the budget of {n_trials}: {fits}"

    import optuna
    from optuna.trial import TrialState

    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n_trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sum(bool(t.user_attrs.get("default")) and t.state == TrialState.COMPLETE for t in trials) == 1
    a, b = read_record(tmp_path / "a.json"), read_record(tmp_path / "b.json")
    assert a["n_trials"] == b["n_trials"] == n_trials
    assert a["best_params"] == b["best_params"] and a["best_value"] == b["best_value"]
