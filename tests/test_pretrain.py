"""In-suite pretraining: corpus cards, evaluation cells excluded and verified, checkpoints used by
the runner through the shared transformer plug-in."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest

from cellarena import results
from cellarena.cards.corpus import CorpusCard, list_corpora, load_corpus
from cellarena.errors import CardError
from cellarena.data.leakage import fingerprints, overlap
from cellarena.run.pretrain import exclude_evaluation, pretrain_model, write_failed_checkpoint
from cellarena.run import run_task
from cellarena.data.splits import SplitSpec, make_split, write_split

CORPUS = """\
id: toy_corpus
version: 1
title: toy
kind: in_suite
confidence: exact
datasets: [toy_pretrain]
"""


@pytest.fixture
def toy(tmp_path, small_adata, prepare_local):
    """An evaluation set (120 cells) and a corpus holding 30 of its cells plus 90 others,
    with the corpus' genes in another order and 5 extra genes."""
    evaluation = small_adata(n_cells=120, seed=1)
    other = small_adata(n_cells=90, seed=2)
    other.obs_names = [f"other{i}" for i in range(90)]
    corpus = ad.concat([evaluation[:30], other])
    extra = ad.AnnData(X=np.random.default_rng(3).poisson(1.0, (corpus.n_obs, 5)).astype(np.float32),
                       obs=corpus.obs[[]], var=__import__("pandas").DataFrame(index=[f"EXTRA{i}" for i in range(5)]))
    corpus = ad.concat([corpus, extra], axis=1, merge="first")
    corpus = corpus[:, corpus.var_names[::-1]].copy()
    corpus.obs = corpus.obs[[]]
    eval_h5ad = prepare_local(evaluation, "toy_eval")
    corpus_h5ad = prepare_local(corpus, "toy_pretrain", roles={})
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "toy_corpus.yaml").write_text(CORPUS)
    return {"eval": eval_h5ad, "corpus": corpus_h5ad, "corpus_card": tmp_path / "corpora" / "toy_corpus.yaml"}


def test_overlap_reports_exactly_the_shared_cells(toy):
    corpus, evaluation = ad.read_h5ad(toy["corpus"]), ad.read_h5ad(toy["eval"])
    ov = overlap(corpus, evaluation)
    assert (ov.n_cells, ov.n_found, ov.shared_genes) == (120, 30, 40)
    assert ov.fraction == pytest.approx(0.25)
    assert ov.corpus_mask.sum() == 30 and ov.corpus_mask[:30].all()
    # the fingerprint ignores gene order and genes outside the shared set
    genes = evaluation.var_names[:20]
    np.testing.assert_array_equal(fingerprints(evaluation[:30], genes), fingerprints(corpus[:30], genes))
    # one changed count changes the fingerprint
    bumped = evaluation[:1].copy()
    bumped.layers["counts"] = bumped.layers["counts"].copy()
    bumped.layers["counts"][0, bumped.layers["counts"][0].nonzero()[1][0]] += 1
    assert fingerprints(bumped, genes)[0] != fingerprints(evaluation[:1], genes)[0]


def test_exclusion_removes_evaluation_cells_and_verifies(toy):
    from cellarena.run.pretrain import build_corpus

    corpus = build_corpus({"toy_pretrain": toy["corpus"]})
    kept, report = exclude_evaluation(corpus, {"toy_eval": toy["eval"]})
    assert (report["n_corpus_cells"], report["n_excluded"], report["n_kept"]) == (120, 30, 90)
    assert report["datasets"]["toy_eval"]["before"]["n_found"] == 30
    assert report["datasets"]["toy_eval"]["after"]["n_found"] == 0
    assert all(name.startswith("other") for name in kept.obs_names.str.split(":").str[0])


def test_corpus_cards_validate(repo, tmp_path):
    corpora = list_corpora(repo / "datasets")
    assert "cellarena_pbmc3k" in corpora
    for card in corpora.values():
        if card.kind == "in_suite":
            for ds in card.datasets:
                assert (repo / "datasets" / f"{ds}.yaml").exists()
    with pytest.raises(ValueError, match="lists the dataset cards"):
        CorpusCard.model_validate({"id": "x", "version": 1, "title": "x", "kind": "in_suite",
                                   "confidence": "exact"})
    with pytest.raises(ValueError, match="references"):
        CorpusCard.model_validate({"id": "x", "version": 1, "title": "x", "kind": "published",
                                   "confidence": "stated_in_paper"})
    bad = tmp_path / "wrong_name.yaml"
    bad.write_text(CORPUS)
    with pytest.raises(CardError, match="does not match its file name"):
        load_corpus(bad)


