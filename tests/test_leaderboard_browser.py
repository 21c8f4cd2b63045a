"""The Streamlit leaderboard: fast in-process checks (AppTest), then the real server read in
headless Chromium (marked slow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cellarena import results

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_S = 60
MODELS = {"logreg": "baseline", "scgpt": "transformer", "shuffled_labels": "control"}
INT_MODELS = {"celltype_embedding": "control", "random_embedding": "control", "scvi": "baseline",
              "scgpt": "transformer"}
# Integration metrics by group (scaled between the two controls, by hand):
#                     nmi_kmeans clisi | ilisi graph_connectivity -> bio    batch overall
# celltype_embedding  0.8        1.0   | 0.1   1.0                   1      0.5   0.8
# random_embedding    0.2        0.5   | 0.9   0.6                   0      0.5   0.2
# scvi                0.5        0.875 | 0.3   0.9                   0.625  0.5   0.575
# scgpt               0.7        0.9   | 0.5   0.8                   0.8167 0.5   0.69
INT_GROUPS = {"nmi_kmeans": "bio", "clisi": "bio", "ilisi": "batch", "graph_connectivity": "batch"}
INT_VALUES = {
    "celltype_embedding": (0.8, 1.0, 0.1, 1.0),
    "random_embedding": (0.2, 0.5, 0.9, 0.6),
    "scvi": (0.5, 0.875, 0.3, 0.9),
    "scgpt": (0.7, 0.9, 0.5, 0.8),
}


def run_record(model: str, kind: str, dataset: str, quality: str, ok: bool, task: str) -> dict:
    return dict(
        task=task, dataset_id=dataset, dataset_version=1, label_quality=quality,
        split_id="random_s0", split_hash="0" * 16, seed=0, model_id=model, model_version="1",
        model_kind=kind, variant="default", status="ok" if ok else "failed",
        status_reason="" if ok else "CUDA out of memory", params_json="{}", tuning_json="{}", runtime_json="{}", leakage="no_corpus", leaked_fraction=float("nan"), n_train=80, n_test=20,
        suite_version="0.1.0", git_commit="abc1234", created_utc="2024-01-01T00:00:00Z",
        wall_s=1.0, peak_rss_mb=100.0, device="cpu",
    )


def _rows(model: str, dataset: str, quality: str, acc: float | None) -> pd.DataFrame:
    run = run_record(model, MODELS[model], dataset, quality, acc is not None, "annotation")
    values = {"accuracy": acc, "macro_f1": None if acc is None else acc - 0.1}
    return results.make_rows(run, values, {"accuracy": True, "macro_f1": True})


def _integration_rows(model: str) -> pd.DataFrame:
    run = run_record(model, INT_MODELS[model], "kang_ifnb", "expert", True, "integration")
    values = dict(zip(INT_GROUPS, INT_VALUES[model]))
    return results.make_rows(run, values, dict.fromkeys(INT_GROUPS, True), INT_GROUPS)


# Perturbation: pearson_delta_top20 overall and by category (the two categories of one split).
PERT_MODELS = {"replicate_half": ("control", 0.99, 0.98, 0.97), "additive": ("baseline", 0.60, 0.90, 0.05),
               "no_change": ("baseline", 0.20, 0.30, 0.05), "permuted_delta": ("control", 0.00, 0.01, 0.0)}


def _perturbation_rows(model: str) -> pd.DataFrame:
    kind, overall, seen2, unseen = PERT_MODELS[model]
    run = run_record(model, kind, "proxy_screen", "synthetic", True, "perturbation")
    values = {"pearson_delta_top20": {"": overall, "double_seen2": seen2, "single_unseen": unseen},
              "mse_top20": 1.0 - overall}
    return results.make_rows(run, values, {"pearson_delta_top20": True, "mse_top20": False})


def scores_table() -> pd.DataFrame:
    return pd.concat([
        *(_perturbation_rows(m) for m in PERT_MODELS),
        _rows("logreg", "pbmc_small", "expert", 0.90),
        _rows("scgpt", "pbmc_small", "expert", 0.93),
        _rows("shuffled_labels", "pbmc_small", "expert", 0.20),
        _rows("logreg", "lung_atlas", "silver", 0.70),
        _rows("scgpt", "lung_atlas", "silver", None),
        _rows("shuffled_labels", "lung_atlas", "silver", 0.25),
        *(_integration_rows(m) for m in INT_MODELS),
    ], ignore_index=True)


def _require(condition: bool, why: str) -> None:
    """Skip locally, but fail on CI, where the browser is installed on purpose."""
    if not condition:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"streamlit not healthy after {WAIT_S} s:\n{log.read_text()}")


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[str]:
    """Serve the app on a free port for a small scores file; yields the base URL."""
    _require(CHROMIUM.exists(), f"{CHROMIUM} not installed (apt-get install chromium)")
    _require(_has_playwright(), "playwright is not installed")
    scores = tmp_path / "scores.parquet"
    results.write(scores_table(), scores)

    port = _free_port()
    log = tmp_path / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "leaderboard" / "app.py"),
           "--server.address", "127.0.0.1", "--server.port", str(port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", "--scores", str(scores)]
    env = {k: v for k, v in os.environ.items() if k != "CELLARENA_SCORES"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{base}/_stcore/health", proc, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- fast checks of the script without a browser (streamlit's AppTest runs it in-process) ---


def test_scores_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    from cellarena.leaderboard.app import DEFAULT_SCORES, scores_path

    monkeypatch.delenv("CELLARENA_SCORES", raising=False)
    assert scores_path([]) == Path(DEFAULT_SCORES)
    monkeypatch.setenv("CELLARENA_SCORES", "from_env.parquet")
    assert scores_path([]) == Path("from_env.parquet")
    assert scores_path(["--scores", "from_argv.parquet"]) == Path("from_argv.parquet")


def app_test(monkeypatch: pytest.MonkeyPatch, scores: Path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CELLARENA_SCORES", str(scores))
    return AppTest.from_file(str(REPO / "leaderboard" / "app.py"), default_timeout=WAIT_S).run()


def table_with(at, column: str, key: str = "model_id", value: str | None = None) -> pd.DataFrame:
    """The first table of the app with ``column`` (and ``value`` in its ``key`` column)."""
    return next(t.value for t in at.table if column in t.value.columns
                and (value is None or value in set(t.value.get(key, ()))))


def rankings(at, model: str) -> list[pd.DataFrame]:
    """The ranking tables (those with mean_rank) of the task that holds ``model``, in page order."""
    return [t.value for t in at.table if "mean_rank" in t.value.columns and "variant" in t.value.columns
            and model in set(t.value["model_id"]) and "rank_low" in t.value.columns]


def test_app_missing_file_says_make_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    at = app_test(monkeypatch, tmp_path / "missing.parquet")
    assert not at.exception
    assert len(at.error) == 1 and "make run" in at.error[0].value


def test_app_renders_tabs_and_ranking(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    results.write(scores_table(), tmp_path / "scores.parquet")
    at = app_test(monkeypatch, tmp_path / "scores.parquet")
    assert not at.exception
    assert [t.label for t in at.tabs] == ["Cell-type annotation", "Batch integration",
                                          "Zero-shot embeddings", "Perturbation response", "Published claims"]
    assert [i.value for i in at.info] == ["No results for this task yet."]
    # Like with like: scgpt failed on lung_atlas, so the main ranking holds the entries with both
    # datasets, and scgpt is ranked with them on pbmc_small alone, its failed run counted
    main, fewer = rankings(at, "logreg")[:2]
    assert main["model_id"].tolist() == ["logreg", "shuffled_labels"] and main["n_seeds"].tolist() == [1, 1]
    assert fewer["model_id"].tolist() == ["scgpt", "logreg", "shuffled_labels"]
    assert fewer.set_index("model_id").loc["scgpt", "status"] == "1 ok, 1 failed"
    assert {"rank_low", "rank_high"} <= set(main.columns)
    # scgpt against the best baseline (logreg: none was tuned here), with a verdict
    verdicts = table_with(at, "indistinguishable", "entry")
    assert verdicts["entry"].tolist() == ["scgpt", "shuffled_labels"]
    assert "lung_atlas" in at.warning[0].value
    # every chart draws intervals: a rule from low to high along an axis (y2 or x2)
    specs = [json.dumps(json.loads(c.proto.spec)) for c in at.get("vega_lite_chart")]
    assert len(specs) >= 6 and all('"rule"' in s and ('"y2"' in s or '"x2"' in s) for s in specs)
    assert sum('"strokeDash"' in s for s in specs) >= 2  # the tie line of each model-vs-baseline chart
    # Annotation has one control per dataset: nothing to scale between, nothing scored as 0.
    ann_scaled = table_with(at, "n_metrics", "model_id", "scgpt")
    assert ann_scaled["n_metrics"].tolist() == [0, 0, 0]
    assert any("fewer than two distinct control values" in c.value for c in at.caption)

    cost = table_with(at, "total_wall_s", "model_id", "scgpt")
    assert set(cost["model_id"]) == {"scgpt", "logreg", "shuffled_labels"}
    assert {"total_wall_s", "pretrain_s", "attention"} <= set(cost.columns)
    raw, scaled = rankings(at, "scvi")[0], table_with(at, "overall", "model_id", "scvi")
    assert set(raw["model_id"]) == set(INT_MODELS) and "mean_rank" in raw.columns
    assert scaled["model_id"].tolist() == ["celltype_embedding", "scgpt", "scvi",
                                           "random_embedding"]
    s = scaled.set_index("model_id")
    assert s["overall"].astype(float).tolist() == pytest.approx([0.8, 0.69, 0.575, 0.2])
    assert s.loc["scvi", ["bio", "batch"]].astype(float).tolist() == pytest.approx([0.625, 0.5])
    assert s["n_metrics"].astype(int).tolist() == [4, 4, 4, 4]

    # Perturbation: baselines next to each other between the controls, and the category breakdown
    pert_raw = rankings(at, "additive")[0]
    pert_scaled = table_with(at, "mean_scaled", "model_id", "additive")
    categories = table_with(at, "double_seen2", "model_id", "additive")
    assert pert_raw["model_id"].tolist() == ["replicate_half", "additive", "no_change", "permuted_delta"]
    assert pert_scaled.set_index("model_id")["mean_scaled"].astype(float)["additive"] == pytest.approx(
        0.6 / 0.99, abs=1e-3)
    by_model = categories.set_index("model_id")
    assert by_model.loc["additive", "double_seen2"] == pytest.approx(0.90)
    assert by_model.loc["no_change", "single_unseen"] == pytest.approx(0.05)
    assert any("Synthetic data" in w.value and "proxy_screen" in w.value for w in at.warning)


def zero_shot_rows() -> pd.DataFrame:
    """Zero-shot results on kang_ifnb: two controls, the pca reference and geneformer."""
    groups = {"knn_accuracy": "classification", "nmi_kmeans": "bio"}
    kinds = {"celltype_embedding": "control", "random_embedding": "control", "pca": "baseline",
             "geneformer": "transformer"}
    values = {"celltype_embedding": (1.0, 0.9), "random_embedding": (0.2, 0.1),
              "pca": (0.8, 0.5), "geneformer": (0.6, 0.5)}
    return pd.concat([results.make_rows(run_record(m, k, "kang_ifnb", "expert", True, "zero_shot"),
                                        dict(zip(groups, values[m])), dict.fromkeys(groups, True), groups)
                      for m, k in kinds.items()], ignore_index=True)


def test_app_zero_shot_marks_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    results.write(zero_shot_rows(), tmp_path / "scores.parquet")
    at = app_test(monkeypatch, tmp_path / "scores.parquet")
    assert not at.exception
    raw, scaled = rankings(at, "pca")[0], table_with(at, "mean_scaled", "model_id", "pca")
    for table in (raw, scaled):
        setting = table.set_index("model_id")["setting"]
        assert "not zero-shot" in setting["pca"] and setting["geneformer"] == "zero-shot"
    assert {"bio", "classification", "mean_scaled"} <= set(scaled.columns)
    assert any("References, not zero-shot" in m.value and "pca" in m.value for m in at.markdown)


def test_app_leaked_results_can_be_hidden_or_imputed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    df = scores_table()
    leaked = (df.model_id == "scgpt") & (df.dataset_id == "pbmc_small")
    df.loc[leaked, "leakage"] = "leaked"
    results.write(df, tmp_path / "scores.parquet")
    at = app_test(monkeypatch, tmp_path / "scores.parquet")
    assert not at.exception
    # ranked on pbmc_small alone (it failed on lung_atlas), where its run is leaked
    assert rankings(at, "scgpt")[0].set_index("model_id").loc["scgpt", "leakage"] == "leaked"
    assert not any("pretraining corpus" in w.value for w in at.warning)  # "show" is the default

    at.radio(key="leakage_policy").set_value("impute").run()
    assert not at.exception
    assert any("evaluated on cells of their own pretraining corpus" in w.value for w in at.warning)
    # the reference of annotation (logistic_regression) did not run here: the leaked run is dropped
    changes = next(t.value for t in at.table if "action" in t.value.columns)
    assert changes[["model_id", "action"]].values.tolist() == [["scgpt", "dropped: no reference value"]]

    at.radio(key="leakage_policy").set_value("hide").run()
    ranking = rankings(at, "scgpt")[0].set_index("model_id")
    assert ranking.loc["scgpt", "n_datasets"] == 0  # its scored run on pbmc_small is hidden
    assert pd.isna(ranking.loc["scgpt", "mean_rank"])  # listed at the end of the main ranking, unranked


# --- the real server in a real browser ---------------------------------------------------


@pytest.mark.slow
def test_leaderboard_page_shows_ranking(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(WAIT_S * 1000)
            page.goto(server)
            table = page.locator('.st-key-raw_annotation [data-testid="stTable"]')
            table.locator("table").wait_for(state="visible")
            text = table.inner_text()
            # Let the chart draw so the screenshot shows the whole page.
            page.locator('[data-testid="stVegaLiteChart"] svg, '
                         '[data-testid="stVegaLiteChart"] canvas').first.wait_for(state="visible")
            page.screenshot(path=str(tmp_path / "leaderboard.png"), full_page=True)

            # like with like: scgpt failed on lung_atlas, so it is ranked on pbmc_small in a second table
            fewer = page.locator('.st-key-raw_annotation_2 [data-testid="stTable"]').inner_text()
            for model in MODELS:
                assert model in text + fewer, f"{model} missing from the ranking tables:\n{text}\n{fewer}"
            assert "scgpt" in fewer and "1 ok, 1 failed" in fewer  # its failed run is reported, not scored
            assert "rank_low" in text and "n_seeds" in text
            # the model against the best baseline: verdicts, and its chart
            assert "indistinguishable" in page.locator('.st-key-verdicts_annotation').inner_text()
            assert page.get_by_text("Model vs best tuned baseline").first.is_visible()
            assert page.get_by_text("Silver labels").first.is_visible()
            assert "lung_atlas" in page.locator('[data-testid="stAlert"]').first.inner_text()
            assert page.locator('[data-testid="stException"]').count() == 0

            # The integration tab: raw and control-scaled tables, both naming every model.
            page.get_by_role("tab", name="Batch integration").click()
            raw = page.locator('.st-key-raw_integration [data-testid="stTable"] table')
            scaled = page.locator('.st-key-scaled_integration [data-testid="stTable"] table')
            raw.wait_for(state="visible")
            scaled.wait_for(state="visible")
            assert page.get_by_text("Ranking: raw metric values").nth(1).is_visible()
            assert page.get_by_text("Ranking: scaled between controls").nth(1).is_visible()
            raw_text, scaled_text = raw.inner_text(), scaled.inner_text()
            page.screenshot(path=str(tmp_path / "integration.png"), full_page=True)
            for model in INT_MODELS:
                assert model in raw_text, f"{model} missing from raw table:\n{raw_text}"
                assert model in scaled_text, f"{model} missing from scaled table:\n{scaled_text}"
            for col in ("mean_rank", "nmi_kmeans", "ilisi"):
                assert col in raw_text
            for col in ("overall", "bio", "batch", "n_metrics", "0.575"):
                assert col in scaled_text
            assert page.locator('[data-testid="stException"]').count() == 0

            # The perturbation tab: the baselines side by side, and the per-category table.
            page.get_by_role("tab", name="Perturbation response").click()
            pert = page.locator('.st-key-raw_perturbation [data-testid="stTable"] table')
            cats = page.locator('.st-key-categories_perturbation [data-testid="stTable"] table')
            pert.wait_for(state="visible")
            cats.wait_for(state="visible")
            pert_text, cats_text = pert.inner_text(), cats.inner_text()
            for model in PERT_MODELS:
                assert model in pert_text and model in cats_text
            assert "double_seen2" in cats_text and "single_unseen" in cats_text
            assert page.get_by_text("Synthetic data").first.is_visible()
            assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
    assert (tmp_path / "leaderboard.png").stat().st_size > 10_000


def tuned_rows() -> pd.DataFrame:
    """A tuned logreg run on pbmc_small (6 trials), to pair with the default one of scores_table()."""
    tuned = run_record("logreg", "baseline", "pbmc_small", "expert", True, "annotation")
    tuned.update(variant="tuned", tuning_json='{"n_trials": 6, "metric": "macro_f1", "default_value": 0.7, '
                                              '"best_value": 0.75}')
    return results.make_rows(tuned, {"accuracy": 0.95, "macro_f1": 0.85}, {"accuracy": True, "macro_f1": True})


def test_app_shows_tuned_next_to_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    results.write(pd.concat([scores_table(), tuned_rows()], ignore_index=True), tmp_path / "scores.parquet")
    at = app_test(monkeypatch, tmp_path / "scores.parquet")
    assert not at.exception
    # the tuned variant has pbmc_small only: it is ranked there, side by side with the default
    ranking = next(t for t in rankings(at, "logreg") if "tuned" in set(t["variant"]))
    entries = list(zip(ranking["model_id"], ranking["variant"]))
    assert entries[0] == ("logreg", "tuned") and ("logreg", "default") in entries
    # and the default against the tuned one, the best tuned baseline
    versus = table_with(at, "verdict", "against_model", "logreg")
    assert versus["against_variant"].tolist() == ["tuned"]
    pairs = [t.value for t in at.table if "gain" in t.value.columns]
    assert len(pairs) == 1
    row = pairs[0].iloc[0]
    assert (row["model_id"], row["default"], row["tuned"], row["n_trials"]) == ("logreg", pytest.approx(0.8),
                                                                                pytest.approx(0.85), 6)
    assert any("same budget" in c.value for c in at.caption)
