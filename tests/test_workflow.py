"""The Snakemake DAG end to end on the tiny real dataset: outputs, failure isolation, incrementality."""

from __future__ import annotations

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
    assert (tiny["results"] / "benchmarks" / "run_annotation" / "pbmc68k_reduced" / "stratified_seed0"
            / "knn.tsv").exists()


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
               {"fetch_dataset", "prepare_dataset", "make_split", "run_model", "pretrain_transformer",
                "embed_cells", "score_embeddings", "aggregate_scores", "build_leaderboard"}}
    assert planned == {"run_model", "aggregate_scores", "build_leaderboard"}, text
    tiny["snakemake"]()
    after = pd.read_parquet(target)
    pd.testing.assert_series_equal(before["value"], after["value"])  # same seed, same numbers


def test_dry_run_prints_dag(repo, data_cache):
    proc = subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "--config", "results_dir=/nonexistent/x"],
                          cwd=repo, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CELLARENA_CACHE=str(data_cache)))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for rule in ("fetch_dataset", "prepare_dataset", "make_split", "pretrain_transformer", "run_model",
                 "embed_cells", "score_embeddings", "aggregate_scores"):
        assert rule in text


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
    assert counts.get("embed_cells") == "1" and counts.get("score_embeddings") == "1", text
    assert "pretrain_transformer" not in counts and "run_model" not in counts, text
    tiny["snakemake"]()
    assert target.exists()
