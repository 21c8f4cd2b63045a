"""The plan (cellarena/plan.py): a config in, the jobs of a run out, without Snakemake running anything."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import yaml
from snakemake.utils import validate

from cellarena import plan as cellarena_plan
from cellarena.cards.dataset import load_card
from cellarena.errors import CellarenaError
from cellarena.plan import PlanError
from cellarena.tasks import TASKS


def _config(repo, name="config.yaml", **changes) -> dict:
    """A workflow config as the workflow sees it: read, changed, validated with the schema's defaults."""
    config = yaml.safe_load((repo / "workflow" / name).read_text())
    if name != "config.yaml":  # the other plans extend the default one, merged section by section as
        base = yaml.safe_load((repo / "workflow" / "config.yaml").read_text())  # --configfile does
        config = {**base, **{k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                             for k, v in config.items()}}
    config = copy.deepcopy(config)
    for key, value in changes.items():  # a section given is merged into the config's own
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    config["datasets_dir"] = str(repo / config.get("datasets_dir", "datasets"))
    config["models_dir"] = str(repo / config.get("models_dir", "models")) if "models_dir" not in changes \
        else config["models_dir"]
    validate(config, schema=str(repo / "workflow" / "schemas" / "config.schema.yaml"))
    return config


NO_TUNING = {"annotation": {"models": []}, "integration": {"models": []}}


@pytest.fixture(scope="module")
def default(repo):
    return cellarena_plan.load(_config(repo))


def test_default_plan_jobs(default):
    annotation = TASKS["annotation"]
    keys = {(k["dataset"], k["split_name"]) for k in default.split_keys(annotation)}
    # the held-out split needs the condition role: only Kang has it among the annotation datasets
    assert keys == {("pbmc68k_reduced", "stratified"), ("kang2018_ifnb", "stratified"),
                    ("pbmc_cross_study", "stratified"), ("kang2018_ifnb", "heldout_stim")}
    seeds = default.config["seeds"]
    assert seeds == [0, 1, 2]
    runs = default.model_runs()
    assert len([r for r in runs if r["task"] == "annotation"]) == 4 * len(seeds) * len(default.task_models["annotation"])
    # perturbation: a split applies where its scheme fits the card's kind of perturbations
    pert = {(k["dataset"], k["split_name"]) for k in default.split_keys(TASKS["perturbation"])}
    assert pert == {("kang2018_ifnb", "heldout_cell_type"), ("perturbseq_proxy", "unseen_perturbations")}
    # every embedding model embeds each dataset once, whatever number of embedding tasks score it
    embeds = default.embed_jobs()
    assert len(embeds) == len({(e["dataset"], e["model"]) for e in embeds}) * len(seeds)
    kang = {e["model"] for e in embeds if e["dataset"] == "kang2018_ifnb"}
    assert kang == set(default.task_models["integration"]) | set(default.task_models["zero_shot"])
    assert {(j["task"], j["dataset"]) for j in default.scoring_jobs()} == {
        ("integration", "kang2018_ifnb"), ("integration", "pbmc_cross_study"), ("zero_shot", "pbmc68k_reduced"),
        ("zero_shot", "kang2018_ifnb"), ("zero_shot", "pbmc_cross_study")}
    # splits are made once each, for every task that uses them
    assert len(default.split_jobs()) == (4 + 2 + 3) * len(seeds)
    assert default.prepared_datasets() == sorted(["pbmc68k_reduced", "kang2018_ifnb", "pbmc_cross_study",
                                                  "perturbseq_proxy", "pbmc3k"])  # pbmc3k: the corpus
    # pretrained once (pretrain_seed 0), fine-tuned by every seed
    assert sorted((j["model"], j["seed"]) for j in default.pretrain_jobs()) == [
        ("tiny_bin", 0), ("tiny_projection", 0), ("tiny_rank", 0)]


