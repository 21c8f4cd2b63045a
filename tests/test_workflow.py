"""The Snakemake DAG end to end on the tiny real dataset: outputs, failure isolation, incrementality."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cellarena import results

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
BROKEN = """\
from cellarena.plugin import BaseModel

class Model(BaseModel):
    def fit(self, train, labels):
        raise ValueError("deliberately broken plug-in")
"""


def _contributed_models(models: Path, repo: Path, prepared: Path, split: Path, work: Path) -> None:
    """Two pull requests: a model made from the template as CONTRIBUTING.md says (no config change:
    auto_models adds it), and a GPU-only model that submits results (run here with knn's code on the
    same split the plan makes, then `cellarena submit`)."""
    from cellarena.run import run_task  # noqa: PLC0415
    from cellarena.review.submission import make_submission  # noqa: PLC0415

    new = models / "nearest_centroid"
    shutil.copytree(repo / "models" / "_template", new)
    card = (new / "model.yaml").read_text()
    for old, value in {"id: my_model": "id: nearest_centroid", "name: TODO human-readable name shown on the "
                       "leaderboard": "name: Nearest centroid",
                       "TODO one paragraph: what the model is, what it is trained on, and how this plug-in uses it.":
                       "Nearest cell-type centroid in PCA space.",
                       "citation: TODO authors, title, journal or preprint server, year, DOI":
                       "citation: Tibshirani R et al. PNAS 99, 6567-6572 (2002)",
                       "licence: TODO SPDX id of the code and weights, e.g. MIT or Apache-2.0": "licence: MIT"}.items():
        card = card.replace(old, value)
    (new / "model.yaml").write_text(card)
    big = models / "big_model"
    big.mkdir()
    (big / "model.yaml").write_text((repo / "models" / "knn" / "model.yaml").read_text()
                                    .replace("id: knn", "id: big_model").replace("gpu: none", "gpu: required"))
    rows = run_task("annotation", prepared, split, repo / "models" / "knn", seed=0)
    results.write(rows.assign(model_id="big_model"), work / "big_model_run.parquet")
    make_submission(big, [work / "big_model_run.parquet"], datasets_dir=repo / "datasets")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, repo, data_cache, pbmc68k_prepared, pbmc68k_split):
    """A tiny plan: pbmc68k only, three real models plus a broken one, results in a temp dir."""
    tmp = tmp_path_factory.mktemp("wf")
    models = tmp / "models"
    for mid in ("knn", "majority_class", "positive_control", "pca", "random_embedding", "no_change",
                "additive", "replicate_half", "permuted_delta"):
        (models / mid).mkdir(parents=True)
        for f in ("model.yaml", "model.py"):
            (models / mid / f).write_text((repo / "models" / mid / f).read_text())
    (models / "broken").mkdir()
    (models / "broken" / "model.yaml").write_text(
        (repo / "models" / "knn" / "model.yaml").read_text().replace("id: knn", "id: broken"))
    (models / "broken" / "model.py").write_text(BROKEN)
    # an in-suite transformer, pretrained by the DAG on its corpus with a few steps only
    (models / "tiny_bin").mkdir()
    (models / "tiny_bin" / "model.py").write_text((repo / "models" / "tiny_bin" / "model.py").read_text())
    (models / "tiny_bin" / "model.yaml").write_text(
        (repo / "models" / "tiny_bin" / "model.yaml").read_text().replace("    epochs: 2\n", "    epochs: 1\n    max_steps: 3\n")
        .replace("finetune_min_steps: 100", "finetune_min_steps: 1"))
    config = {
        "plan": "tiny", "datasets": ["pbmc68k_reduced", "perturbseq_proxy"], "models_dir": str(models),
        "results_dir": str(tmp / "results"), "seeds": [0],
        "annotation": {"datasets": ["pbmc68k_reduced"],
                       "models": ["knn", "majority_class", "positive_control", "broken", "tiny_bin"],
                       "splits": {"stratified": {"scheme": "stratified", "test_fraction": 0.3}}},
        "integration": {"models": [], "datasets": []},
        "zero_shot": {"models": ["pca", "random_embedding", "tiny_bin"], "datasets": ["pbmc68k_reduced"]},
        # the simulated screen is derived from the prepared Kang data, which the DAG prepares first
        "perturbation": {"models": ["no_change", "additive", "replicate_half", "permuted_delta"],
                         "datasets": ["perturbseq_proxy"],
                         "splits": {"unseen_perturbations": {"scheme": "unseen_perturbations"}},
                         "n_genes": 500},
        # knn also gets a tuned row; a tiny budget keeps the test short
        # the plan's own parameter for a model (model_params), recorded in its rows
        "model_params": {"knn": {"n_neighbors": 10}},
        "tuning": {"n_trials": 3, "inner_folds": 2, "max_cells": 200,
                   "annotation": {"models": ["knn"], "splits": None}, "integration": {"models": []}},
    }
    _contributed_models(models, repo, pbmc68k_prepared, pbmc68k_split, tmp)
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ, CELLARENA_CACHE=str(data_cache))

    def snakemake(*args, check=True):
        proc = subprocess.run([*SNAKEMAKE, "--cores", "2", "--configfile", str(cfg), *args], cwd=repo,
                              env=env, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"snakemake {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    snakemake()
    return {"dir": tmp, "results": tmp / "results", "snakemake": snakemake}


def test_dag_produces_scores_with_failed_row(tiny):
    everything = results.read(tiny["results"] / "scores.parquet")
    zs = everything[everything.task == "zero_shot"]
    assert set(zs.model_id) == {"pca", "random_embedding", "tiny_bin", "nearest_centroid"}
    assert (zs.status == "ok").all()
    knn = zs[zs.metric_id == "knn_accuracy"].set_index("model_id")["value"]
    assert knn["pca"] > knn["random_embedding"] + 0.3
    df = everything[everything.task == "annotation"]
    tuned = df[df.variant == "tuned"]
    assert set(tuned.model_id) == {"knn"} and (tuned.status == "ok").all()
    record = json.loads(tuned.tuning_json.iloc[0])
    assert record["n_trials"] == 3 and record["budget"]["max_cells"] == 200
    best = json.loads((tiny["results"] / "tuning" / "annotation" / "pbmc68k_reduced" / "stratified_seed0"
                       / "knn.json").read_text())
    assert json.loads(tuned.params_json.iloc[0])["n_neighbors"] == best["best_params"]["n_neighbors"]
    assert (tiny["results"] / "tuning" / "annotation" / "pbmc68k_reduced" / "stratified_seed0" / "knn.db").exists()
    assert "Tuned vs default" in (tiny["results"] / "leaderboard" / "index.html").read_text()
    # a GPU-only model's submitted rows: imported against the plan's own split, shown as submitted
    submitted = df[df.variant == "submitted"]
    assert set(submitted.model_id) == {"big_model"} and (submitted.status == "ok").all()
    assert "Submitted results" in (tiny["results"] / "leaderboard" / "index.html").read_text()
    df = df[df.variant == "default"]
    runs = df.drop_duplicates(["model_id"]).set_index("model_id")
    # nearest_centroid: a new folder made from the template, in no list of the config (auto_models)
    assert set(runs.index) == {"knn", "majority_class", "positive_control", "broken", "tiny_bin",
                               "nearest_centroid"}
    assert "nearest_centroid" in set(zs.model_id)
    assert runs.loc["broken", "status"] == "failed"
    assert "deliberately broken plug-in" in runs.loc["broken", "status_reason"]
    assert (runs.drop(index="broken")["status"] == "ok").all()
    acc = df[(df.metric_id == "accuracy")].set_index("model_id")["value"]
    assert acc["positive_control"] == 1.0 > acc["knn"] > acc["majority_class"]
    assert (tiny["results"] / "leaderboard" / "index.html").exists()
    # the transformer was pretrained by the DAG with the evaluation cells checked, and says so
    card = json.loads((tiny["results"] / "pretrain" / "tiny_bin" / "seed0" / "model.json").read_text())
    exclusion = card["extra"]["exclusion"]
    assert card["corpus_id"] == "cellarena_pbmc3k" and card["steps"] == 3
    assert exclusion["datasets"]["pbmc68k_reduced"]["after"]["n_found"] == 0
    assert exclusion["n_kept"] == 2700
    knn = everything[(everything.model_id == "knn") & (everything.variant == "default")]
    assert {json.loads(p)["n_neighbors"] for p in knn.params_json} == {10}
    # every row says whether its evaluation cells were in the model's pretraining corpus
    assert set(everything.loc[everything.model_id == "tiny_bin", "leakage"]) == {"clean"}
    assert set(everything.loc[everything.model_id == "tiny_bin", "leaked_fraction"]) == {0.0}
    assert set(everything.loc[everything.model_id != "tiny_bin", "leakage"]) == {"no_corpus"}
    for task_rows in (zs, df):
        runtime = json.loads(task_rows[task_rows.model_id == "tiny_bin"].runtime_json.iloc[0])
        assert runtime["checkpoint"]["weights_sha256"] == card["weights_sha256"][:16]
        assert runtime["attention"]
    # perturbation rows for every baseline and control, on the synthetic screen derived from Kang
    pert = everything[everything.task == "perturbation"]
    assert set(pert.model_id) == {"no_change", "additive", "replicate_half", "permuted_delta"}
    assert (pert.status == "ok").all() and set(pert.label_quality) == {"synthetic"}
    top = pert[(pert.metric_id == "pearson_delta_top20") & (pert.subgroup == "double_seen2")]
    top = top.set_index("model_id")["value"]
    assert top["replicate_half"] > top["additive"] > top["no_change"]
    manifest = json.loads((tiny["results"] / "fetch_dataset" / "perturbseq_proxy.json").read_text())
    assert manifest["sources"]["background"]["path"].endswith("prepare_dataset/kang2018_ifnb.h5ad")
    html = (tiny["results"] / "leaderboard" / "index.html").read_text()
    assert "By query category" in html and "Synthetic data" in html
    # every rule left a log and a benchmark (wall time, max RSS)
    assert (tiny["results"] / "benchmarks" / "run_annotation" / "pbmc68k_reduced" / "stratified.tsv").exists()
    # the task's models ran as one job (a batch) for every seed: one log says how each went, each
    # wrote its own file
    log = (tiny["results"] / "logs" / "run_annotation" / "pbmc68k_reduced" / "stratified.log").read_text()
    for model in ("knn", "majority_class", "positive_control", "tiny_bin"):
        assert f"{model} on pbmc68k_reduced/stratified_seed0: ok" in log, log[-3000:]
    assert "broken on pbmc68k_reduced/stratified_seed0: failed (ValueError: deliberately broken plug-in)" in log


def test_rerun_does_nothing(tiny):
    out = tiny["snakemake"]("-n").stdout + tiny["snakemake"]("-n").stderr
    assert "Nothing to be done" in out


def test_deleting_one_output_reruns_only_its_dependents(tiny):
    target = tiny["results"] / "run_annotation" / "pbmc68k_reduced" / "stratified_seed0" / "knn.parquet"
    before = pd.read_parquet(target)
    target.unlink()
    proc = tiny["snakemake"]("-n", "--quiet", "rules")
    text = proc.stdout + proc.stderr
    planned = {line.split()[0] for line in text.splitlines()
               if line.strip() and line.split()[0] in
               {"fetch_dataset", "prepare_dataset", "make_split", "run_annotation", "run_annotation_tuned",
                "pretrain_transformer", "embed_pbmc68k_reduced", "score_embeddings", "aggregate_scores",
                "build_leaderboard"}}
    # the job of the split's models (one batch) runs again; nothing upstream or beside it
    assert planned == {"run_annotation", "aggregate_scores", "build_leaderboard"}, text
    tiny["snakemake"]()
    after = pd.read_parquet(target)
    pd.testing.assert_series_equal(before["value"], after["value"])  # same seed, same numbers


def test_dry_run_prints_dag(repo, data_cache):
    proc = subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "--config", "results_dir=/nonexistent/x"],
                          cwd=repo, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CELLARENA_CACHE=str(data_cache)))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for rule in ("fetch_dataset", "prepare_dataset", "make_split", "pretrain_transformer", "tune_annotation",
                 "run_annotation", "run_annotation_tuned", "run_perturbation", "embed_kang2018_ifnb",
                 "embed_pbmc_cross_study_tuned", "score_embeddings", "aggregate_scores"):
        assert f"rule {rule}:" in text, rule  # "rule x:" or "localrule x:"


def test_lint(repo):
    proc = subprocess.run([*SNAKEMAKE, "--lint", "--cores", "1"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deleting_one_embedding_rescores_only_its_dataset(tiny):
    target = tiny["results"] / "embed" / "pbmc68k_reduced" / "all_seed0" / "pca.npz"
    target.unlink()
    proc = tiny["snakemake"]("-n", "--quiet", "rules")
    text = proc.stdout + proc.stderr
    counts = {line.split()[0]: line.split()[1] for line in text.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts.get("embed_pbmc68k_reduced") == "1" and counts.get("score_embeddings") == "1", text
    assert "pretrain_transformer" not in counts and "run_annotation" not in counts, text
    tiny["snakemake"]()
    assert target.exists()


# --------------------------------------------------------------------------------------------------
# One failure costs its own rows: a dataset that cannot be fetched, a model folder that cannot run and
# a job killed mid-run each become failed rows with the reason, and the DAG still ends in a leaderboard.

SLEEPER = """\
import time

