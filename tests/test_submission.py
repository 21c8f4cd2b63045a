"""Submitted results: made from real runs, validated, imported against the plan's splits, shown as submitted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cellarena import results
from cellarena.errors import CellarenaError
from cellarena.run import run_task
from cellarena.data.splits import SplitSpec, make_split, write_split
from cellarena.review.submission import import_submission, make_submission, read_submission
from cellarena.review.validate import validate_model
from cellarena.leaderboard import data

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO / "datasets"


@pytest.fixture
def submitted(tmp_path, tiny):
    """A GPU-only model (a copy of knn marked gpu: required) whose results were run elsewhere: here,
    a real run of the same code on the tiny data, turned into a submission with `cellarena submit`."""
    folder = tmp_path / "models" / "big_model"
    shutil.copytree(REPO / "models" / "knn", folder)
    card = (folder / "model.yaml").read_text().replace("id: knn", "id: big_model").replace("gpu: none", "gpu: required")
    (folder / "model.yaml").write_text(card)
    rows = run_task("annotation", tiny.prepared, tiny.splits["stratified"], REPO / "models" / "knn", seed=0)
    rows = rows.assign(model_id="big_model", environment_json=json.dumps({"gpu": "NVIDIA H100 80GB HBM3"}))
    run_file = results.write(rows, tmp_path / "run.parquet")
    assert run_file["status"].eq("ok").all()
    out, df = make_submission(folder, [tmp_path / "run.parquet"], datasets_dir=DATASETS)
    assert out == folder / "submitted" / "results.csv" and set(df["variant"]) == {"submitted"}
    return folder


def test_submission_csv_round_trips_and_validates(submitted, tiny):
    df = read_submission(submitted)
    original = results.read_table(submitted / "submitted" / "results.csv")
    assert len(df) == len(original) and df["value"].notna().all()
    assert df["higher_is_better"].dtype == bool and set(df["variant"]) == {"submitted"}
    report = validate_model(submitted, data=tiny)
    assert report.ok, report.text()
    by_name = {c.name: c for c in report.checks}
    assert by_name["submitted results"].status == "pass" and "NVIDIA H100" in by_name["submitted results"].message
    assert by_name["annotation"].status == "skip"  # gpu: required, no GPU here


def test_tampered_submission_fails_validation(submitted, tiny):
    path = submitted / "submitted" / "results.csv"
    path.write_text(path.read_text().replace(",1.1.0,", ",9.9.9,"))
    report = validate_model(submitted, data=tiny)
    assert not report.ok
    assert any("model_version" in c.message and "9.9.9" in c.message for c in report.failures), report.text()


def test_submit_refuses_rows_of_another_version(tmp_path, tiny):
    folder = tmp_path / "knn"
    shutil.copytree(REPO / "models" / "knn", folder)
    rows = run_task("annotation", tiny.prepared, tiny.splits["stratified"], folder, seed=0)
    results.write(rows.assign(model_version="0.0.1"), tmp_path / "run.parquet")
    with pytest.raises(CellarenaError, match="model_version"):
        make_submission(folder, [tmp_path / "run.parquet"], datasets_dir=DATASETS)


def test_import_keeps_matching_split_and_fails_a_moved_one(submitted, tiny, tmp_path):
    rows, notes = import_submission(submitted, {("annotation", "kang2018_ifnb", "stratified_seed0"):
                                                (tiny.splits["stratified"], {})}, datasets_dir=DATASETS)
    assert (rows["status"] == "ok").all() and set(rows["variant"]) == {"submitted"} and not notes
    assert set(rows["leakage"]) == {"no_corpus"}
    # the suite's split changed (another test fraction, same id): the submitted rows no longer apply
    import anndata as ad

    obs = ad.read_h5ad(tiny.prepared).obs
    moved = make_split(obs, dataset_id="kang2018_ifnb", dataset_version=2, name="stratified",
                       spec=SplitSpec(scheme="stratified", test_fraction=0.5), seed=0)
    path = write_split(moved, tmp_path / "moved.json")
    rows, notes = import_submission(submitted, {("annotation", "kang2018_ifnb", "stratified_seed0"): (path, {})},
                                    datasets_dir=DATASETS)
    assert (rows["status"] == "failed").all() and rows["value"].isna().all()
    assert moved["hash"] in rows["status_reason"].iloc[0] and "split hash differs" in notes[0]
    # rows of a split the plan does not run are left out, and said so
    rows, notes = import_submission(submitted, {}, datasets_dir=DATASETS)
    assert rows.empty and "not in this plan" in notes[0]


def test_invalid_submission_gives_failed_rows_for_the_plan(submitted, tiny):
    path = submitted / "submitted" / "results.csv"
    path.write_text(path.read_text().replace(",submitted,", ",tuned,"))
    rows, notes = import_submission(submitted, {("annotation", "kang2018_ifnb", "stratified_seed0"):
                                                (tiny.splits["stratified"], {})}, datasets_dir=DATASETS)
    assert len(rows) > 0 and (rows["status"] == "failed").all() and set(rows["variant"]) == {"submitted"}
    assert "submission does not validate" in rows["status_reason"].iloc[0] and "variant" in notes[0]
    results.validate(rows)


def test_leaderboard_names_submitted_models(submitted):
    df = read_submission(submitted)
    runs = data.run_table(pd.concat([df, df.assign(model_id="knn", variant="default")], ignore_index=True))
    table = data.submitted_models(runs)
    assert table.to_dict("records") == [{"model_id": "big_model", "n_runs": 1, "ran_on": "NVIDIA H100 80GB HBM3",
                                         "git_commit": df["git_commit"].iloc[0]}]
    assert data.submitted_models(runs[runs["variant"] == "default"]).empty
