"""Scaling between controls, QC flags and display-time totals, on hand-computed examples.

Annotation fixture (pbmc_a, split random_s0, seed 0), controls positive_control and random_labels:

                   kind         accuracy (higher)  ece (lower)   balanced_accuracy
    positive_control control      0.9                0.1            0.5
    random_labels    control      0.1                0.5            0.5   <- constant controls
    logreg           baseline     0.5 -> 0.5         0.2 -> 0.75    0.7 -> NaN (unscalable)
    scgpt            transformer  0.95 -> 1.0625 (above)  0.6 -> -0.25 (below worst) 0.9 -> NaN
    geneformer       transformer  failed -> NaN      0.3 -> 0.5     failed -> NaN

accuracy: (v - 0.1) / 0.8; ece is flipped: (0.5 - v) / 0.4; scgpt's accuracy 0.95 is 1.0625 (above the
best control), its ece 0.6 is -0.25 (below the worst): shown as they are, not clipped.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cellarena import results, tasks
from cellarena.leaderboard import data
from cellarena.leaderboard.export import export_static

NAN = pytest.approx(math.nan, nan_ok=True)


def rows(model: str, kind: str, values: dict, directions: dict, *, task: str = "annotation",
         dataset: str = "pbmc_a", seed: int = 0, groups: dict | None = None,
         status: str = "ok", variant: str = "default") -> pd.DataFrame:
    """Long rows of one run; a value of None gets ``status`` (default failed) and a reason."""
    bad = "failed" if status == "ok" else status
    has_none = any(v is None for v in values.values())
    run = dict(
        task=task, dataset_id=dataset, dataset_version=1, label_quality="expert",
        split_id=f"random_s{seed}", split_hash=f"{seed:016x}", seed=seed, model_id=model,
        model_version="1", model_kind=kind, variant=variant,
        status=bad if has_none else "ok", status_reason=f"{bad} here" if has_none else "",
        params_json="{}", tuning_json="{}", runtime_json="{}", leakage="no_corpus", leaked_fraction=float("nan"), n_train=80, n_test=20, suite_version="0.1.0", git_commit="abc1234",
        created_utc="2024-01-01T00:00:00Z", wall_s=1.0, peak_rss_mb=100.0, device="cpu",
    )
    out = results.make_rows(run, values, directions, groups)
    ok = out["value"].notna()
    out.loc[ok, ["status", "status_reason"]] = ["ok", ""]
    return results.validate(out)


ANN = {"accuracy": True, "ece": False, "balanced_accuracy": True}


def annotation_scores() -> pd.DataFrame:
    return pd.concat([
        rows("positive_control", "control",
             {"accuracy": 0.9, "ece": 0.1, "balanced_accuracy": 0.5}, ANN),
        rows("random_labels", "control",
             {"accuracy": 0.1, "ece": 0.5, "balanced_accuracy": 0.5}, ANN),
        rows("logreg", "baseline", {"accuracy": 0.5, "ece": 0.2, "balanced_accuracy": 0.7}, ANN),
        rows("scgpt", "transformer", {"accuracy": 0.95, "ece": 0.6, "balanced_accuracy": 0.9}, ANN),
        rows("geneformer", "transformer", {"accuracy": None, "ece": 0.3, "balanced_accuracy": None},
             ANN),
    ], ignore_index=True)


def cell(df: pd.DataFrame, model: str, metric: str, col: str):
    hit = df[(df["model_id"] == model) & (df["metric_id"] == metric)]
    assert len(hit) == 1
    return hit[col].iloc[0]


# --- scale_by_controls -------------------------------------------------------------------------


def test_scale_higher_is_better_and_above_the_best_is_above_1():
    sc = data.scale_by_controls(annotation_scores())
    assert cell(sc, "positive_control", "accuracy", "scaled") == 1.0
    assert cell(sc, "random_labels", "accuracy", "scaled") == 0.0
    assert cell(sc, "logreg", "accuracy", "scaled") == pytest.approx(0.5)
    assert cell(sc, "logreg", "accuracy", "value") == 0.5  # the raw value is kept
    assert cell(sc, "scgpt", "accuracy", "scaled") == pytest.approx(1.0625)  # not clipped to 1
    assert cell(sc, "scgpt", "accuracy", "outside") == "above_best"
    assert cell(sc, "logreg", "accuracy", "outside") == ""
    assert (cell(sc, "logreg", "accuracy", "control_best"),
            cell(sc, "logreg", "accuracy", "control_worst")) == (0.9, 0.1)


def test_scale_flips_lower_is_better_and_below_the_worst_is_below_0():
    sc = data.scale_by_controls(annotation_scores())
    # ece: best control 0.1 (-> 1), worst 0.5 (-> 0).
    assert cell(sc, "positive_control", "ece", "scaled") == 1.0
    assert cell(sc, "random_labels", "ece", "scaled") == 0.0
    assert (cell(sc, "logreg", "ece", "control_best"),
            cell(sc, "logreg", "ece", "control_worst")) == (0.1, 0.5)
    assert cell(sc, "logreg", "ece", "scaled") == pytest.approx(0.75)
    assert cell(sc, "geneformer", "ece", "scaled") == pytest.approx(0.5)
    assert cell(sc, "scgpt", "ece", "scaled") == pytest.approx(-0.25)  # not clipped to 0
    assert cell(sc, "scgpt", "ece", "outside") == "below_worst"


def test_scale_missing_value_excluded_not_zero():
    sc = data.scale_by_controls(annotation_scores())
    assert math.isnan(cell(sc, "geneformer", "accuracy", "scaled"))
    assert cell(sc, "geneformer", "accuracy", "scale_status") == "failed"
    assert cell(sc, "geneformer", "accuracy", "outside") == ""


def test_scale_constant_controls_give_nan():
    sc = data.scale_by_controls(annotation_scores())
    bal = sc[sc["metric_id"] == "balanced_accuracy"]
    assert bal["scaled"].isna().all()
    assert bal.set_index("model_id")["scale_status"].to_dict() == {
        "positive_control": "constant_controls", "random_labels": "constant_controls",
        "logreg": "constant_controls", "scgpt": "constant_controls", "geneformer": "failed"}
    # Equal up to floating-point noise counts as constant too.
    noisy = annotation_scores()
    noisy.loc[(noisy["model_id"] == "random_labels") & (noisy["metric_id"] == "accuracy"),
              "value"] = 0.9 + 1e-15
    assert data.scale_by_controls(noisy).query("metric_id == 'accuracy'")["scaled"].isna().all()


def test_scale_without_controls_and_with_failed_control():
    df = annotation_scores()
    no_ctrl = data.scale_by_controls(df[df["model_kind"] != "control"])
    assert no_ctrl["scaled"].isna().all()
    assert cell(no_ctrl, "logreg", "accuracy", "scale_status") == "no_controls"
    # A failed control does not define the range: one control left -> nothing to scale between.
    failed = df.copy()
    hit = (failed["model_id"] == "random_labels") & (failed["metric_id"] == "accuracy")
    failed.loc[hit, ["value", "status", "status_reason"]] = [math.nan, "failed", "boom"]
    sc = data.scale_by_controls(failed)
    assert cell(sc, "logreg", "accuracy", "scale_status") == "constant_controls"
    assert cell(sc, "logreg", "accuracy", "n_controls") == 1


def test_scale_per_split_and_seed_and_overall_rows_only():
    seed1 = pd.concat([
        rows("positive_control", "control", {"accuracy": 1.0}, ANN, seed=1),
        rows("random_labels", "control", {"accuracy": 0.5}, ANN, seed=1),
        rows("logreg", "baseline", {"accuracy": 0.75, "f1_per_class": {"b": 0.1, "t": 0.2}},
             {**ANN, "f1_per_class": True}, seed=1),
    ], ignore_index=True)
    sc = data.scale_by_controls(pd.concat([annotation_scores(), seed1], ignore_index=True))
    assert (sc["subgroup"] == "").all() and "f1_per_class" not in set(sc["metric_id"])
    logreg = sc[(sc["model_id"] == "logreg") & (sc["metric_id"] == "accuracy")]
    # seed 0: controls 0.1..0.9 -> 0.5; seed 1: controls 0.5..1.0 -> 0.5.
    assert logreg.set_index("seed")["scaled"].to_dict() == pytest.approx({0: 0.5, 1: 0.5})


# --- aggregate_scaled ----------------------------------------------------------------------------


def test_aggregate_counts_and_means():
    agg = data.aggregate_scaled(annotation_scores(), "annotation").set_index("model_id")
    # logreg: (0.5 + 0.75) / 2; scgpt: (1.0625 - 0.25) / 2 (unclipped); geneformer: ece only.
    assert agg["mean_scaled"].to_dict() == pytest.approx({
        "positive_control": 1.0, "random_labels": 0.0, "logreg": 0.625, "scgpt": 0.40625,
        "geneformer": 0.5})
    assert agg["n_metrics"].to_dict() == {"positive_control": 2, "random_labels": 2, "logreg": 2,
                                          "scgpt": 2, "geneformer": 1}
    # Excluded: balanced_accuracy everywhere (constant controls), geneformer's failed accuracy.
    assert agg["n_missing"].to_dict() == {"positive_control": 1, "random_labels": 1, "logreg": 1,
                                          "scgpt": 1, "geneformer": 2}
    assert agg["n_unscalable"].to_dict() == {"positive_control": 1, "random_labels": 1,
                                             "logreg": 1, "scgpt": 1, "geneformer": 0}
    assert list(agg.index) == ["positive_control", "logreg", "geneformer", "scgpt",
                               "random_labels"]
    assert "overall" not in agg.columns and "setting" not in agg.columns


def test_aggregate_means_over_metrics_then_over_splits():
    # seed 0: logreg 0.5 (accuracy) and 0.75 (ece) -> 0.625; seed 1: accuracy 1.0 only (ece
    # failed) -> 1.0. Mean over seeds: 0.8125 (a pooled mean would give 0.75).
    seed1 = pd.concat([
        rows("positive_control", "control", {"accuracy": 0.8, "ece": 0.0}, ANN, seed=1),
        rows("random_labels", "control", {"accuracy": 0.4, "ece": 0.4}, ANN, seed=1),
        rows("logreg", "baseline", {"accuracy": 0.8, "ece": None}, ANN, seed=1),
    ], ignore_index=True)
    df = pd.concat([annotation_scores(), seed1], ignore_index=True)
    agg = data.aggregate_scaled(df, "annotation").set_index("model_id")
    assert agg.loc["logreg", "mean_scaled"] == pytest.approx(0.8125)
    assert agg.loc["logreg", ["n_metrics", "n_missing"]].tolist() == [3, 2]


def test_aggregate_not_applicable_counted():
    df = pd.concat([
        rows("positive_control", "control", {"accuracy": 0.9}, ANN),
        rows("random_labels", "control", {"accuracy": 0.1}, ANN),
        rows("logreg", "baseline", {"accuracy": None}, ANN, status="not_applicable"),
    ], ignore_index=True)
    agg = data.aggregate_scaled(df, "annotation").set_index("model_id")
    assert math.isnan(agg.loc["logreg", "mean_scaled"])
    assert agg.loc["logreg", ["n_metrics", "n_missing", "n_unscalable",
                              "n_not_applicable"]].tolist() == [0, 1, 0, 1]


# Integration (pbmc_a): bio metrics nmi_kmeans, clisi, batch metrics ilisi, graph_connectivity.
#                       nmi   clisi   | ilisi  graph_conn.  ->  bio    batch   overall
# celltype_embedding    0.8   1.0     | 0.1    1.0              1      0.5     0.8
# random_embedding      0.2   0.5     | 0.9    0.6              0      0.5     0.2
# scvi                  0.5   0.875   | 0.3    0.9              0.625  0.5     0.575
# pca                   0.2   0.75    | 0.9    1.0              0.25   1       0.55
# harmony               0.8   0.5     | failed failed           0.5    NaN     NaN
INT_GROUPS = {"nmi_kmeans": "bio", "clisi": "bio", "ilisi": "batch", "graph_connectivity": "batch"}
INT_DIRS = dict.fromkeys(INT_GROUPS, True)


def integration_scores() -> pd.DataFrame:
    def r(model, kind, nmi, clisi, ilisi, gc):
        vals = {"nmi_kmeans": nmi, "clisi": clisi, "ilisi": ilisi, "graph_connectivity": gc}
        return rows(model, kind, vals, INT_DIRS, task="integration", groups=INT_GROUPS)

    return pd.concat([
        r("celltype_embedding", "control", 0.8, 1.0, 0.1, 1.0),
        r("random_embedding", "control", 0.2, 0.5, 0.9, 0.6),
        r("scvi", "baseline", 0.5, 0.875, 0.3, 0.9),
        r("pca", "baseline", 0.2, 0.75, 0.9, 1.0),
        r("harmony", "baseline", 0.8, 0.5, None, None),
    ], ignore_index=True)


def test_scaled_scores_get_an_interval_over_seeds():
    """Each seed's scaled score on its own cells, then Student's t over seeds (checked by hand)."""
    second = integration_scores()
    second["seed"], second["split_id"], second["split_hash"] = 1, "random_s1", f"{1:016x}"
    scvi_nmi = (second["model_id"] == "scvi") & (second["metric_id"] == "nmi_kmeans")
    second.loc[scvi_nmi, "value"] = 0.8  # scaled 1.0 instead of 0.5: bio 0.875 instead of 0.625
    agg = data.aggregate_scaled(pd.concat([integration_scores(), second], ignore_index=True), "integration")
    scvi = agg.set_index("model_id").loc["scvi"]
    # bio over seeds [0.625, 0.875]: mean 0.75, sd 0.1767767, t(0.975, 1 df) = 12.706205
    half = 12.706205 * 0.1767767 / math.sqrt(2)
    assert scvi["n_seeds"] == 2 and scvi["bio"] == pytest.approx(0.75)
    assert (scvi["bio_low"], scvi["bio_high"]) == (pytest.approx(0.75 - half, abs=1e-5),
                                                   pytest.approx(0.75 + half, abs=1e-5))
    assert scvi["batch_low"] == pytest.approx(scvi["batch_high"])  # batch did not move between seeds


def test_integration_bio_batch_overall():
    agg = data.aggregate_scaled(integration_scores(), "integration")
    assert list(agg.columns) == ["model_id", "variant", "model_kind", "overall", "bio", "batch",
                                 "mean_scaled", "n_seeds", "overall_low", "overall_high", "bio_low", "bio_high",
                                 "batch_low", "batch_high", "mean_scaled_low", "mean_scaled_high", "n_metrics",
                                 "n_missing", "n_unscalable", "n_not_applicable"]
    assert agg["n_seeds"].tolist() == [1] * 5 and agg["bio_low"].isna().all()  # one seed: no interval
    assert agg["model_id"].tolist() == ["celltype_embedding", "scvi", "pca", "random_embedding",
                                        "harmony"]  # by overall, NaN last
    a = agg.set_index("model_id")
    assert a["bio"].to_dict() == pytest.approx({"celltype_embedding": 1.0, "random_embedding": 0.0,
                                                "scvi": 0.625, "pca": 0.25, "harmony": 0.5})
    assert a["batch"].to_dict() == pytest.approx({"celltype_embedding": 0.5,
                                                  "random_embedding": 0.5, "scvi": 0.5, "pca": 1.0,
                                                  "harmony": NAN})
    assert a["overall"].to_dict() == pytest.approx({
        "celltype_embedding": 0.8, "random_embedding": 0.2, "scvi": 0.575, "pca": 0.55,
        "harmony": NAN})
    assert a.loc["scvi", "mean_scaled"] == pytest.approx(0.5625)
    assert a.loc["harmony", ["n_metrics", "n_missing"]].tolist() == [2, 2]


def test_integration_group_without_rows_is_nan_not_zero():
    df = integration_scores()
    df = df[~((df["model_id"] == "scvi") & (df["metric_group"] == "batch"))]
    a = data.aggregate_scaled(df, "integration").set_index("model_id")
    assert a.loc["scvi", "bio"] == pytest.approx(0.625)
    assert math.isnan(a.loc["scvi", "batch"]) and math.isnan(a.loc["scvi", "overall"])
    # The two batch metrics other models report are counted as missing.
    assert a.loc["scvi", ["n_metrics", "n_missing"]].tolist() == [2, 2]
    assert a.loc["pca", ["n_metrics", "n_missing"]].tolist() == [4, 0]


def test_absent_metric_row_is_counted_missing():
    df = integration_scores()
    df = df[~((df["model_id"] == "scvi") & (df["metric_id"] == "ilisi"))]
    a = data.aggregate_scaled(df, "integration").set_index("model_id")
    assert a.loc["scvi", "batch"] == pytest.approx(0.75)  # graph_connectivity alone
    assert a.loc["scvi", "overall"] == pytest.approx(0.6 * 0.625 + 0.4 * 0.75)
    assert a.loc["scvi", ["n_metrics", "n_missing"]].tolist() == [3, 1]


def test_groups_come_from_metric_group_not_a_list():
    # A renamed / new metric joins its group without code changes.
    df = integration_scores()
    df.loc[df["metric_id"] == "clisi", "metric_id"] = "clisi_knn_v2"
    df.loc[df["metric_id"] == "graph_connectivity", "metric_group"] = "other"
    a = data.aggregate_scaled(df, "integration").set_index("model_id")
    assert list(a.columns[2:5]) == ["overall", "bio", "batch"] and "other" in a.columns
    assert a.loc["pca", "batch"] == pytest.approx(1.0)  # ilisi alone
    assert a.loc["pca", "other"] == pytest.approx(1.0)
    assert a.loc["pca", "overall"] == pytest.approx(0.6 * 0.25 + 0.4 * 1.0)


def test_aggregate_empty_task():
    agg = data.aggregate_scaled(annotation_scores(), "integration")
    assert agg.empty and {"overall", "bio", "batch", "n_metrics"} <= set(agg.columns)


# --- zero-shot references ------------------------------------------------------------------------


def test_zero_shot_baselines_are_labelled_references():
    zs_groups = {"knn_accuracy": "classification", "nmi_kmeans": "bio"}
    dirs = dict.fromkeys(zs_groups, True)

    def r(model, kind, a, b):
        return rows(model, kind, {"knn_accuracy": a, "nmi_kmeans": b}, dirs, task="zero_shot",
                    groups=zs_groups)

    df = pd.concat([r("celltype_embedding", "control", 1.0, 0.9), r("random_embedding", "control",
                    0.2, 0.1), r("pca", "baseline", 0.8, 0.5), r("scvi", "baseline", 0.9, 0.7),
                    r("geneformer", "transformer", 0.6, 0.5)], ignore_index=True)
    agg = data.aggregate_scaled(df, "zero_shot")
    assert list(agg.columns[:7]) == ["model_id", "variant", "model_kind", "setting",
                                     "bio", "classification", "mean_scaled"]
    setting = agg.set_index("model_id")["setting"].to_dict()
    assert setting["pca"] == setting["scvi"] == tasks.get("zero_shot").kind_settings["baseline"]
    assert "not zero-shot" in setting["pca"] and "reference" in setting["pca"]
    assert setting["geneformer"] == "zero-shot"
    assert setting["celltype_embedding"] == setting["random_embedding"] == "control"

    raw = data.with_setting(data.rank_models(df, "zero_shot"), "zero_shot")
    assert list(raw.columns[:5]) == ["model_id", "variant", "model_kind", "setting", "mean_rank"]
    assert raw.set_index("model_id").loc["scvi", "setting"] == setting["scvi"]
    # Other tasks are left alone.
    ann = data.rank_models(annotation_scores(), "annotation")
    assert data.with_setting(ann, "annotation") is ann
    assert data.setting_label("baseline", "integration") == ""


# --- QC flags ------------------------------------------------------------------------------------


def qc_scores(n_methods: int, n_outside: int, dataset: str) -> pd.DataFrame:
    """Two controls (0.2 .. 0.8) and ``n_methods`` baselines, ``n_outside`` of them at 0.9."""
    parts = [rows("positive_control", "control", {"accuracy": 0.8}, ANN, dataset=dataset),
             rows("random_labels", "control", {"accuracy": 0.2}, ANN, dataset=dataset)]
    method = rows("m0", "baseline", {"accuracy": 0.5}, ANN, dataset=dataset)
    for i in range(n_methods):  # copies of one run (make_rows per model would be slow)
        parts.append(method.assign(model_id=f"m{i}", value=0.9 if i < n_outside else 0.5))
    return results.validate(pd.concat(parts, ignore_index=True))


def test_qc_flag_threshold_exactly_ten_percent_is_not_flagged():
    df = pd.concat([qc_scores(10, 1, "exactly_ten"), qc_scores(9, 1, "above_ten"),
                    qc_scores(20, 2, "twenty_two"), qc_scores(19, 2, "nineteen_two")],
                   ignore_index=True)
    qc = data.qc_flags(df)
    assert list(qc.columns[:7]) == ["task", "dataset_id", "metric_id", "n_methods", "n_outside",
                                    "fraction_outside", "flagged"]
    q = qc.set_index("dataset_id")
    assert q.loc["exactly_ten", ["n_methods", "n_outside"]].tolist() == [10, 1]
    assert q.loc["exactly_ten", "fraction_outside"] == pytest.approx(0.1)
    assert q["flagged"].to_dict() == {"above_ten": True, "exactly_ten": False,
                                      "nineteen_two": True, "twenty_two": False}
    assert q.loc["above_ten", "fraction_outside"] == pytest.approx(1 / 9)


def test_qc_counts_below_worst_and_ignores_controls_and_unscalable():
    qc = data.qc_flags(annotation_scores()).set_index("metric_id")
    # accuracy: logreg inside, scgpt above, geneformer failed -> 1 of 2 outside.
    assert qc.loc["accuracy", ["n_methods", "n_outside", "n_above_best",
                               "n_below_worst"]].tolist() == [2, 1, 1, 0]
    assert qc.loc["ece", ["n_methods", "n_outside", "n_below_worst"]].tolist() == [3, 1, 1]
    assert bool(qc.loc["accuracy", "flagged"]) and bool(qc.loc["ece", "flagged"])
    # the flag names the control crossed and what crossed it
    assert qc.loc["accuracy", ["best_control", "worst_control", "above_best", "below_worst"]].tolist() == [
        "positive_control", "random_labels", "scgpt", ""]
    assert qc.loc["ece", ["below_worst", "above_best"]].tolist() == ["scgpt", ""]
    bal = qc.loc["balanced_accuracy"]
    assert bal["n_methods"] == 0 and bal["n_unscalable"] == 2 and not bal["flagged"]
    assert bal["best_control"] == "" and bal["above_best"] == ""
    assert math.isnan(bal["fraction_outside"])


def test_scaling_is_row_order_independent():
    df = integration_scores()
    a = data.aggregate_scaled(df, "integration")
    b = data.aggregate_scaled(df.sample(frac=1, random_state=1), "integration")
    pd.testing.assert_frame_equal(a, b)
    shuffled = df.sample(frac=1, random_state=2)
    pd.testing.assert_frame_equal(data.qc_flags(df), data.qc_flags(shuffled))


# --- static export -------------------------------------------------------------------------------


def test_export_scaled_tables_and_qc(tmp_path):
    df = pd.concat([annotation_scores(), integration_scores()], ignore_index=True)
    paths = export_static(df, tmp_path)
    assert [p.name for p in paths] == ["ranking_annotation.csv", "scaled_annotation.csv",
                                       "ranking_integration.csv", "scaled_integration.csv",
                                       "qc_flags.csv", "index.html"]
    integ = pd.read_csv(tmp_path / "scaled_integration.csv")
    assert integ["model_id"].tolist()[:4] == ["celltype_embedding", "scvi", "pca",
                                              "random_embedding"]
    assert integ["overall"].tolist()[:4] == pytest.approx([0.8, 0.575, 0.55, 0.2])
    qc = pd.read_csv(tmp_path / "qc_flags.csv", keep_default_na=False)
    assert qc.loc[qc["flagged"], ["task", "metric_id"]].values.tolist() == [
        ["annotation", "accuracy"], ["annotation", "ece"]]
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert page.count("Ranking: scaled between controls") == 2
    assert "Flagged metrics" in page and "0.575" in page
    assert "overall = 0.6 × bio + 0.4 × batch" in page  # the weights of cellarena.tasks
