"""Leaderboard table logic, checked against hand-computed numbers.

Fixture (task annotation, one split/seed per dataset):

pbmc_a (expert labels)     accuracy  macro_f1  ece (lower is better)
    logreg    baseline       0.90      0.80      0.05
    knn       baseline       0.85      0.80      0.10
    scgpt     transformer    0.95      0.85      0.20
    shuffled  control        0.20      0.10      0.40
lung_b (silver labels)
    logreg                   0.70      0.60      0.15
    knn                      0.75      0.65      0.10
    scgpt                    failed (CUDA out of memory)
    shuffled                 0.30      0.20      0.50

Ranks on pbmc_a: accuracy scgpt 1, logreg 2, knn 3, shuffled 4; macro_f1 scgpt 1, logreg and knn
tie at 2.5, shuffled 4; ece logreg 1, knn 2, scgpt 3, shuffled 4.
-> per-group mean: logreg 5.5/3, knn 7.5/3, scgpt 5/3, shuffled 4.
Ranks on lung_b: knn 1, logreg 2, shuffled 3 on every metric (scgpt not scored).
-> mean_rank: scgpt 5/3 = 1.6667, knn (2.5 + 1)/2 = 1.75, logreg (11/6 + 2)/2 = 1.9167,
   shuffled 3.5.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from cellarena import results
from cellarena.analysis import intervals
from cellarena.leaderboard import data
from cellarena.leaderboard.export import export_static

DIRECTIONS = {"accuracy": True, "macro_f1": True, "ece": False, "f1_per_class": True}
DATASETS = {"pbmc_a": "expert", "lung_b": "silver"}
KINDS = {"logreg": "baseline", "knn": "baseline", "scgpt": "transformer", "shuffled": "control"}


def run_rows(model: str, dataset: str, values: dict | None, *, task: str = "annotation",
             seed: int = 0, variant: str = "default", status: str = "ok",
             reason: str = "") -> pd.DataFrame:
    """Long rows of one run; ``values=None`` makes a non-ok run with NaN accuracy/macro_f1/ece."""
    run = dict(
        task=task, dataset_id=dataset, dataset_version=1, label_quality=DATASETS[dataset],
        split_id=f"random_s{seed}", split_hash=f"{seed:016x}", seed=seed, model_id=model,
        model_version="1.0", model_kind=KINDS[model], variant=variant, status=status,
        status_reason=reason, params_json="{}", tuning_json="{}", runtime_json="{}", leakage="no_corpus", leaked_fraction=float("nan"), n_train=800, n_test=200, suite_version="0.1.0",
        git_commit="abc1234", created_utc="2024-01-01T00:00:00Z", wall_s=1.5, peak_rss_mb=300.0,
        device="cpu",
    )
    if values is None:
        values = {"accuracy": None, "macro_f1": None, "ece": None}
    return results.make_rows(run, values, DIRECTIONS)


def ok_rows(model: str, dataset: str, acc: float, f1: float, ece: float, **kw) -> pd.DataFrame:
    per_class = {"b_cell": f1 + 0.05, "t_cell": f1 - 0.05}
    return run_rows(model, dataset, {"accuracy": acc, "macro_f1": f1, "ece": ece,
                                     "f1_per_class": per_class}, **kw)


def build_scores() -> pd.DataFrame:
    parts = [
        ok_rows("logreg", "pbmc_a", 0.90, 0.80, 0.05),
        ok_rows("knn", "pbmc_a", 0.85, 0.80, 0.10),
        ok_rows("scgpt", "pbmc_a", 0.95, 0.85, 0.20),
        ok_rows("shuffled", "pbmc_a", 0.20, 0.10, 0.40),
        ok_rows("logreg", "lung_b", 0.70, 0.60, 0.15),
        ok_rows("knn", "lung_b", 0.75, 0.65, 0.10),
        run_rows("scgpt", "lung_b", None, status="failed", reason="CUDA out of memory"),
        ok_rows("shuffled", "lung_b", 0.30, 0.20, 0.50),
    ]
    return results.validate(pd.concat(parts, ignore_index=True))


@pytest.fixture()
def scores() -> pd.DataFrame:
    return build_scores()


def by_model(ranking: pd.DataFrame) -> pd.DataFrame:
    return ranking.set_index("model_id")


# --- load / filter -------------------------------------------------------------------------


def test_load_scores_roundtrip(scores, tmp_path):
    path = tmp_path / "scores.parquet"
    results.write(scores, path)
    loaded = data.load_scores(path)
    pd.testing.assert_frame_equal(loaded, scores)


def test_load_scores_missing_file(tmp_path):
    with pytest.raises(results.SchemaError, match="make run"):
        data.load_scores(tmp_path / "nope.parquet")


def test_results_written_before_tuning_json_still_load(scores, tmp_path):
    old = scores.drop(columns=["tuning_json"])  # a per-run file from before the column existed
    assert set(results.validate(old)["tuning_json"]) == {"{}"}
    with pytest.raises(results.SchemaError, match="missing columns \\['runtime_json'\\]"):
        results.validate(scores.drop(columns=["runtime_json"]))  # a column without a default is required


def test_filter_scores(scores):
    assert len(scores) == 24 + 14  # 8 runs x 3 overall metrics + 7 ok runs x 2 classes
    assert len(data.filter_scores(scores)) == 24
    assert len(data.filter_scores(scores, include_subgroups=True)) == 38
    lung = data.filter_scores(scores, datasets=["lung_b"])
    assert len(lung) == 12 and set(lung["dataset_id"]) == {"lung_b"}
    assert data.filter_scores(scores, datasets=[]).empty
    assert data.filter_scores(scores, task="integration").empty

    tuned = ok_rows("logreg", "pbmc_a", 0.93, 0.82, 0.04, variant="tuned")
    both = pd.concat([scores, tuned], ignore_index=True)
    only_tuned = data.filter_scores(both, variants=["tuned"])
    assert len(only_tuned) == 3 and set(only_tuned["variant"]) == {"tuned"}
    assert len(data.filter_scores(both, variants=["default"])) == 24


# --- runs / provenance ---------------------------------------------------------------------


def test_run_table(scores):
    runs = data.run_table(scores)
    assert len(runs) == 8
    assert list(runs.columns[:6]) == data.RUN_KEYS
    for col in ("model_kind", "model_version", "dataset_version", "label_quality", "split_hash",
                "git_commit", "device", "wall_s", "peak_rss_mb", "status", "status_reason"):
        assert col in runs.columns
    failed = runs[runs["status"] == "failed"]
    assert failed[["model_id", "dataset_id", "status_reason"]].values.tolist() == [
        ["scgpt", "lung_b", "CUDA out of memory"]]
    assert (runs.loc[runs["status"] == "ok", "status_reason"] == "").all()


def test_run_status_is_worst_of_its_rows(scores):
    # A run whose ece is not applicable but whose other metrics are ok counts as not_applicable.
    mixed = run_rows("knn", "pbmc_a", {"accuracy": 0.5, "macro_f1": 0.4, "ece": 0.0}, seed=7)
    mixed.loc[mixed["metric_id"] == "ece", ["value", "status", "status_reason"]] = [
        math.nan, "not_applicable", "no probabilities"]
    run = data.run_table(results.validate(mixed))
    assert run[["status", "status_reason"]].values.tolist() == [["not_applicable",
                                                                 "no probabilities"]]


# --- ranking ---------------------------------------------------------------------------------


def test_rank_models_order_and_mean_rank(scores):
    ranking = data.rank_models(scores, "annotation")
    assert ranking["model_id"].tolist() == ["scgpt", "knn", "logreg", "shuffled"]
    assert ranking["mean_rank"].tolist() == pytest.approx([5 / 3, 1.75, 23 / 12, 3.5])
    assert list(ranking.columns) == ["model_id", "variant", "model_kind", "mean_rank",
                                     "accuracy", "ece", "macro_f1",
                                     "n_datasets", "status", "label_quality", "leakage"]


def test_rank_models_metric_means_and_summaries(scores):
    r = by_model(data.rank_models(scores, "annotation"))
    assert r.loc["logreg", ["accuracy", "macro_f1", "ece"]].tolist() == pytest.approx([0.8, 0.7, 0.1])
    assert r.loc["knn", ["accuracy", "macro_f1", "ece"]].tolist() == pytest.approx([0.8, 0.725, 0.1])
    assert r.loc["scgpt", ["accuracy", "macro_f1", "ece"]].tolist() == pytest.approx([0.95, 0.85, 0.2])
    assert r.loc["shuffled", "ece"] == pytest.approx(0.45)
    assert r["model_kind"].to_dict() == {"scgpt": "transformer", "knn": "baseline",
                                         "logreg": "baseline", "shuffled": "control"}
    assert r["n_datasets"].to_dict() == {"scgpt": 1, "knn": 2, "logreg": 2, "shuffled": 2}
    assert r.loc["logreg", "label_quality"] == "expert, silver"


def test_failed_run_not_scored_but_in_status(scores):
    r = by_model(data.rank_models(scores, "annotation"))
    assert r.loc["scgpt", "status"] == "1 ok, 1 failed"
    assert r.loc["logreg", "status"] == "2 ok"
    # scgpt's mean is its pbmc_a value alone: the failure is not averaged in as 0.
    assert r.loc["scgpt", "accuracy"] == pytest.approx(0.95)
    # On lung_b only three models are ranked, so the worst one gets rank 3, not 4.
    lung = by_model(data.rank_models(data.filter_scores(scores, datasets=["lung_b"]), "annotation"))
    assert lung["mean_rank"].to_dict() == {"knn": 1.0, "logreg": 2.0, "shuffled": 3.0,
                                           "scgpt": pytest.approx(math.nan, nan_ok=True)}
    assert lung.index[-1] == "scgpt"  # NaN rank sorts last
    assert lung.loc["scgpt", "status"] == "1 failed" and lung.loc["scgpt", "n_datasets"] == 0


def test_ties_share_average_rank(scores):
    only_f1 = scores[(scores["metric_id"] == "macro_f1") & (scores["dataset_id"] == "pbmc_a")]
    r = by_model(data.rank_models(only_f1, "annotation"))
    assert r["mean_rank"].to_dict() == {"scgpt": 1.0, "knn": 2.5, "logreg": 2.5, "shuffled": 4.0}
    # Equal mean_rank: order falls back to model_id.
    assert data.rank_models(only_f1, "annotation")["model_id"].tolist()[1:3] == ["knn", "logreg"]


def test_direction_respected(scores):
    ece = scores[(scores["metric_id"] == "ece") & (scores["dataset_id"] == "pbmc_a")]
    lower = data.rank_models(ece, "annotation")
    assert lower["model_id"].tolist() == ["logreg", "knn", "scgpt", "shuffled"]
    assert lower["mean_rank"].tolist() == [1.0, 2.0, 3.0, 4.0]
    flipped = ece.assign(higher_is_better=True)
    assert data.rank_models(flipped, "annotation")["model_id"].tolist() == [
        "shuffled", "scgpt", "knn", "logreg"]


def test_rank_models_variants_are_separate_entries(scores):
    tuned = ok_rows("logreg", "pbmc_a", 0.99, 0.95, 0.01, variant="tuned")
    r = data.rank_models(pd.concat([scores, tuned], ignore_index=True), "annotation")
    assert r[["model_id", "variant"]].values.tolist()[0] == ["logreg", "tuned"]
    assert r["mean_rank"].iloc[0] == 1.0
    assert len(r) == 5


def test_rank_models_empty_task(scores):
    r = data.rank_models(scores, "perturbation")
    assert r.empty and "mean_rank" in r.columns


# --- plotting and pivots ---------------------------------------------------------------------


def test_metric_bars_summarize_ok_runs(scores):
    """The per-metric chart's bars (cellarena.analysis.intervals.summarize)."""
    bars = intervals.summarize(scores[scores["metric_id"] == "accuracy"])
    assert len(bars) == 7  # the failed run has no value to plot
    got = bars.set_index(["dataset_id", "model_id"])
    assert got.loc[("lung_b", "knn"), "mean"] == pytest.approx(0.75)
    assert ("lung_b", "scgpt") not in got.index
    # one seed and no resampled test cells: no interval, and the row says so
    assert set(bars["n_seeds"]) == {1} and set(bars["interval_from"]) == {"none"} and bars["ci_low"].isna().all()


