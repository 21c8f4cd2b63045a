"""Uncertainty: the within-split bootstrap, intervals over seeds, paired verdicts and rank intervals."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from cellarena import results
from cellarena.analysis import intervals
from cellarena.metrics import bootstrap
from cellarena.run import run_task

# --- the bootstrap itself ------------------------------------------------------------------------


def test_resamples_are_a_function_of_the_split_alone():
    a = bootstrap.resamples(50, "stratified_seed0|abc", 20)
    assert a.shape == (20, 50) and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, bootstrap.resamples(50, "stratified_seed0|abc", 20))
    assert not np.array_equal(a, bootstrap.resamples(50, "stratified_seed1|abc", 20))
    with pytest.raises(ValueError, match="cannot resample 0"):
        bootstrap.resamples(0, "x")


def test_replicates_are_the_metric_on_each_resample():
    truth = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    identity = np.arange(6)[None, :]
    assert bootstrap.replicate(accuracy_score, (truth, pred), identity)[0] == pytest.approx(4 / 6)
    # a hand-written resample: cells 0, 0, 2, 3, 5, 5 -> right, right, right, right, wrong, wrong
    index = np.array([[0, 0, 2, 3, 5, 5]])
    assert bootstrap.replicate(accuracy_score, (truth, pred), index)[0] == pytest.approx(4 / 6)
    index = np.array([[0, 0, 0, 2, 2, 2]])
    assert bootstrap.replicate(accuracy_score, (truth, pred), index)[0] == 1.0
    # per-unit means leave non-finite units out, as the point value does
    values = np.array([1.0, np.nan, 3.0])
    np.testing.assert_allclose(bootstrap.replicate_mean(values, np.array([[0, 1, 2], [1, 1, 2], [1, 1, 1]])),
                               [2.0, 3.0, np.nan])


def test_replicates_round_trip_through_the_results_column():
    text = bootstrap.encode("cells", 6, np.array([0.123456789, np.nan, 1.0]))
    unit, n, values = bootstrap.decode(text)
    assert (unit, n) == ("cells", 6)
    np.testing.assert_allclose(values, [0.1234568, np.nan, 1.0])
    assert bootstrap.decode("{}")[0] == "" and bootstrap.decode("")[2].size == 0
    with pytest.raises(ValueError, match="unknown bootstrap unit"):
        bootstrap.encode("genes", 3, np.zeros(2))


# --- intervals over seeds, on hand-computed examples -----------------------------------------------


def test_seeds_alone_give_a_student_t_interval():
    res = intervals.combine(np.array([1.0, 2.0, 3.0]), None)
    # mean 2, sd 1, t(0.975, 2 df) = 4.302653, half-width 4.302653 / sqrt(3) = 2.484138
    assert res["mean"] == 2.0 and res["sd"] == pytest.approx(1.0) and res["n_seeds"] == 3
    assert res["ci_low"] == pytest.approx(2 - 2.484138, abs=1e-6)
    assert res["ci_high"] == pytest.approx(2 + 2.484138, abs=1e-6)
    assert res["interval_from"] == "seeds"


def test_the_test_sample_decides_when_seeds_agree_better_than_it_allows():
    # two seeds with the same value (s^2 = 0) but a within-split variance of 0.01 each:
    # Var(mean) = 0.01 / 2, normal quantile 1.959964 -> half-width 0.138590
    res = intervals.combine(np.array([0.5, 0.5]), np.array([0.01, 0.01]))
    assert res["interval_from"] == "test units"
    assert res["ci_high"] - 0.5 == pytest.approx(1.959964 * np.sqrt(0.005), abs=1e-6)
    # one seed: only the test sample is there
    one = intervals.combine(np.array([0.7]), np.array([0.0004]))
    assert one["ci_low"] == pytest.approx(0.7 - 1.959964 * 0.02, abs=1e-6) and np.isnan(one["sd"])
    # seeds spread more than the test sample allows: the seeds decide (t with S - 1 df)
    spread = intervals.combine(np.array([0.1, 0.5, 0.9]), np.array([1e-4, 1e-4, 1e-4]))
    assert spread["interval_from"] == "seeds" and spread["ci_high"] == pytest.approx(0.5 + 4.302653 * 0.4 / np.sqrt(3),
                                                                                     abs=1e-6)
    # nothing to go on
    none = intervals.combine(np.array([0.7]), None)
    assert none["interval_from"] == "none" and np.isnan(none["ci_low"])


def test_verdict_respects_the_direction_and_the_margin():
    assert intervals.verdict(0.01, 0.05, True) == "better"
    assert intervals.verdict(0.01, 0.05, False) == "worse"
    assert intervals.verdict(-0.01, 0.05, True) == "indistinguishable"
    assert intervals.verdict(0.01, 0.05, True, margin=0.02) == "indistinguishable"
    assert intervals.verdict(np.nan, np.nan, True) == "indistinguishable"


# --- paired comparisons on rows as the drivers write them -------------------------------------------

N_CELLS, N_SEEDS = 400, 3


def _rows(model_id: str, variant: str, kind: str, accuracy: float, seed_of_errors: int) -> pd.DataFrame:
    """Rows of a model that is right on a fraction ``accuracy`` of the test cells of each seed's split,
    with the same replicates the annotation driver computes (same split -> same resamples)."""
    frames = []
    for seed in range(N_SEEDS):
        rng = np.random.default_rng([seed, 7])
        truth = rng.integers(0, 4, N_CELLS)
        wrong = np.random.default_rng([seed, seed_of_errors]).random(N_CELLS) > accuracy
        pred = np.where(wrong, (truth + 1) % 4, truth)
        split_id, split_hash = f"stratified_seed{seed}", f"hash{seed}"
        index = bootstrap.resamples(N_CELLS, f"{split_id}|{split_hash}", 200)
        fn = lambda t, p: f1_score(t, p, average="macro")  # noqa: E731
        run = dict(task="annotation", dataset_id="toy", dataset_version=1, label_quality="expert",
                   split_id=split_id, split_hash=split_hash, seed=seed, model_id=model_id, model_version="1",
                   model_kind=kind, variant=variant, status="ok", status_reason="", params_json="{}",
                   n_train=800, n_test=N_CELLS, suite_version="0", git_commit="abc", created_utc="", device="cpu",
                   leakage="no_corpus", leaked_fraction=float("nan"), runtime_json="{}", wall_s=1.0, peak_rss_mb=1.0)
        frames.append(results.make_rows(run, {"macro_f1": fn(truth, pred)}, {"macro_f1": True},
                                        bootstrap={"macro_f1": bootstrap.encode(
                                            "cells", N_CELLS, bootstrap.replicate(fn, (truth, pred), index))}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return pd.concat([
        _rows("lr", "tuned", "baseline", 0.70, seed_of_errors=1),
        _rows("lr", "default", "baseline", 0.70, seed_of_errors=1),   # the same predictions as tuned
        _rows("twin", "default", "transformer", 0.70, seed_of_errors=1),  # identical to the baseline
        _rows("peer", "default", "transformer", 0.70, seed_of_errors=2),  # same skill, other errors
        _rows("gap", "default", "transformer", 0.85, seed_of_errors=1),  # fixes half the baseline's errors
        _rows("worse", "default", "transformer", 0.55, seed_of_errors=1),
    ], ignore_index=True)


def test_every_number_gets_its_seeds_and_an_interval(table):
    summary = intervals.summarize(table)
    row = summary.set_index(["model_id", "variant"]).loc[("gap", "default")]
    assert row["n_seeds"] == 3 and row["unit"] == "cells"
    assert row["ci_low"] < row["mean"] < row["ci_high"] and row["ci_high"] - row["ci_low"] < 0.2


def test_paired_verdicts_against_the_best_tuned_baseline(table):
    cmp = intervals.compare(table, "annotation").set_index(["model_id", "variant", "against"])
    against = "best tuned baseline"
    assert (cmp["against_model"].unique() == "lr").all()
    twin = cmp.loc[("twin", "default", against)]
    assert twin["verdict"] == "indistinguishable" and twin["difference"] == 0.0
    assert cmp.loc[("peer", "default", against), "verdict"] == "indistinguishable"
    gap = cmp.loc[("gap", "default", against)]
    assert gap["verdict"] == "better" and gap["ci_low"] > 0.05 and gap["n_seeds"] == 3
    assert cmp.loc[("worse", "default", against), "verdict"] == "worse"
    # the tuned variant against its own default
    assert cmp.loc[("lr", "tuned", "own default"), "verdict"] == "indistinguishable"
    # pairing: the same test cells for both, so an identical model differs by exactly nothing on
    # every resample, although each alone has an interval of its own
    assert twin["ci_low"] == twin["ci_high"] == 0.0
    alone = intervals.summarize(table).set_index(["model_id", "variant"]).loc[("twin", "default")]
    assert alone["ci_high"] - alone["ci_low"] > 0.01


def test_rank_intervals_and_the_multi_dataset_test(table):
    ranks = intervals.rank_intervals(table, "annotation").set_index(["model_id", "variant"])
    assert ranks.loc[("gap", "default"), "mean_rank"] == 1.0 and ranks.loc[("gap", "default"), "rank_high"] <= 1.5
    assert ranks.loc[("worse", "default"), "rank_low"] == len(ranks)
    assert (ranks["rank_low"] <= ranks["mean_rank"]).all() and (ranks["mean_rank"] <= ranks["rank_high"]).all()
    # one dataset is one block: no test across datasets, and the reason says so
    assert "at least 2 blocks" in intervals.multi_dataset_tests(table, "annotation")["reason"]
    second = table.assign(dataset_id="toy2")
    second["value"] = second["value"] + np.where(second["model_id"] == "peer", 0.01, 0.0)
    tests = intervals.multi_dataset_tests(pd.concat([table, second]), "annotation")
    assert tests["n_blocks"] == 2 and tests["best"] == "gap/default" and 0 <= tests["friedman_p"] <= 1
    assert set(tests["posthoc"]["p_holm"]) and (tests["posthoc"]["p_holm"] >= tests["posthoc"]["p"]).all()


def test_rankings_compare_like_with_like(table):
    """A tuned variant run on fewer datasets than the default variants is ranked only on those."""
    second = table[table["variant"] == "default"].assign(dataset_id="toy2")
    groups = intervals.comparable_groups(pd.concat([table, second]), "annotation")
    cells, members = groups[0]
    assert {d for d, _, _ in cells} == {"toy", "toy2"} and ("lr", "tuned") not in members
    cells, members = groups[1]
    assert {d for d, _, _ in cells} == {"toy"} and ("lr", "tuned") in members and len(members) == 6


# --- the real drivers write the replicates --------------------------------------------------------


def test_annotation_runs_carry_paired_replicates(pbmc68k_prepared, pbmc68k_split, repo):
    knn = run_task("annotation", pbmc68k_prepared, pbmc68k_split, repo / "models" / "knn", seed=0)
    majority = run_task("annotation", pbmc68k_prepared, pbmc68k_split, repo / "models" / "majority_class",
                        seed=0, options={"bootstrap_replicates": 50})
    rows = knn[(knn["subgroup"] == "") & (knn["metric_id"] == "macro_f1")].iloc[0]
    unit, n, values = bootstrap.decode(rows["bootstrap_json"])
    assert unit == "cells" and n == rows["n_test"] and values.size == bootstrap.DEFAULT_REPLICATES
    assert abs(np.mean(values) - rows["value"]) < 0.05 and np.std(values) > 0
    assert (knn.loc[knn["subgroup"] != "", "bootstrap_json"] == "{}").all()
    assert bootstrap.decode(majority.loc[majority["subgroup"] == "", "bootstrap_json"].iloc[0])[2].size == 50
    # the control against the best tuned baseline (replicate counts differ: compared unpaired)
    cmp = intervals.compare(pd.concat([knn.assign(variant="tuned"), majority]), "annotation")
    assert cmp.set_index("model_id").loc["majority_class", "verdict"] == "worse"


def test_another_metric_is_compared_against_the_same_reference(table):
    """The reference is the best baseline on the primary metric; comparing another metric keeps it
    (a non-primary metric once found no reference and gave an empty table)."""
    other = table.assign(metric_id="macro_f1_again")
    cmp = intervals.compare(pd.concat([table, other], ignore_index=True), "annotation", metric_id="macro_f1_again")
    primary = intervals.compare(table, "annotation")
    assert set(cmp["metric_id"]) == {"macro_f1_again"} and len(cmp) == len(primary) > 0
    assert cmp["verdict"].tolist() == primary["verdict"].tolist()
    assert intervals.compare(table, "annotation", metric_id="absent").empty


def test_the_verdicts_command(table, tmp_path):
    results.write(table, tmp_path / "scores.parquet")
    out = subprocess.run([sys.executable, "-m", "cellarena", "verdicts", str(tmp_path / "scores.parquet"),
                          "--csv", str(tmp_path / "v.csv")], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "annotation · macro_f1" in out.stdout and "better" in out.stdout
    verdicts = pd.read_csv(tmp_path / "v.csv").set_index(["model_id", "variant", "against"])
    assert verdicts.loc[("gap", "default", "best tuned baseline"), "verdict"] == "better"
    bad = subprocess.run([sys.executable, "-m", "cellarena", "verdicts", str(tmp_path / "scores.parquet"),
                          "--task", "perturbation"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no results of task 'perturbation'" in bad.stderr + bad.stdout
