"""Submitted results: made from real runs, validated, imported against the plan's splits, shown as submitted."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cellarena import results
from cellarena.errors import CellarenaError
from cellarena.run import run_task
from cellarena.data.splits import SplitSpec, make_split, write_split
from cellarena.review.submission import import_submission, make_submission, read_submission, row_problems
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


# --- hostile submissions: real files in the model folder, each rejected with the row or file and why ---

STRATIFIED = ("annotation", "kang2018_ifnb", "stratified_seed0")


def edit_submission(folder: Path, change) -> None:
    """Rewrite submitted/results.csv as a person with a text editor would: every cell as text."""
    path = folder / "submitted" / "results.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(df)
    df.to_csv(path, index=False)


def set_cell(metric: str, column: str, text: str):
    def change(df):
        df.loc[(df["metric_id"] == metric) & (df["subgroup"] == ""), column] = text
    return change


def invent_metric(df):
    row = df[(df["metric_id"] == "accuracy") & (df["subgroup"] == "")].assign(metric_id="win_rate", value="1.0")
    df.loc[len(df)] = row.iloc[0]


@pytest.mark.parametrize(("change", "row", "why"), [
    (set_cell("accuracy", "value", "inf"), "accuracy = inf", "not finite"),
    (set_cell("balanced_accuracy", "value", "1e9"), "balanced_accuracy = 1000000000.0",
     "outside the range of balanced_accuracy, [0, 1]"),
    (set_cell("macro_f1", "higher_is_better", "False"), "macro_f1 = ",
     "higher_is_better is False, but macro_f1 is higher is better"),
    (invent_metric, "win_rate = 1.0", "'win_rate' is not a metric of annotation"),
], ids=["accuracy_inf", "balanced_accuracy_1e9", "flipped_direction", "invented_metric"])
def test_hostile_rows_are_rejected_with_the_row_and_reason(submitted, tiny, change, row, why):
    edit_submission(submitted, change)
    named = f"row annotation/kang2018_ifnb/stratified_seed0 {row}"
    # cellarena validate: the submission check fails, naming the row and the reason
    report = validate_model(submitted, data=tiny)
    assert not report.ok
    failures = [c.message for c in report.failures if c.name == "submitted results"]
    assert any(named in m and why in m for m in failures), report.text()
    # the workflow's import: the run becomes failed rows of the plan's metrics, with the reason; no crash
    rows, notes = import_submission(submitted, {STRATIFIED: (tiny.splits["stratified"], {})}, datasets_dir=DATASETS)
    results.validate(rows)
    assert len(rows) > 0 and (rows["status"] == "failed").all() and rows["value"].isna().all()
    assert "win_rate" not in set(rows["metric_id"])
    reason = rows["status_reason"].iloc[0]
    assert reason.startswith("submitted row rejected: ") and named in reason and why in reason
    assert "run marked failed" in notes[0]


def write_pickle(path: Path) -> None:
    with path.open("wb") as fh:
        pickle.dump(results.read_table(path.with_name("results.csv")), fh)


def write_damaged_parquet(path: Path) -> None:
    results.write(results.read_table(path.with_name("results.csv")), path)
    raw = bytearray(path.read_bytes())
    raw[-300:-8] = b"\xff" * 292  # the footer (the file's schema) overwritten; the magic bytes kept
    path.write_bytes(bytes(raw))


def write_bad_arrow_metadata(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(results.read_table(path.with_name("results.csv")), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"pandas": b"{not json"}), path)


def write_binary_csv(path: Path) -> None:
    path.write_bytes(b"\x00\x01\xfe\xff" * 64)


@pytest.mark.parametrize(("name", "write", "found"), [
    ("results.parquet", write_pickle, "holds a Python pickle (first bytes b'\\x80"),
    ("extra.parquet", write_damaged_parquet, "cannot read it as a parquet file (OSError"),
    ("extra.parquet", write_bad_arrow_metadata, "cannot read it as a parquet file (JSONDecodeError"),
    ("extra.csv", write_binary_csv, "expected a CSV text file, but it holds binary data"),
], ids=["pickle_renamed_parquet", "corrupted_parquet", "bad_arrow_metadata", "binary_csv"])
def test_unreadable_submission_files_are_clear_errors(submitted, tiny, name, write, found):
    path = submitted / "submitted" / name
    write(path)
    with pytest.raises(results.SchemaError) as err:
        read_submission(submitted)
    assert err.value.where == str(path) and found in err.value.message, str(err.value)
    assert "cellarena submit" in err.value.fix
    report = validate_model(submitted, data=tiny)
    assert any(str(path) in c.message and found in c.message for c in report.failures), report.text()
    rows, notes = import_submission(submitted, {STRATIFIED: (tiny.splits["stratified"], {})}, datasets_dir=DATASETS)
    assert (rows["status"] == "failed").all() and str(path) in rows["status_reason"].iloc[0] and found in notes[0]


def test_honest_submission_means_what_the_suite_means(submitted, tiny):
    df = read_submission(submitted)
    assert not row_problems(df).any()  # without a plan: the task's metrics with every option on
    assert not row_problems(df, lambda *run: {}).any()  # with the plan's options
    # a value on the edge of its range is a value, not a fake
    edit_submission(submitted, set_cell("accuracy", "value", "1.0"))
    rows, notes = import_submission(submitted, {STRATIFIED: (tiny.splits["stratified"], {})}, datasets_dir=DATASETS)
    assert (rows["status"] == "ok").all() and not notes
    assert rows.loc[(rows["metric_id"] == "accuracy") & (rows["subgroup"] == ""), "value"].tolist() == [1.0]
    assert validate_model(submitted, data=tiny).ok