def _tiny_model(tmp_path, repo, encoding, **recipe):
    folder = tmp_path / "models" / f"tiny_{encoding}"
    shutil.copytree(repo / "models" / f"tiny_{encoding}", folder)
    text = (folder / "model.yaml").read_text().replace("corpus: cellarena_pbmc3k", "corpus: toy_corpus")
    text = text.replace("    epochs: 2\n", "    epochs: 1\n    max_steps: {}\n".format(recipe.get("max_steps", 4)))
    text = text.replace("finetune_min_steps: 100", "finetune_min_steps: 4")
    (folder / "model.yaml").write_text(text)
    return folder


def test_pretrain_then_embed_and_annotate(toy, tmp_path, repo):
    model = _tiny_model(tmp_path, repo, "bin")
    out = tmp_path / "ckpt" / "model"
    card = pretrain_model(model, toy["corpus_card"], {"toy_pretrain": toy["corpus"]},
                          {"toy_eval": toy["eval"]}, out, seed=0, git_commit="abc", device="cpu")
    ex = card["extra"]
    assert card["corpus_id"] == "toy_corpus" and card["steps"] == 2  # 90 cells, batches of 64, one epoch
    assert ex["exclusion"]["n_excluded"] == 30 and ex["exclusion"]["n_kept"] == 90
    assert ex["model_id"] == "tiny_bin" and ex["recipe"]["encoding"] == "bin"

    obs = ad.read_h5ad(toy["eval"]).obs
    all_split = write_split(make_split(obs, dataset_id="toy_eval", dataset_version=1, name="all",
                                       spec=SplitSpec(scheme="all"), seed=0), tmp_path / "all.json")
    rows = run_task("zero_shot", toy["eval"], all_split, model, seed=0, checkpoint=out)
    # the cell-level exclusion recorded by pretraining is the rows' leakage: none left
    assert set(rows["leakage"]) == {"clean"} and set(rows["leaked_fraction"]) == {0.0}
    results.validate(rows)
    assert set(rows.status) == {"ok"}, rows.status_reason.iloc[0]
    runtime = json.loads(rows.runtime_json.iloc[0])
    assert runtime["attention"].startswith(("sdpa", "math")) and runtime["checkpoint"]["corpus_id"] == "toy_corpus"
    assert runtime["checkpoint"]["excluded_cells"] == 30

    strat = write_split(make_split(obs, dataset_id="toy_eval", dataset_version=1, name="stratified",
                                   spec=SplitSpec(scheme="stratified"), seed=0), tmp_path / "s.json")
    rows = run_task("annotation", toy["eval"], strat, model, seed=0, checkpoint=out)
    assert set(rows.status) == {"ok"}, rows.status_reason.iloc[0]
    runtime = json.loads(rows.runtime_json.iloc[0])
    assert "finetune_s" in runtime and runtime["finetune_epochs_used"] == 2  # 84 cells: 2 steps an epoch
    assert runtime["finetune_cells_used"] == 84
    # a quick plan's budget: fine-tuned on a seeded, label-stratified draw of 40 training cells
    capped = run_task("annotation", toy["eval"], strat, model, seed=0, checkpoint=out,
                      params={"finetune_max_cells": 40})
    assert set(capped.status) == {"ok"}, capped.status_reason.iloc[0]
    runtime = json.loads(capped.runtime_json.iloc[0])
    assert runtime["finetune_cells_used"] == 40 and runtime["finetune_epochs_used"] == 4  # 1 step an epoch
    assert json.loads(capped.params_json.iloc[0])["finetune_max_cells"] == 40

    # a checkpoint of another encoding is refused by name, and no checkpoint is not applicable
    other = _tiny_model(tmp_path, repo, "rank")
    rows = run_task("zero_shot", toy["eval"], all_split, other, seed=0, checkpoint=out)
    assert set(rows.status) == {"failed"} and "encoding" in rows.status_reason.iloc[0]
    rows = run_task("zero_shot", toy["eval"], all_split, model, seed=0)
    assert set(rows.status) == {"not_applicable"} and "checkpoint" in rows.status_reason.iloc[0]
    # a failed pretraining becomes failed rows with its reason
    write_failed_checkpoint(tmp_path / "bad" / "model", "corpus empty")
    rows = run_task("zero_shot", toy["eval"], all_split, model, seed=0, checkpoint=tmp_path / "bad" / "model")
    assert set(rows.status) == {"failed"} and "corpus empty" in rows.status_reason.iloc[0]


def test_pretraining_refuses_a_corpus_made_only_of_evaluation_cells(toy, tmp_path, repo):
    from cellarena.errors import CellarenaError

    model = _tiny_model(tmp_path, repo, "projection")
    with pytest.raises(CellarenaError, match="no corpus cells are left"):
        pretrain_model(model, toy["corpus_card"], {"toy_pretrain": toy["eval"]}, {"toy_eval": toy["eval"]},
                       tmp_path / "x" / "model", seed=0)