def test_tuning_jobs_and_the_scored_tuned_embeddings(default):
    tuning = default.tuning_jobs()
    annotation = [j for j in tuning if j["task"] == "annotation"]
    assert {(j["dataset"], j["split_name"]) for j in annotation} == {("pbmc68k_reduced", "stratified"),
                                                                     ("pbmc_cross_study", "stratified")}
    assert len(annotation) == 2 * 5 * 3  # tuned per seed, on that seed's training cells
    assert default.model_runs(tuned=True) == [{"task": j["task"], **{k: j[k] for k in ("dataset", "split_name", "seed")},
                                               "model": j["model"]} for j in annotation]
    assert default.embed_jobs(tuned=True) == [{"dataset": "pbmc_cross_study", "split_name": "all", "seed": seed,
                                               "model": "scvi"} for seed in (0, 1, 2)]
    scored = default.scored_embeddings("integration", "pbmc_cross_study", 0)
    assert {"model": "scvi", "tuned": True} in scored
    assert not any(e["tuned"] for e in default.scored_embeddings("zero_shot", "pbmc_cross_study", 0))
    assert not any(e["tuned"] for e in default.scored_embeddings("integration", "kang2018_ifnb", 0))
    assert json.loads(default.tuning_budget()) == {"n_trials": 4, "timeout_s": None, "inner_folds": 2,
                                                   "max_cells": 800}


def test_task_options_are_the_task_keys_and_the_batch_role(default, repo):
    kang = load_card(repo / "datasets" / "kang2018_ifnb.yaml").labels.ontology
    # annotation also gets the card's label -> Cell Ontology mapping (the ontology-aware metrics)
    assert default.task_options(TASKS["annotation"], "kang2018_ifnb") == {"bootstrap_replicates": 200,
                                                                          "cell_ontology": kang}
    assert default.task_options(TASKS["perturbation"], "kang2018_ifnb") == {"n_genes": 2000, "top_de": 20,
                                                                            "bootstrap_replicates": 200}
    # the embedding tasks score at most scoring_max_cells cells of a split (the schema's default)
    assert default.task_options(TASKS["integration"], "kang2018_ifnb") == {"include_kbet": False,
                                                                           "batch_role": "condition",
                                                                           "max_cells": 100_000}
    assert default.task_options(TASKS["zero_shot"], "pbmc68k_reduced") == {"include_kbet": False,
                                                                            "max_cells": 100_000}
    no_cap = cellarena_plan.load(_config(repo, scoring_max_cells=None))
    assert no_cap.task_options(TASKS["zero_shot"], "pbmc68k_reduced") == {"include_kbet": False}
    assert "--datasets-dir" in default.job_args() and "--checkpoints-dir" not in default.job_args()


def test_every_model_job_is_told_its_device_and_time_limit(repo, default):
    """The device is explicit (cpu unless the config says cuda; the reference was made on the CPU)."""
    assert default.device == "cpu" and "--device cpu --time-limit 7200" in default.job_args()
    gpu = cellarena_plan.load(_config(repo, device="cuda", time_limit_s=600))
    assert gpu.device == "cuda" and "--device cuda --time-limit 600" in gpu.job_args()
    with pytest.raises(Exception, match="tpu"):
        _config(repo, device="tpu")


def test_the_ci_plan_is_a_subset_of_the_default_plan(repo, default):
    ci = cellarena_plan.load(_config(repo, "config.ci.yaml"))
    as_set = lambda jobs: {tuple(sorted(j.items())) for j in jobs}  # noqa: E731
    assert as_set(ci.model_runs()) <= as_set(default.model_runs())
    assert as_set(ci.scoring_jobs()) <= as_set(default.scoring_jobs())
    assert not ci.submissions and ci.notes == ()  # auto_models and submissions are off
    # what the CI plan shares with the default plan is set the same (else its rows would not be the
    # reference's): budgets, threads, the pretraining seed, the tuning budget, the perturbation panel
    ci_config, config = _config(repo, "config.ci.yaml"), _config(repo)
    for key in ("model_params", "model_threads", "pretrain_seed", "split_max_cells"):
        assert ci_config.get(key) == config.get(key), key
    for section, keys in (("tuning", ("n_trials", "inner_folds", "max_cells", "timeout_s")),
                          ("perturbation", ("n_genes", "top_de"))):
        assert {k: ci_config[section][k] for k in keys} == {k: config[section][k] for k in keys}, section


def test_auto_models_adds_a_new_folder_to_the_tasks_its_card_declares(repo, tmp_path):
    models = tmp_path / "models"
    for m in ("knn", "pca", "svm"):
        shutil.copytree(repo / "models" / m, models / m)
    config = _config(repo, models_dir=str(models), annotation={"models": ["knn"]}, integration={"models": ["pca"]},
                     zero_shot={"models": []}, perturbation={"models": []}, tuning=NO_TUNING)
    plan = cellarena_plan.load(config)
    assert plan.task_models["annotation"] == ["knn", "svm"]
    assert any("svm joins annotation" in n for n in plan.notes)
    off = cellarena_plan.load({**config, "auto_models": False})
    assert off.task_models["annotation"] == ["knn"] and off.notes == ()