def test_wide(scores):
    w = data.wide(data.filter_scores(scores))
    assert w.shape == (8, 6 + 3)
    assert list(w.columns) == data.RUN_KEYS + ["accuracy", "ece", "macro_f1"]
    row = w[(w["model_id"] == "knn") & (w["dataset_id"] == "pbmc_a")].iloc[0]
    assert (row["accuracy"], row["macro_f1"], row["ece"]) == pytest.approx((0.85, 0.80, 0.10))
    assert w.loc[w["model_id"] == "scgpt", "accuracy"].isna().sum() == 1

    per_class = data.wide(scores)  # with subgroups: the subgroup joins the index
    assert per_class.shape == (8 + 7 * 2, 6 + 1 + 4)
    t_cell = per_class[(per_class["subgroup"] == "t_cell") & (per_class["model_id"] == "knn")
                       & (per_class["dataset_id"] == "lung_b")]
    assert t_cell["f1_per_class"].tolist() == pytest.approx([0.60])


# --- static export ---------------------------------------------------------------------------


def test_export_static(scores, tmp_path):
    integ = run_rows("knn", "pbmc_a", {"accuracy": 0.5}, task="integration")
    df = pd.concat([scores, integ], ignore_index=True)
    paths = export_static(df, tmp_path / "a")
    assert [p.name for p in paths] == ["ranking_annotation.csv", "scaled_annotation.csv",
                                       "ranking_integration.csv", "scaled_integration.csv",
                                       "qc_flags.csv", "index.html"]
    assert all(p.exists() for p in paths)

    # like with like: scgpt failed on lung_b, so the main ranking (group 1) holds the three entries
    # with both datasets, and scgpt is ranked with every entry on pbmc_a alone (group 2)
    csv = pd.read_csv(tmp_path / "a" / "ranking_annotation.csv")
    assert csv["model_id"].tolist() == ["knn", "logreg", "shuffled", "scgpt", "logreg", "knn", "shuffled"]
    assert csv["group"].tolist() == [1, 1, 1, 2, 2, 2, 2]
    assert csv["mean_rank"].tolist() == pytest.approx([17 / 12, 19 / 12, 3, 5 / 3, 11 / 6, 2.5, 4])
    assert csv.loc[csv["model_id"] == "scgpt", "status"].tolist() == ["1 ok, 1 failed"]

    page = (tmp_path / "a" / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page and "<link" not in page and "http" not in page
    assert page.count("<h2") == 2
    assert "Silver labels" in page and "lung_b (silver)" in page
    assert "CUDA out of memory" in page
    for model in KINDS:
        assert model in page
    # One control per dataset: nothing can be scaled, and the page says why instead of scoring 0.
    scaled = pd.read_csv(tmp_path / "a" / "scaled_annotation.csv")
    assert scaled["n_metrics"].tolist() == [0, 0, 0, 0] and scaled["mean_scaled"].isna().all()
    assert "Ranking: scaled between controls" in page and "QC: metric values" in page


def test_export_static_is_deterministic(scores, tmp_path):
    first = export_static(scores, tmp_path / "a")
    # Same rows in a different order must give the same bytes.
    second = export_static(scores.sample(frac=1, random_state=0), tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()


def test_compute_cost_sums_ok_runs_and_reads_pretraining_from_runtime():
    df = build_scores()
    scgpt = (df.model_id == "scgpt") & (df.status == "ok")
    df.loc[scgpt, "runtime_json"] = '{"attention": "sdpa-math", "pretrain_s": 120.5}'
    df.loc[scgpt, "wall_s"] = 4.0
    cost = data.compute_cost(df, "annotation").set_index("model_id")
    assert cost.loc["scgpt", "n_runs"] == 1  # the failed lung_b run is not a cost measurement
    assert cost.loc["scgpt", "total_wall_s"] == 4.0 and cost.loc["scgpt", "pretrain_s"] == 120.5
    assert cost.loc["scgpt", "attention"] == "sdpa-math"
    assert cost.loc["logreg", "n_runs"] == 2 and cost.loc["logreg", "total_wall_s"] == 3.0
    assert math.isnan(cost.loc["logreg", "pretrain_s"]) and cost.loc["logreg", "attention"] == ""
    assert list(cost.index[:1]) == ["scgpt"]  # most expensive first
    assert data.compute_cost(df, "integration").empty


def test_metric_bars_use_overall_rows_only(scores):
    assert intervals.summarize(scores[scores["metric_id"] == "f1_per_class"]).empty  # per-class rows only


def test_subgroup_table_breaks_a_metric_down_by_subgroup(scores):
    table = data.subgroup_table(scores, "annotation", "f1_per_class")
    logreg = table[(table.dataset_id == "pbmc_a") & (table.model_id == "logreg")].iloc[0]
    assert logreg["b_cell"] == pytest.approx(0.85) and logreg["t_cell"] == pytest.approx(0.75)
    assert list(table.columns) == ["dataset_id", "model_id", "variant", "model_kind", "b_cell", "t_cell"]
    assert "scgpt" not in set(table.loc[table.dataset_id == "lung_b", "model_id"])  # failed: no values
    assert data.subgroup_table(scores, "annotation", "accuracy").empty


def test_synthetic_datasets_are_named(scores):
    runs = data.run_table(scores)
    assert data.synthetic_datasets(runs) == []
    runs.loc[runs.dataset_id == "lung_b", "label_quality"] = "synthetic"
    assert data.synthetic_datasets(runs) == ["lung_b"]



# --- leaked results: hide them, or replace them by the reference model's (leakage-imputed ranking)

@pytest.fixture()
def leaky(scores) -> pd.DataFrame:
    """The fixture with scgpt's pbmc_a run evaluated on cells of its own pretraining corpus."""
    out = scores.copy()
    out.loc[out.model_id != "scgpt", "leakage"] = "no_corpus"
    out.loc[out.model_id == "scgpt", "leakage"] = "clean"
    out.loc[(out.model_id == "scgpt") & (out.dataset_id == "pbmc_a"), "leakage"] = "leaked"
    return results.validate(out)


def test_apply_leakage_show_changes_nothing(leaky):
    shown, changes = data.apply_leakage(leaky, "show")
    pd.testing.assert_frame_equal(shown, leaky)
    assert changes.empty


def test_apply_leakage_hide(leaky):
    shown, changes = data.apply_leakage(leaky, "hide")
    assert not ((shown.model_id == "scgpt") & (shown.dataset_id == "pbmc_a")).any()
    assert changes[["model_id", "dataset_id", "action"]].values.tolist() == [["scgpt", "pbmc_a", "hidden"]]
    ranking = data.rank_models(shown, "annotation").set_index("model_id")
    assert math.isnan(ranking.loc["scgpt", "mean_rank"])  # its only scored run was leaked


def test_leakage_imputed_ranking_by_hand(leaky):
    # scgpt's pbmc_a values become logreg's (0.90, 0.80, 0.05): pbmc_a ranks accuracy 1.5, macro_f1
    # 2 (three-way tie), ece 1.5 -> 5/3; lung_b failed. logreg: pbmc_a 5/3, lung_b 2 -> 11/6.
    shown, changes = data.apply_leakage(leaky, "impute", {"annotation": "logreg"})
    assert changes[["model_id", "action", "reference"]].values.tolist() == [["scgpt", "imputed", "logreg"]]
    ranking = data.rank_models(shown, "annotation").set_index("model_id")
    assert ranking.loc["scgpt", "mean_rank"] == pytest.approx(5 / 3)
    assert ranking.loc["logreg", "mean_rank"] == pytest.approx(11 / 6)
    assert ranking.loc["scgpt", "accuracy"] == pytest.approx(0.90)
    per_class = shown[(shown.model_id == "scgpt") & (shown.metric_id == "f1_per_class")]
    assert per_class.set_index("subgroup")["value"].to_dict() == pytest.approx({"b_cell": 0.85, "t_cell": 0.75})


def test_leaked_rows_without_a_reference_value_are_dropped(leaky):
    shown, changes = data.apply_leakage(leaky, "impute", {"annotation": "not_run"})
    assert not (shown.leakage == "leaked").any()
    assert set(changes["action"]) == {"dropped: no reference value"}
    with pytest.raises(ValueError, match="unknown leakage policy"):
        data.apply_leakage(leaky, "ignore")


def test_export_shows_the_leakage_imputed_ranking(leaky, tmp_path):
    export_static(leaky, tmp_path)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Leakage-imputed ranking" in page and "logistic_regression" in page
    export_static(leaky.assign(leakage="clean"), tmp_path / "clean")
    assert "Leakage-imputed ranking" not in (tmp_path / "clean" / "index.html").read_text(encoding="utf-8")


def test_tuning_table_pairs_tuned_with_default_runs():
    tuned_logreg = ok_rows("logreg", "pbmc_a", 0.92, 0.86, 0.04, variant="tuned")
    tuned_logreg["tuning_json"] = json.dumps({"n_trials": 8, "metric": "macro_f1", "default_value": 0.79,
                                              "best_value": 0.83})
    tuned_knn = ok_rows("knn", "lung_b", 0.70, 0.61, 0.12, variant="tuned")
    failed = run_rows("logreg", "lung_b", None, variant="tuned", status="failed", reason="tuning failed: x")
    df = results.validate(pd.concat([build_scores(), tuned_logreg, tuned_knn, failed], ignore_index=True))
    table = data.tuning_table(df, "annotation")
    # logreg on lung_b has a failed tuned run: no pair; knn on pbmc_a has no tuned run
    assert list(zip(table.dataset_id, table.model_id)) == [("lung_b", "knn"), ("pbmc_a", "logreg")]
    knn, logreg = table.iloc[0], table.iloc[1]
    assert knn["default"] == pytest.approx(0.65) and knn["tuned"] == pytest.approx(0.61)
    assert knn["gain"] == pytest.approx(-0.04)
    assert logreg["gain"] == pytest.approx(0.06) and logreg["n_trials"] == 8
    assert logreg["inner_default"] == 0.79 and logreg["inner_best"] == 0.83
    # a lower-is-better metric: positive gain still means tuning helped
    ece = data.tuning_table(df, "annotation", "ece")
    assert ece.set_index("model_id").loc["logreg", "gain"] == pytest.approx(0.05 - 0.04)
    assert data.tuning_table(df, "integration").empty
