# The config, validated, and the plan it makes (cellarena/plan.py decides every job and is
# unit-tested); below, the thin input functions the rules share. Paths live only in the rules'
# own output patterns: targets are expanded from them (`targets`).
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

from cellarena import plan as cellarena_plan
from cellarena.cards.corpus import corpus_path
from cellarena.cards.dataset import card_path
from cellarena.ids import WILDCARD_PATTERN
from cellarena.tasks import EMBEDDING_TASKS, TASKS, TUNED_EMBEDDING_TASK, TUNED_TASKS


validate(config, schema="../schemas/config.schema.yaml")
PLAN = cellarena_plan.load(config)
for _note in PLAN.notes:
    print(f"cellarena: {_note}", file=sys.stderr)

RESULTS = config["results_dir"]
ENV_FILE = "../../environment.yml"  # documents the software; used with --sw-deployment-method conda
# Every job runs through `cellarena guard` (cellarena/placeholder.py): a job that crashes hard (killed,
# segfault, an uncaught error) still writes its output, as a failed placeholder whose reason carries
# the exit code and the end of its log, so one crash costs its own rows and the DAG still ends in a
# leaderboard. A job killed from outside (memory, preemption) is first retried as often as Snakemake
# retries jobs: the guard reads that from $CELLARENA_RETRIES, set when the run starts (the profile's
# `retries`) and passed to cluster jobs, which Snakemake itself runs with --retries 0.
CELLARENA = f"{sys.executable} -m cellarena guard --"
os.environ.setdefault("CELLARENA_RETRIES", "0")


envvars:
    "CELLARENA_RETRIES",


onstart:
    os.environ["CELLARENA_RETRIES"] = str(workflow.execution_settings.retries)


JOB_ARGS = PLAN.job_args()  # where corpus cards and published checkpoints are, for every model job
CACHE_ARG = f"--cache {config['cache_dir']}" if config.get("cache_dir") else ""
if config.get("cache_dir"):  # every job agrees on the cache, so the plug-ins' sandbox hides the right one
    os.environ.update(CELLARENA_CACHE=str(Path(config["cache_dir"]).expanduser().resolve()))
MODEL_TASKS = "|".join(t.id for t in PLAN.model_tasks())


wildcard_constraints:
    dataset=WILDCARD_PATTERN,
    model=WILDCARD_PATTERN,
    split_name=WILDCARD_PATTERN,
    seed=r"\d+",


def targets(pattern, jobs):
    """A rule's output pattern filled in for each of the plan's jobs."""
    return expand(pattern, zip, **cellarena_plan.columns(jobs)) if jobs else []


def card_file(wildcards):
    return str(card_path(config["datasets_dir"], wildcards.dataset))


def model_dir(wildcards):
    return str(Path(config["models_dir"]) / wildcards.model)


def model_files(wildcards):
    """A model job's inputs: the card, the plug-in and, for an in-suite transformer, its checkpoint."""
    files = {"card": f"{model_dir(wildcards)}/model.yaml", "code": f"{model_dir(wildcards)}/model.py"}
    if PLAN.pretrained(wildcards.model):
        files["checkpoint"] = targets(rules.pretrain_transformer.output.card,
                                      [{"model": wildcards.model, "seed": wildcards.seed}])[0]
    return files


def checkpoint_arg(wildcards, input):
    return f"--checkpoint {input.checkpoint[: -len('.json')]}" if "checkpoint" in input.keys() else ""


def model_threads(wildcards):
    return PLAN.model_cards[wildcards.model].resources.threads


def model_mem_mb(wildcards, attempt):
    return PLAN.model_cards[wildcards.model].resources.mem_mb * attempt


def task_options(wildcards):
    return json.dumps(PLAN.task_options(TASKS[wildcards.task], wildcards.dataset), sort_keys=True)


def prepared(datasets):
    return targets(rules.prepare_dataset.output.h5ad, [{"dataset": ds} for ds in datasets])


# Functions of the results rules; they read rules.<name>.output, so they are called only after every
# rule file is included.


def split_args(plan):
    """--split TASK:DATASET=FILE for every split of a (task, split key, options) plan, and each one's options."""
    files = targets(rules.make_split.output.split, [key for _, key, _ in plan])
    splits = " ".join(f"--split {task}:{key['dataset']}={path}" for (task, key, _), path in zip(plan, files))
    options = json.dumps({f"{task}:{key['dataset']}": opts for task, key, opts in plan}, sort_keys=True)
    return f"{splits} --options '{options}'"


def submission_args(model):
    """The planned splits of the submitted model (split_args)."""
    return split_args(PLAN.submission_plan(model))


def broken_models():
    """The model folders that cannot run and have runs in the plan (their rows say why)."""
    return [{"model": m} for m in PLAN.broken if PLAN.broken_plan(m)]


def all_runs(rule_output=lambda rule: rule.output.scores):
    """Every per-run result file of the plan (``rule_output``: another file of each job, e.g. its log)."""
    return (targets(rule_output(rules.run_model), PLAN.model_runs())
            + targets(rule_output(rules.run_model_tuned), PLAN.model_runs(tuned=True))
            + targets(rule_output(rules.score_embeddings), PLAN.scoring_jobs())
            + targets(rule_output(rules.import_submission), [{"model": m} for m in PLAN.submissions])
            + targets(rule_output(rules.report_broken_model), broken_models()))


def intermediate_targets():
    """Every intermediate file, so that deleting any one re-creates it and re-runs what depends on it."""
    datasets = [{"dataset": ds} for ds in PLAN.prepared_datasets()]
    return (targets(rules.fetch_dataset.output.manifest, datasets)
            + targets(rules.prepare_dataset.output.h5ad, datasets)
            + targets(rules.pretrain_transformer.output.weights, PLAN.pretrain_jobs())
            + targets(rules.pretrain_transformer.output.card, PLAN.pretrain_jobs())
            + targets(rules.make_split.output.split, PLAN.split_jobs())
            + targets(rules.embed_cells.output.embedding, PLAN.embed_jobs())
            + targets(rules.embed_cells_tuned.output.embedding, PLAN.embed_jobs(tuned=True))
            + targets(rules.tune_model.output.record, PLAN.tuning_jobs())
            + all_runs())
