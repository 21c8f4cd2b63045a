"""The claims registry: claim cards, their verdicts from a results table, and the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_intervals import _rows  # tests/ is on sys.path under pytest

from cellarena import results
from cellarena.analysis import claims
from cellarena.cards.claim import Claim, known_metrics, load_claim, load_claims
from cellarena.cards.dataset import load_card
from cellarena.errors import CardError

REPO = Path(__file__).resolve().parent.parent


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_holds_six_checked_claims_with_offline_proxies():
    cards = load_claims(REPO / "claims")
    assert len(cards) >= 6
    default_plan = yaml.safe_load((REPO / "workflow" / "config.yaml").read_text())
    for card in cards:
        assert card.source.doi.startswith("10.") and card.source.where and "TODO" not in card.source.where
        assert card.proxy is not None, card.id
        for test in (card.original, card.proxy):
            for comp in test.comparisons:
                for entry in (comp.a, comp.b):
                    # the proxy's models all exist; the original's may not exist yet (GEARS)
                    assert test is card.original or (REPO / "models" / entry.model / "model.yaml").is_file()
        for dataset in card.proxy.datasets:  # the proxy runs offline, in the default plan
            card_ = load_card(REPO / "datasets" / f"{dataset}.yaml")
            assert dataset in default_plan[card.proxy.task]["datasets"], (card.id, dataset)
            assert card_.id == dataset


def test_a_claim_without_a_source_is_refused(tmp_path):
    text = (REPO / "claims" / "sctab_xgboost_tuning.yaml").read_text()
    data = yaml.safe_load(text)
    del data["source"]
    (tmp_path / "sctab_xgboost_tuning.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CardError, match="source") as err:
        load_claim(tmp_path / "sctab_xgboost_tuning.yaml")
    assert "sctab_xgboost_tuning.yaml" in str(err.value)
    data = yaml.safe_load(text)
    data["source"]["doi"] = "not a doi"
    (tmp_path / "sctab_xgboost_tuning.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CardError, match="source.doi"):
        load_claim(tmp_path / "sctab_xgboost_tuning.yaml")
    data = yaml.safe_load(text)
    data["proxy"]["note"] = ""
    (tmp_path / "sctab_xgboost_tuning.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CardError, match="proxy.note"):
        load_claim(tmp_path / "sctab_xgboost_tuning.yaml")


# --- judging -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("relation", "low", "high", "margin", "verdict"), [
    ("greater", 0.02, 0.08, 0.0, "reproduced"),
    ("greater", 0.02, 0.08, 0.05, "inconclusive"),   # straddles the margin
    ("greater", -0.08, -0.02, 0.0, "not reproduced"),
    ("less", -0.08, -0.02, 0.0, "reproduced"),
    ("less", 0.01, 0.02, 0.0, "not reproduced"),
    ("equivalent", -0.03, 0.04, 0.05, "reproduced"),
    ("equivalent", -0.03, 0.08, 0.05, "inconclusive"),
    ("equivalent", 0.06, 0.09, 0.05, "not reproduced"),
    ("at_least", -0.04, 0.10, 0.05, "reproduced"),
    ("at_least", -0.20, -0.06, 0.05, "not reproduced"),
    ("at_least", -0.08, 0.01, 0.05, "inconclusive"),
    ("at_most", -0.3, 0.04, 0.05, "reproduced"),
    ("at_most", 0.06, 0.3, 0.05, "not reproduced"),
])
def test_each_relation_is_judged_from_the_interval(relation, low, high, margin, verdict):
    assert claims.judge(relation, low, high, margin) == verdict


def _claim(comparisons: list[dict], datasets=("toy",), min_seeds: int = 3) -> Claim:
    test = {"task": "annotation", "datasets": list(datasets), "metric": "macro_f1", "comparisons": comparisons,
            "min_seeds": min_seeds, "note": "the toy table"}
    return Claim.model_validate({
        "id": "toy_claim", "claim": "a toy claim for the tests", "original_numbers": {"gap": 0.85},
        "original_metric": "macro-F1", "source": {"citation": "A. Author, a paper (2025)",
                                                  "doi": "10.1000/toy", "where": "Table 1"},
        "original": {**test, "datasets": ["not_in_the_table"], "needs": "the network"}, "proxy": test})


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    failed = _rows("broken", "default", "transformer", 0.9, seed_of_errors=1)
    failed["value"], failed["status"], failed["status_reason"] = float("nan"), "not_applicable", "checkpoint absent"
    failed["bootstrap_json"] = "{}"
    return pd.concat([
        _rows("lr", "tuned", "baseline", 0.70, seed_of_errors=1),
        _rows("lr", "default", "baseline", 0.70, seed_of_errors=1),
        _rows("gap", "default", "transformer", 0.85, seed_of_errors=1),
        _rows("peer", "default", "transformer", 0.70, seed_of_errors=2),
        failed,
    ], ignore_index=True)


def _verdict(table, comparisons, **kw) -> tuple[str, str]:
    summary, _ = claims.evaluate(table, [_claim(comparisons, **kw)])
    row = summary.set_index("test").loc["proxy"]
    return row["verdict"], row["reason"]


def test_a_proxy_rigged_to_fail_is_not_reproduced(table):
    # "the weaker model beats the tuned baseline": its paired interval lies below 0
    verdict, reason = _verdict(table, [{"a": {"model": "lr", "variant": "tuned"}, "b": {"model": "gap"},
                                        "relation": "greater"}])
    assert verdict == "not reproduced" and "lr (tuned) vs gap on toy · stratified" in reason
    # the true statement, and its equivalence form for two models of the same skill
    assert _verdict(table, [{"a": {"model": "gap"}, "b": {"model": "lr", "variant": "tuned"},
                             "relation": "greater", "margin": 0.05}])[0] == "reproduced"
    assert _verdict(table, [{"a": {"model": "peer"}, "b": {"model": "lr"}, "relation": "equivalent",
                             "margin": 0.1}])[0] == "reproduced"
    # a margin the gap does not clear with certainty
    assert _verdict(table, [{"a": {"model": "gap"}, "b": {"model": "lr"}, "relation": "greater",
                             "margin": 0.15}])[0] in ("inconclusive", "not reproduced")
    # one failing comparison makes the claim not reproduced
    assert _verdict(table, [{"a": {"model": "gap"}, "b": {"model": "lr"}, "relation": "greater"},
                            {"a": {"model": "lr"}, "b": {"model": "gap"}, "relation": "greater"}])[0] == \
        "not reproduced"


def test_what_cannot_run_is_not_run_with_its_reason(table):
    summary, checks = claims.evaluate(table, [_claim([{"a": {"model": "gap"}, "b": {"model": "lr"},
                                                       "relation": "greater"}])])
    original = summary.set_index("test").loc["original"]
    assert original["verdict"] == "not run" and "not_in_the_table is not in this results table: the network" in \
        original["reason"]
    verdict, reason = _verdict(table, [{"a": {"model": "broken"}, "b": {"model": "lr"}, "relation": "greater"}])
    assert verdict == "not run" and "not_applicable: checkpoint absent" in reason
    verdict, reason = _verdict(table, [{"a": {"model": "gap"}, "b": {"model": "lr"}, "relation": "greater"}],
                               min_seeds=5)
    assert verdict == "not run" and "3 paired seed(s)" in reason and "needs 5" in reason
    # the numbers the verdict used are kept, beside the paper's
    row = summary.set_index("test").loc["proxy"]
    assert row["original_numbers"] == "gap 0.85 (macro-F1)" and "gap 0.8" in row["rerun_numbers"]
    assert set(checks.loc[checks["test"] == "proxy", "n_seeds"]) == {3}


def test_the_claims_command(table, tmp_path):
    results.write(table, tmp_path / "scores.parquet")
    folder = tmp_path / "claims"
    folder.mkdir()
    claim = _claim([{"a": {"model": "lr", "variant": "tuned"}, "b": {"model": "gap"}, "relation": "greater"}])
    (folder / "toy_claim.yaml").write_text(yaml.safe_dump(claim.model_dump(mode="json"), allow_unicode=True))
    out = subprocess.run([sys.executable, "-m", "cellarena", "claims", "--scores", str(tmp_path / "scores.parquet"),
                          "--claims-dir", str(folder), "--out-dir", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    verdicts = pd.read_csv(tmp_path / "out" / "verdicts.csv")
    assert verdicts[["test", "verdict"]].values.tolist() == [["original", "not run"], ["proxy", "not reproduced"]]
    assert len(pd.read_csv(tmp_path / "out" / "checks.csv")) == 2
    # no claim cards (a checkout without claims/): empty tables, exit 0, and it says so
    empty = subprocess.run([sys.executable, "-m", "cellarena", "claims", "--scores", str(tmp_path / "scores.parquet"),
                            "--claims-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "out2")],
                           capture_output=True, text=True)
    assert empty.returncode == 0 and "no claim cards" in empty.stdout, empty.stderr
    assert pd.read_csv(tmp_path / "out2" / "verdicts.csv").empty


# --- composite metrics (AvgBIO, the control-scaled mean) ----------------------------------------

# Integration rows on one dataset, three seeds. The controls span 0..1 on the bio metrics and
# 0.2..0.6 on iLISI, so a value v scales to v (bio) and (v - 0.2) / 0.4 (iLISI):
#
# model      kind      nmi          ari   silhouette_label  ilisi | avg_bio          mean_scaled
# good       control   1.0          1.0   1.0               0.6   | 1.0              1.0
# bad        control   0.0          0.0   0.0               0.2   | 0.0              0.0
# a          baseline  0.6+0.01*s   0.5   0.7               0.4   | (1.8+0.01s)/3    (2.3+0.01s)/4
# b          trans.    0.3          0.2   0.4               0.8   | 0.3              (0.9+1.5)/4 = 0.6
# partial    trans.    0.9          0.9   (none)            0.6   | no value         no value
COMPOSITE_VALUES = {
    "good": ("control", lambda s: (1.0, 1.0, 1.0, 0.6)),
    "bad": ("control", lambda s: (0.0, 0.0, 0.0, 0.2)),
    "a": ("baseline", lambda s: (0.6 + 0.01 * s, 0.5, 0.7, 0.4)),
    "b": ("transformer", lambda s: (0.3, 0.2, 0.4, 0.8)),
    "partial": ("transformer", lambda s: (0.9, 0.9, None, 0.6)),
}


@pytest.fixture(scope="module")
def integration_table() -> pd.DataFrame:
    frames = []
    for model, (kind, values) in COMPOSITE_VALUES.items():
        for seed in range(3):
            run = dict(task="integration", dataset_id="toy", dataset_version=1, label_quality="expert",
                       split_id=f"all_cells_seed{seed}", split_hash=f"h{seed}", seed=seed, model_id=model,
                       model_version="1", model_kind=kind, variant="default", status="ok", status_reason="",
                       params_json="{}", n_train=0, n_test=100, suite_version="0", git_commit="abc", created_utc="",
                       device="cpu", leakage="no_corpus", leaked_fraction=float("nan"), runtime_json="{}",
                       wall_s=1.0, peak_rss_mb=1.0)
            metrics = dict(zip(("nmi", "ari", "silhouette_label", "ilisi"), values(seed)))
            metrics = {k: v for k, v in metrics.items() if v is not None}
            frames.append(results.make_rows(run, metrics, dict.fromkeys(metrics, True)))
    return pd.concat(frames, ignore_index=True)


def test_composites_are_computed_per_run_from_the_table(integration_table):
    avg = claims.metric_rows(integration_table, "integration", "avg_bio").set_index(["model_id", "seed"])["value"]
    assert avg[("a", 2)] == pytest.approx((0.62 + 0.5 + 0.7) / 3)
    assert avg[("b", 0)] == pytest.approx(0.3) and avg[("good", 1)] == pytest.approx(1.0)
    assert "partial" not in avg.index.get_level_values("model_id")  # a part is missing: no value
    scaled = claims.metric_rows(integration_table, "integration", "mean_scaled").set_index(["model_id", "seed"])
    assert scaled.loc[("a", 1), "value"] == pytest.approx((0.61 + 0.5 + 0.7 + 0.5) / 4)
    assert scaled.loc[("b", 0), "value"] == pytest.approx(0.6)  # iLISI above the best control: 1.5, not clipped
    assert scaled.loc[("bad", 2), "value"] == pytest.approx(0.0)
    assert "partial" not in scaled.index.get_level_values("model_id")
    assert set(scaled["bootstrap_json"]) == {"{}"} and scaled["higher_is_better"].all()


def _composite_claim(metric: str, comparisons: list[dict]) -> Claim:
    test = {"task": "integration", "datasets": ["toy"], "metric": metric, "comparisons": comparisons,
            "note": "the toy table"}
    return Claim.model_validate({
        "id": "toy_composite", "claim": "a toy claim on a composite score", "original_metric": metric,
        "source": {"citation": "A. Author, a paper (2025)", "doi": "10.1000/toy", "where": "Table 1"},
        "original": {**test, "datasets": ["not_in_the_table"]}, "proxy": test})


def test_claims_are_judged_on_composites(integration_table):
    def proxy(metric, comparisons):
        summary, checks = claims.evaluate(integration_table, [_composite_claim(metric, comparisons)])
        return summary.set_index("test").loc["proxy"], checks[checks["test"] == "proxy"]

    a_over_b = [{"a": {"model": "a"}, "b": {"model": "b"}, "relation": "greater"}]
    row, checks = proxy("avg_bio", a_over_b)
    assert row["verdict"] == "reproduced"
    assert checks["a_value"].iloc[0] == pytest.approx((1.81) / 3) and checks["b_value"].iloc[0] == pytest.approx(0.3)
    # on the scaled mean the order turns: b's iLISI lies beyond the best control
    row, checks = proxy("mean_scaled", a_over_b)
    assert row["verdict"] == "not reproduced"
    # differences b - a per seed: 0.025, 0.0225, 0.02 -> mean 0.0225, sd 0.0025, t(2) interval
    half = 4.302652729911275 * 0.0025 / 3 ** 0.5
    assert -checks["difference"].iloc[0] == pytest.approx(0.0225)
    assert (checks["ci_low"].iloc[0], checks["ci_high"].iloc[0]) == pytest.approx((-0.0225 - half, -0.0225 + half))
    row, _ = proxy("avg_bio", [{"a": {"model": "partial"}, "b": {"model": "b"}, "relation": "greater"}])
    assert row["verdict"] == "not run" and "partial (default) on toy has no avg_bio value" in row["reason"]


def test_a_claim_on_an_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="'avg_bio' is not a metric of task annotation"):
        Claim.model_validate({**_claim([{"a": {"model": "a"}, "b": {"model": "b"}, "relation": "greater"}])
                             .model_dump(mode="json"), "proxy": {
                                 "task": "annotation", "datasets": ["toy"], "metric": "avg_bio", "note": "x",
                                 "comparisons": [{"a": {"model": "a"}, "b": {"model": "b"}, "relation": "greater"}]}})
    assert {"avg_bio", "mean_scaled", "ilisi"} <= known_metrics("zero_shot")