from cellarena.plugin import BaseModel


class Model(BaseModel):
    def fit(self, train, labels):
        time.sleep(300)  # killed from outside long before

    def predict(self, test, *, solution=None):
        raise AssertionError("never reached")
"""


def _toy_card(path: Path, dataset_id: str, source: Path, sha256: str) -> None:
    path.write_text(yaml.safe_dump({
        "id": dataset_id, "version": 1, "title": "toy", "organism": "homo_sapiens", "gene_id_type": "symbol",
        "licence": "CC0", "citation": "nobody", "roles": {"cell_type": "label"}, "labels": {"quality": "expert"},
        "sources": [{"id": "main", "kind": "local", "path": str(source), "sha256": sha256}]}))


def _job_process(model: str, dataset: str):
    """The process of the `cellarena run` job of ``model`` on ``dataset`` (not its guard), or None."""
    import psutil  # noqa: PLC0415

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if (cmd[1:4] == ["-m", "cellarena", "run"] and any(c.endswith(f"/{model}") for c in cmd)
                and any(c.endswith(f"/{dataset}.h5ad") for c in cmd)):
            return proc
    return None


def _plugin_processes(job):
    """The processes a job forked for its models' plug-ins (cellarena/run/child.py: forked by the host,
    whose command line they share)."""
    def python_child(proc) -> bool:  # not bubblewrap, whose command line holds the host's
        return proc.cmdline()[1:3] == ["-m", "cellarena.run.child"]

    out = []
    for proc in job.children(recursive=True):
        with contextlib.suppress(Exception):
            if python_child(proc) and python_child(proc.parent()):
                out.append(proc)
    return out


@pytest.fixture(scope="module")
def fragile(tmp_path_factory, repo, data_cache):
    """A plan in which things break: a card whose local file has the wrong sha256, one whose file is
    missing, a model folder whose model.yaml does not validate, one without model.py (both found by
    auto_models), a model whose own process is killed with SIGKILL mid-run, as the OOM killer does,
    and a model during whose run the whole job (the batch of the split's models) is killed, on each
    of the two attempts Snakemake makes (``--retries 1``, as the cluster profiles)."""
    import psutil  # noqa: PLC0415
    import time  # noqa: PLC0415

    tmp = tmp_path_factory.mktemp("fragile")
    datasets, models = tmp / "datasets", tmp / "models"
    datasets.mkdir()
    shutil.copy(repo / "datasets" / "pbmc68k_reduced.yaml", datasets)
    (tmp / "toy.h5ad").write_bytes(b"not what the card says")
    _toy_card(datasets / "toy_badsha.yaml", "toy_badsha", tmp / "toy.h5ad", "0" * 64)
    _toy_card(datasets / "toy_missing.yaml", "toy_missing", tmp / "nowhere.h5ad", "1" * 64)
    majority = (repo / "models" / "majority_class" / "model.yaml").read_text()
    for mid, card, code in (
            ("majority_class", majority, (repo / "models" / "majority_class" / "model.py").read_text()),
            ("victim_model", majority.replace("id: majority_class", "id: victim_model"), SLEEPER),
            ("victim", majority.replace("id: majority_class", "id: victim"), SLEEPER),
            ("broken_card", majority.replace("id: majority_class", "id: broken_card").replace("kind: control",
                                                                                            "kind: wizard"), SLEEPER),
            ("no_code", majority.replace("id: majority_class", "id: no_code"), None)):
        (models / mid).mkdir(parents=True)
        (models / mid / "model.yaml").write_text(card)
        if code:
            (models / mid / "model.py").write_text(code)
    config = {
        "plan": "fragile", "datasets": ["pbmc68k_reduced", "toy_badsha", "toy_missing"],
        "datasets_dir": str(datasets), "models_dir": str(models), "results_dir": str(tmp / "results"), "seeds": [0],
        "annotation": {"datasets": ["pbmc68k_reduced", "toy_badsha", "toy_missing"],
                       "models": ["majority_class", "victim_model", "victim"],
                       "splits": {"stratified": {"scheme": "stratified", "test_fraction": 0.3}}},
        "integration": {"models": [], "datasets": []}, "zero_shot": {"models": [], "datasets": []},
        "perturbation": {"models": [], "datasets": []},
        "tuning": {"annotation": {"models": []}, "integration": {"models": []}},
    }
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ, CELLARENA_CACHE=str(data_cache))
    t0 = time.monotonic()
    proc = subprocess.Popen([*SNAKEMAKE, "--cores", "2", "--configfile", str(cfg), "--keep-going", "--retries", "1"],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, killed_models = [], []
    done = tmp / "results" / "run_annotation" / "pbmc68k_reduced" / "stratified_seed0"
    try:
        while proc.poll() is None and len(killed) < 2 and time.monotonic() - t0 < 300:
            job = _job_process("victim", "pbmc68k_reduced")
            if job is None or job.pid in killed:
                time.sleep(0.2)
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                if not (done / "victim_model.parquet").exists():  # victim_model's own process, once it sleeps
                    for run in _plugin_processes(job):
                        if run.pid not in killed_models and time.time() - run.create_time() > 1.0:
                            run.kill()
                            killed_models.append(run.pid)
                elif not (done / "victim.parquet").exists():  # victim's turn: kill the whole job
                    children = job.children(recursive=True)
                    job.kill()  # the job process first: the runner must not get to record it
                    for child in children:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            child.kill()
                    killed.append(job.pid)
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"results": tmp / "results", "out": out, "rc": proc.returncode, "killed": killed,
            "killed_models": killed_models,
            "seconds": time.monotonic() - t0, "cfg": cfg, "env": env}


def _runs(scores: pd.DataFrame) -> pd.DataFrame:
    return scores.drop_duplicates(["task", "dataset_id", "split_id", "model_id", "variant"]).set_index(
        ["dataset_id", "model_id"])


def test_a_dataset_that_cannot_be_fetched_becomes_failed_rows(fragile):
    assert fragile["rc"] == 0, fragile["out"][-5000:]
    runs = _runs(results.read(fragile["results"] / "scores.parquet"))
    for dataset, error in (("toy_badsha", "sha256 mismatch for source 'main'"), ("toy_missing", "does not exist")):
        rows = runs.loc[dataset]
        assert set(rows.index) == {"majority_class", "victim_model", "victim", "broken_card", "no_code"}
        fetched = rows.drop(index=["broken_card", "no_code"])  # those fail for their own reason
        assert (fetched["status"] == "failed").all()
        assert all("fetch failed: " in r and error in r for r in fetched["status_reason"]), fetched["status_reason"]
    assert runs.loc[("pbmc68k_reduced", "majority_class"), "status"] == "ok"
    assert (fragile["results"] / "leaderboard" / "index.html").exists()
    # no retry wasted on what a retry cannot cure: each fetch ran once, and said why it failed in its log
    assert fragile["out"].count("rule fetch_dataset:") == 3, fragile["out"][-5000:]
    assert fragile["out"].count("Trying to restart") == 1  # the killed job's, below
    log = (fragile["results"] / "logs" / "fetch_dataset" / "toy_badsha.log").read_text()
    assert log.count("sha256 mismatch") == 1


def test_a_model_folder_that_cannot_run_becomes_failed_rows(fragile):
    runs = _runs(results.read(fragile["results"] / "scores.parquet"))
    card = runs.loc[("pbmc68k_reduced", "broken_card")]
    assert card["status"] == "failed"
    assert "broken_card/model.yaml" in card["status_reason"] and "kind" in card["status_reason"]
    assert "fix:" in card["status_reason"]
    code = runs.loc[("pbmc68k_reduced", "no_code")]
    assert code["status"] == "failed" and "no_code/model.py: plug-in not found" in code["status_reason"]
    assert "fix:" in code["status_reason"]
    assert runs.loc[("pbmc68k_reduced", "majority_class"), "status"] == "ok"
    assert "model folder broken_card cannot run" in fragile["out"]


def test_a_killed_model_process_costs_that_model_only(fragile):
    """The OOM killer picks the largest process: a model's own. Its run fails with what happened; the
    models before and after it in the same job are unaffected, and the job is not retried for it."""
    assert len(fragile["killed_models"]) == 2, "victim_model's process was not seen running in both attempts"
    runs = _runs(results.read(fragile["results"] / "scores.parquet"))
    victim = runs.loc[("pbmc68k_reduced", "victim_model")]
    assert victim["status"] == "failed"
    assert victim["status_reason"].startswith("PluginExited: the plug-in's process was killed by SIGKILL (the "
                                              "out-of-memory killer, or a kill from outside)"), victim["status_reason"]
    assert runs.loc[("pbmc68k_reduced", "majority_class"), "status"] == "ok"


def test_a_killed_job_becomes_a_placeholder_and_the_dag_ends_in_a_leaderboard(fragile, repo):
    assert len(fragile["killed"]) == 2, "the victim's job was not seen running twice"
    scores = results.read(fragile["results"] / "scores.parquet")
    victim = _runs(scores).loc[("pbmc68k_reduced", "victim")]
    reason = victim["status_reason"]
    assert victim["status"] == "failed"
    # killed from outside: retried once by Snakemake (a retry may get more memory), then the placeholder
    assert reason.startswith("job crashed: `cellarena run` was killed by SIGKILL (exit code -9"), reason
    assert ", 2 times;" in reason
    assert "run_annotation/pbmc68k_reduced/stratified.log" in reason
    # the job's models that had finished before the kill keep their rows (the guard writes only the
    # missing files)
    assert _runs(scores).loc[("pbmc68k_reduced", "majority_class"), "status"] == "ok"
    assert _runs(scores).loc[("pbmc68k_reduced", "victim_model"), "status_reason"].startswith("PluginExited")
    # every metric of the task has its row, so the leaderboard shows the run as failed
    assert set(scores.loc[scores.model_id == "victim", "metric_id"]) == set(
        scores.loc[scores.model_id == "majority_class", "metric_id"])
    assert (fragile["results"] / "leaderboard" / "index.html").exists()
    assert not list(fragile["results"].rglob(".*.crashes"))
    # the summary shows the crash with its exit code
    summary = subprocess.run([sys.executable, "-m", "cellarena", "summary", str(fragile["results"] / "scores.parquet")],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert summary.returncode == 0, summary.stderr
    assert "was killed by SIGKILL (exit code -9" in summary.stdout and "fetch failed" in summary.stdout
    # the placeholders are outputs like any other: nothing is left to do
    again = subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "--configfile", str(fragile["cfg"])], cwd=repo,
                           env=fragile["env"], capture_output=True, text=True, timeout=300)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_a_suite_error_in_a_job_becomes_a_placeholder_at_once(tmp_path, repo):
    """`cellarena prepare` refusing a manifest of another card version (exit code 2) is not cured by a
    retry: the guard writes the failed prepared file at once, with the exit code and the log's end."""
    import anndata as ad  # noqa: PLC0415

    manifest, out, log = tmp_path / "manifest.json", tmp_path / "prepared.h5ad", tmp_path / "prepare.log"
    manifest.write_text(json.dumps({"dataset_id": "pbmc68k_reduced", "dataset_version": 99, "sources": {}}))
    command = (f"{sys.executable} -m cellarena guard -- prepare --card {repo / 'datasets' / 'pbmc68k_reduced.yaml'} "
               f"--manifest {manifest} --out {out} > {log} 2>&1")
    proc = subprocess.run(command, shell=True, cwd=tmp_path, env=dict(os.environ, CELLARENA_RETRIES="2"), timeout=120)
    assert proc.returncode == 0, log.read_text()
    from cellarena.data.prepare import provenance  # noqa: PLC0415

    info = provenance(ad.read_h5ad(out))
    assert info["status"] == "failed"
    assert info["reason"].startswith("job crashed: `cellarena prepare` exited with code 2; the last lines of its "
                                     "log prepare.log:"), info["reason"]
    assert "manifest was made for another card version" in info["reason"]
    assert not list(tmp_path.glob(".*.crashes"))
    # a command that is not a job's (here: aggregate, with nothing to read) fails as it would alone
    proc = subprocess.run([sys.executable, "-m", "cellarena", "guard", "--", "aggregate", "--out",
                           str(tmp_path / "scores.parquet"), str(tmp_path / "missing.parquet")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no per-job result files" in proc.stderr


def test_after_a_kill_the_run_command_unlocks_a_stale_lock_and_only_a_stale_one(tmp_path, repo, data_cache):
    """`make run` runs workflow/scripts/unlock_stale.py before Snakemake: it leaves the lock of a run
    that is alive, and removes the one a run killed with SIGKILL left, so the next run finishes. (In a
    checkout of its own, so that no other run's lock is touched.)"""
    import psutil  # noqa: PLC0415
    import time  # noqa: PLC0415

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Snakefile", "workflow", "datasets", "models"):
        (checkout / name).symlink_to(repo / name)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "plan": "lock", "datasets": ["pbmc68k_reduced"], "results_dir": str(tmp_path / "results"), "seeds": [0],
        "auto_models": False,
        "annotation": {"datasets": ["pbmc68k_reduced"], "models": ["majority_class"],
                       "splits": {"stratified": {"scheme": "stratified", "test_fraction": 0.3}}},
        "integration": {"models": [], "datasets": []}, "zero_shot": {"models": [], "datasets": []},
        "perturbation": {"models": [], "datasets": []},
        "tuning": {"annotation": {"models": []}, "integration": {"models": []}}}))
    env = dict(os.environ, CELLARENA_CACHE=str(data_cache))
    snakemake = [*SNAKEMAKE, "--cores", "1", "--configfile", str(cfg)]
    unlock = [sys.executable, str(repo / "workflow" / "scripts" / "unlock_stale.py"), *snakemake]
    locks = checkout / ".snakemake" / "locks"

    def run(args):
        return subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)

    first = subprocess.Popen(snakemake, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not (locks.is_dir() and any(locks.iterdir())) and time.monotonic() - t0 < 120:
            assert first.poll() is None, "the run ended before it was seen locked"
            time.sleep(0.05)
        held = run(unlock)  # the lock of a live run stays
        assert held.returncode == 0 and "not unlocking" in held.stderr and str(first.pid) in held.stderr, held
        assert any(locks.iterdir())
        tree = psutil.Process(first.pid).children(recursive=True)
        first.kill()  # kill -9 mid-DAG, its jobs with it
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert any(locks.iterdir())
    assert "cannot be locked" in run(snakemake).stderr  # what a plain re-run says
    resumed = run(unlock)
    assert resumed.returncode == 0 and "unlocking" in resumed.stdout, resumed
    assert not (locks.is_dir() and any(locks.iterdir()))
    final = run([*snakemake, "--rerun-incomplete"])  # as the profile sets
    assert final.returncode == 0, final.stderr[-3000:]
    assert (tmp_path / "results" / "scores.parquet").exists()
    assert (tmp_path / "results" / "leaderboard" / "index.html").exists()


def test_every_job_output_has_a_failed_placeholder_its_reader_takes(tmp_path, repo, pbmc68k_prepared, pbmc68k_split):
    """The guard's placeholder of each command's output is read by the job downstream as a failure with
    the crash's reason: manifest -> prepare, prepared file -> split, split/embedding/tuning record ->
    the runs, result rows -> aggregate, checkpoint -> the transformer's runs."""
    import anndata as ad  # noqa: PLC0415

    from cellarena.cli import build_parser  # noqa: PLC0415
    from cellarena.data.prepare import provenance  # noqa: PLC0415
    from cellarena.data.splits import read_split  # noqa: PLC0415
    from cellarena.placeholder import WRITERS  # noqa: PLC0415
    from cellarena.run import run_task  # noqa: PLC0415
    from cellarena.run.embedding_file import read_embedding  # noqa: PLC0415
    from cellarena.run.tuning_record import read_record  # noqa: PLC0415
    from cellarena.tasks import TASKS  # noqa: PLC0415

    reason = "job crashed: `cellarena x` was killed by SIGKILL (exit code -9: out of memory, or stopped from outside)"
    card, data = str(repo / "datasets" / "pbmc68k_reduced.yaml"), ["--prepared", str(pbmc68k_prepared)]
    job = [*data, "--split", str(pbmc68k_split), "--seed", "0"]

    def write(*argv):
        WRITERS[argv[0]](build_parser().parse_args([str(a) for a in argv]), reason)

    write("fetch", "--card", card, "--out", tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["reason"] == f"fetch failed: {reason}"
    write("prepare", "--card", card, "--manifest", tmp_path / "m.json", "--out", tmp_path / "p.h5ad")
    assert provenance(ad.read_h5ad(tmp_path / "p.h5ad"))["reason"] == reason
    write("split", *data, "--name", "stratified", "--spec", '{"scheme": "stratified"}', "--seed", 0,
          "--out", tmp_path / "s.json")
    assert read_split(tmp_path / "s.json")["reason"] == reason
    write("run", "--task", "annotation", *job, "--model", repo / "models" / "knn", "--out", tmp_path / "r.parquet")
    rows = results.read(tmp_path / "r.parquet")
    assert set(rows.status) == {"failed"} and set(rows.status_reason) == {reason}
    assert set(rows.metric_id) == set(TASKS["annotation"].metric_specs({}))
    assert set(rows.model_id) == {"knn"} and set(rows.dataset_id) == {"pbmc68k_reduced"}
    # a job of several models (a batch): only the files it had not written yet get a placeholder
    written = (tmp_path / "r.parquet").stat().st_mtime_ns
    write("run", "--task", "annotation", *job, "--model", repo / "models" / "knn", "--out", tmp_path / "r.parquet",
          "--model", repo / "models" / "majority_class", "--out", tmp_path / "r2.parquet")
    assert (tmp_path / "r.parquet").stat().st_mtime_ns == written
    rows = results.read(tmp_path / "r2.parquet")
    assert set(rows.model_id) == {"majority_class"} and set(rows.status_reason) == {reason}
    write("embed", *job, "--model", repo / "models" / "pca", "--out", tmp_path / "e.npz")
    embedding = read_embedding(tmp_path / "e.npz")
    assert embedding.status == "failed" and embedding.columns["status_reason"] == reason
    write("score", "--task", "zero_shot", *job, "--out", tmp_path / "z.parquet", tmp_path / "e.npz")
    rows = results.read(tmp_path / "z.parquet")
    assert set(rows.status) == {"failed"} and set(rows.model_id) == {"pca"}
    write("tune", "--task", "annotation", *job, "--model", repo / "models" / "knn", "--budget", "{}",
          "--out", tmp_path / "t.json")
    tuned = run_task("annotation", pbmc68k_prepared, pbmc68k_split, repo / "models" / "knn", seed=0,
                     tuning=read_record(tmp_path / "t.json"))
    assert set(tuned.status) == {"failed"} and set(tuned.status_reason) == {f"tuning failed: {reason}"}
    write("pretrain", "--model", repo / "models" / "tiny_bin", "--corpus", "c.yaml", "--corpus-data", "a=b",
          "--seed", 0, "--out", tmp_path / "ck" / "model")
    assert json.loads((tmp_path / "ck" / "model.json").read_text())["reason"] == reason
    aggregated = results.aggregate([tmp_path / "r.parquet", tmp_path / "z.parquet", tmp_path / "gone.parquet"],
                                   tmp_path / "scores.parquet", logs=["r.log", "z.log", "gone.log"])
    assert aggregated.attrs["unread"] == [f"result file missing: {tmp_path / 'gone.parquet'} (the job crashed; "
                                          "see its log gone.log)"]
    assert results.unread_files(tmp_path / "scores.parquet") == aggregated.attrs["unread"]