@pytest.mark.parametrize("tuning, message", [
    ({"annotation": {"models": ["xgboost"]}}, "which is not in annotation.models"),
    ({"annotation": {"models": ["majority_class"]}}, "declares no search_space"),
])
def test_inconsistent_tuning_is_refused_with_a_fix(repo, tuning, message):
    config = _config(repo, tuning=tuning, annotation={"models": ["knn", "majority_class"]}, auto_models=False)
    with pytest.raises(PlanError, match=message) as err:
        cellarena_plan.load(config)
    assert err.value.fix


def test_split_names_are_checked(repo):
    reserved = _config(repo)
    reserved["annotation"]["splits"]["all"] = {"scheme": "stratified"}
    with pytest.raises(PlanError, match="reserved for the embedding tasks"):
        cellarena_plan.load(reserved)
    config = _config(repo)
    config["perturbation"]["splits"]["stratified"] = {"scheme": "unseen_perturbations"}
    with pytest.raises(PlanError, match="used by two tasks"):
        cellarena_plan.load(config)
    config = _config(repo)
    config["annotation"]["splits"]["odd"] = {"scheme": "heldout_context"}  # a perturbation scheme under annotation
    with pytest.raises(PlanError, match="annotation.splits.odd has scheme 'heldout_context'"):
        cellarena_plan.load(config)


def test_a_submission_is_planned_on_the_splits_of_its_tasks(repo, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(repo / "models" / "knn", models / "knn")
    big = models / "big_model"
    big.mkdir()
    (big / "model.yaml").write_text((repo / "models" / "pca" / "model.yaml").read_text().replace("id: pca", "id: big_model"))
    (big / "submitted").mkdir()
    (big / "submitted" / "results.csv").write_text("task\n")  # checked later, by the import job
    plan = cellarena_plan.load(_config(repo, models_dir=str(models), annotation={"models": ["knn"]},
                                       integration={"models": []}, zero_shot={"models": []},
                                       perturbation={"models": []}, tuning=NO_TUNING))
    assert set(plan.submissions) == {"big_model"}
    assert not plan.broken  # a folder of submitted results needs no model.py
    assert plan.submission_files("big_model") == [big / "submitted" / "results.csv"]
    planned = plan.submission_plan("big_model")
    assert {t for t, _, _ in planned} == {"integration", "zero_shot"}  # the tasks of its card
    integration = [(key, options) for task, key, options in planned if task == "integration"]
    assert ({"dataset": "kang2018_ifnb", "split_name": "all", "seed": 0},
            {"include_kbet": False, "batch_role": "condition", "max_cells": 100_000}) in integration


def test_columns_is_what_expand_zip_takes():
    jobs = [{"dataset": "a", "seed": 0}, {"dataset": "b", "seed": 1}]
    assert cellarena_plan.columns(jobs) == {"dataset": ["a", "b"], "seed": [0, 1]}
    assert cellarena_plan.columns([]) == {}


def _no_tasks_but_annotation(repo, models, **changes):
    return _config(repo, models_dir=str(models), annotation={"models": ["knn"]}, integration={"models": []},
                   zero_shot={"models": []}, perturbation={"models": []}, tuning=NO_TUNING, **changes)


def test_a_model_folder_that_cannot_run_becomes_failed_runs_not_a_stopped_plan(repo, tmp_path):
    models = tmp_path / "models"
    for m in ("knn", "svm"):
        shutil.copytree(repo / "models" / m, models / m)
    # a card that does not validate, one that is not YAML at all, a folder without model.py
    shutil.copytree(repo / "models" / "svm", models / "bad_kind")
    card = (models / "bad_kind" / "model.yaml").read_text().replace("id: svm", "id: bad_kind")
    (models / "bad_kind" / "model.yaml").write_text(card.replace("kind: baseline", "kind: wizard"))
    (models / "not_yaml").mkdir()
    (models / "not_yaml" / "model.yaml").write_text("id: not_yaml\ntasks: [annotation\n")
    (models / "not_yaml" / "model.py").write_text("")
    shutil.copytree(repo / "models" / "svm", models / "no_code")
    (models / "no_code" / "model.yaml").write_text(card.replace("id: bad_kind", "id: no_code"))
    (models / "no_code" / "model.py").unlink()
    plan = cellarena_plan.load(_no_tasks_but_annotation(repo, models))
    assert plan.task_models["annotation"] == ["knn", "svm"]  # the others run as usual
    assert set(plan.broken) == {"bad_kind", "not_yaml", "no_code"}
    reason, tasks = plan.broken["bad_kind"]
    assert "bad_kind/model.yaml: invalid model card" in reason and "kind" in reason and "fix: " in reason
    assert tasks == ("annotation",)  # what its YAML declares
    reason, tasks = plan.broken["not_yaml"]
    assert "not_yaml/model.yaml" in reason and "fix: " in reason
    assert tasks == tuple(TASKS)  # nothing readable: it is shown as failed in every task
    reason, tasks = plan.broken["no_code"]
    assert "no_code/model.py: plug-in not found" in reason and "fix: add model.py" in reason
    # every run the plan would have given it: here the annotation splits of the default plan
    planned = plan.broken_plan("bad_kind")
    assert {(t, k["dataset"], k["split_name"]) for t, k, _ in planned} == {
        (t, k["dataset"], k["split_name"]) for k in plan.split_keys(TASKS["annotation"]) for t in ["annotation"]}
    assert any("model folder bad_kind cannot run" in n for n in plan.notes)
    assert "bad_kind" not in plan.model_cards and not any("bad_kind" in str(j) for j in plan.model_runs())


def test_a_listed_model_folder_that_cannot_run_is_failed_and_not_tuned(repo, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(repo / "models" / "knn", models / "knn")
    (models / "knn" / "model.yaml").write_text((models / "knn" / "model.yaml").read_text() + "unknown_field: 1\n")
    shutil.copytree(repo / "models" / "logistic_regression", models / "logistic_regression")
    config = _config(repo, models_dir=str(models), annotation={"models": ["knn", "logistic_regression"]},
                     integration={"models": []}, zero_shot={"models": []}, perturbation={"models": []},
                     tuning={"annotation": {"models": ["knn", "logistic_regression"]}, "integration": {"models": []}})
    plan = cellarena_plan.load(config)
    assert plan.task_models["annotation"] == ["logistic_regression"]
    assert plan.tuned["annotation"] == ["logistic_regression"]
    assert plan.broken["knn"][1] == ("annotation",) and "unknown_field" in plan.broken["knn"][0]
    # a listed model without a folder is a mistake in the config: the plan stops and says so
    with pytest.raises(CellarenaError, match="ghost"):
        cellarena_plan.load({**config, "annotation": {**config["annotation"], "models": ["ghost"]}})


def test_a_model_folder_whose_name_is_not_an_id_is_skipped_with_a_note(repo, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(repo / "models" / "knn", models / "knn")
    shutil.copytree(repo / "models" / "svm", models / "My-Model")
    plan = cellarena_plan.load(_no_tasks_but_annotation(repo, models))
    assert plan.task_models["annotation"] == ["knn"] and not plan.broken
    assert any("'My-Model'" in n and "rename the folder" in n for n in plan.notes)


@pytest.mark.parametrize("shared", [None, 0, 5])
def test_pretraining_is_once_per_seed_or_once_for_all(repo, shared):
    """``pretrain_seed: null`` pretrains each in-suite transformer once per seed; an integer pretrains
    it once, with that seed, and every seed's runs fine-tune that checkpoint."""
    plan = cellarena_plan.load(_config(repo, seeds=[0, 1, 2], pretrain_seed=shared))
    jobs = {(j["model"], j["seed"]) for j in plan.pretrain_jobs()}
    seeds = [0, 1, 2] if shared is None else [shared]
    assert jobs == {(m, s) for m in ("tiny_rank", "tiny_bin", "tiny_projection") for s in seeds}
    assert [plan.pretrain_seed(s) for s in (0, 1, 2)] == ([0, 1, 2] if shared is None else [shared] * 3)


def test_a_plans_model_params_must_be_params_of_the_card(repo):
    plan = cellarena_plan.load(_config(repo, model_params={"scvi": {"max_epochs": 3}}))
    assert plan.model_params("scvi") == {"max_epochs": 3} and plan.model_params("knn") == {}
    with pytest.raises(cellarena_plan.PlanError, match=r"model_params.scvi sets \['epochs'\]") as err:
        cellarena_plan.load(_config(repo, model_params={"scvi": {"epochs": 3}}))
    assert "max_epochs" in err.value.fix


def test_the_default_plan_caps_the_cells_of_its_cell_splits_and_the_full_plan_does_not(repo, default):
    assert default.splits["all"].max_cells == 2500
    assert default.splits["stratified"].max_cells == default.splits["heldout_stim"].max_cells == 2500
    assert not hasattr(default.splits["heldout_cell_type"], "max_cells")  # perturbation: every cell
    own = cellarena_plan.load(_config(repo, annotation={"splits": {"stratified": {
        "scheme": "stratified", "max_cells": 300}}}))
    assert own.splits["stratified"].max_cells == 300 and own.splits["all"].max_cells == 2500
    full = yaml.safe_load((repo / "workflow" / "config.full.yaml").read_text())
    assert "split_max_cells" in full and full["split_max_cells"] is None


def test_the_extended_plan_adds_the_datasets_beyond_blood(repo, default):
    extended = cellarena_plan.load(_config(repo, "config.extended.yaml"))
    assert extended.task_models == default.task_models  # the default plan's models, more data
    new = {"zeisel2015_mouse_brain", "wang2018_starmap_mpfc", "wu2020_tumour_t_cells"}
    for task in ("annotation", "zero_shot"):
        keys = [k for k in extended.split_keys(TASKS[task]) if k["dataset"] in new]
        assert {k["dataset"] for k in keys} == new
        assert {k["split_name"] for k in keys} == {"stratified" if task == "annotation" else "all"}
        assert {k["seed"] for k in keys} == {0, 1, 2}
        assert [k for k in extended.split_keys(TASKS[task]) if k not in keys] == default.split_keys(TASKS[task])
    # integration: the two with batches (STARmap sections, Wu's patients); Zeisel has none
    assert {k["dataset"] for k in extended.split_keys(TASKS["integration"])} == {
        "kang2018_ifnb", "pbmc_cross_study", "wang2018_starmap_mpfc", "wu2020_tumour_t_cells"}
    assert extended.batch_role("wu2020_tumour_t_cells") == extended.batch_role("wang2018_starmap_mpfc") == "batch"


def test_a_pretrained_model_that_cannot_read_a_dataset_waits_for_no_pretraining(repo):
    """Mouse cells with unnamed genes: the in-suite transformers' runs there end not_applicable from the
    cards alone, so a plan with only such data pretrains nothing and its jobs need no checkpoint."""
    only = cellarena_plan.load(_config(repo, "config.extended.yaml", datasets=["zeisel2015_mouse_brain"],
                                       annotation={"datasets": ["zeisel2015_mouse_brain"]},
                                       zero_shot={"datasets": ["zeisel2015_mouse_brain"]},
                                       integration={"datasets": []}, perturbation={"datasets": []},
                                       tuning={"annotation": {"models": []}, "integration": {"models": []}}))
    assert "mouse" not in only.unfit("logistic_regression", "zeisel2015_mouse_brain")
    assert only.unfit("logistic_regression", "zeisel2015_mouse_brain") == ""
    assert "trained on homo_sapiens; this dataset is mus_musculus" in only.unfit("tiny_bin", "zeisel2015_mouse_brain")
    assert not only.needs_checkpoint("tiny_bin", "zeisel2015_mouse_brain")
    assert only.pretrain_jobs() == []
    extended = cellarena_plan.load(_config(repo, "config.extended.yaml"))
    assert {j["model"] for j in extended.pretrain_jobs()} == {"tiny_rank", "tiny_bin", "tiny_projection"}
    assert extended.needs_checkpoint("tiny_bin", "kang2018_ifnb")
    # its corpus excludes the datasets it reads: adding ones it cannot read (Zeisel, STARmap: mouse)
    # changes no checkpoint; Wu's human T cells it can read, so the extended checkpoints exclude them too
    default = cellarena_plan.load(_config(repo))
    assert default.readable_datasets("tiny_bin") == list(default.cards)
    assert extended.readable_datasets("tiny_bin") == default.readable_datasets("tiny_bin") + ["wu2020_tumour_t_cells"]
    assert extended.unfit("tiny_bin", "wang2018_starmap_mpfc") == ("model tiny_bin was trained on homo_sapiens; "
                                                                   "this dataset is mus_musculus")
    assert "zeisel2015_mouse_brain" in extended.readable_datasets("logistic_regression")
