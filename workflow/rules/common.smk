# The config, validated, and the plan it makes (cellarena/plan.py decides every job and is
# unit-tested); below, the thin input functions the rules share. Paths live only in the rules'
# own output patterns: targets are expanded from them (`targets`).
import glob
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


# `--config seeds=[0,1,2]` reaches here as strings (Snakemake reads the list but not its items)
if isinstance(config.get("seeds"), list):
    config["seeds"] = [int(s) if isinstance(s, str) and s.strip().isdigit() else s for s in config["seeds"]]
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


def capped_threads(threads):
    """``threads``, at most the plan's ``model_threads`` (when it sets one)."""
    cap = config.get("model_threads")
    return threads if cap is None else min(threads, cap)


def model_threads(wildcards):
    return capped_threads(PLAN.model_cards[wildcards.model].resources.threads)


def model_mem_mb(wildcards, attempt):
    return PLAN.model_cards[wildcards.model].resources.mem_mb * attempt


def fill(pattern, **values):
    """A path pattern with some of its wildcards filled in; the others stay wildcards."""
    return expand(pattern, **{k: [v] for k, v in values.items()}, allow_missing=True)[0]


def checkpoint_file(model, seed):
    """The checkpoint card an in-suite transformer's runs of ``seed`` read (config pretrain_seed)."""
    return targets(rules.pretrain_transformer.output.card, [{"model": model, "seed": PLAN.pretrain_seed(seed)}])[0]


# Model jobs run several models, one after another, in one process (cellarena/run/setup.py's batch:
# one read of the data, one sandbox host that forks a fresh process per model), and write one file
# per model. A crash of one model's process, or its time limit, costs that model's rows only.
# A job runs every seed of the plan, seed by seed (config `seeds`): its outputs are one file per
# (seed, model), and the command fills each seed into the paths it gets with {seed} left open
# (`--seed 0 --seed 1 --split ..._seed{seed}.json --out ..._seed{seed}/MODEL.parquet`), so that the
# imports, the sandbox host and the read of the data are paid once for all of them.
SEEDS = [int(s) for s in config["seeds"]]
SEED_ARGS = " ".join(f"--seed {s}" for s in SEEDS)
SPLIT = f"{RESULTS}/make_split/{{dataset}}/{{split_name}}_seed{{seed}}.json"


def per_seed(pattern, **values):
    """``pattern`` filled in for every seed of the plan (a job's outputs or inputs, seed by seed)."""
    return [fill(pattern, seed=s, **values) for s in SEEDS]


def seed_template(pattern, wildcards, **values):
    """``pattern`` with a job's wildcards and ``values`` filled in and {seed} left for the command."""
    return fill(pattern, **{**dict(wildcards.items()), **values})


def seed_template_of(pattern, **values):
    """:func:`seed_template` as a params function."""

    def template(wildcards):
        return seed_template(pattern, wildcards, **values)

    return template


def checkpoint_arg(model, wildcards):
    """The --checkpoint path of ``model`` (without .json): one file for every seed (config
    pretrain_seed), or one per seed, with {seed} left for the command."""
    paths = {checkpoint_file(model, s) for s in SEEDS}
    card = paths.pop() if len(paths) == 1 else seed_template(rules.pretrain_transformer.output.card, wildcards, model=model)
    return card[: -len(".json")]


def batch_inputs(models, tuning_pattern=None, dataset=None):
    """The input function of a job of ``models`` on ``dataset`` (default: the job's wildcard): each
    one's card and plug-in, each pretrained one's checkpoint(s) where it can read the dataset and,
    for a tuned job, each one's tuning record of every seed (``tuning_pattern``)."""

    def inputs(wildcards):
        files = {}
        for m in models:
            files[f"card_{m}"] = f"{config['models_dir']}/{m}/model.yaml"
            files[f"code_{m}"] = f"{config['models_dir']}/{m}/model.py"
            if PLAN.needs_checkpoint(m, dataset or wildcards.dataset):
                files[f"checkpoint_{m}"] = sorted({checkpoint_file(m, s) for s in SEEDS})
            if tuning_pattern:
                files[f"tuning_{m}"] = per_seed(tuning_pattern, model=m, **dict(wildcards.items()))
        return files

    return inputs


def batch_args(models, out_pattern, tuning_pattern=None, dataset=None):
    """The params function of a job of ``models`` on ``dataset`` (default: the job's wildcard):
    --model, --out (``out_pattern``, {seed} left open), --checkpoint (where the model can read the
    dataset), --tuning and the plan's --params of each."""

    def args(wildcards):
        out = []
        for m in models:
            out += ["--model", f"{config['models_dir']}/{m}", "--out", seed_template(out_pattern, wildcards, model=m)]
            if PLAN.needs_checkpoint(m, dataset or wildcards.dataset):
                out += ["--checkpoint", f"{m}={checkpoint_arg(m, wildcards)}"]
            if tuning_pattern:
                out += ["--tuning", f"{m}={seed_template(tuning_pattern, wildcards, model=m)}"]
            if PLAN.model_params(m):
                out += ["--params", f"{m}={json.dumps(PLAN.model_params(m), sort_keys=True)}"]
        return " ".join(shlex.quote(a) for a in out)

    return args


def batch_threads(models):
    """A job's threads: the most any of its models' cards asks for, at most the plan's
    ``model_threads`` (each model gets the smaller of this and its own card's)."""
    return capped_threads(max(PLAN.model_cards[m].resources.threads for m in models))


def batch_mem_mb(models):
    def mem_mb(wildcards, attempt):
        return max(PLAN.model_cards[m].resources.mem_mb for m in models) * attempt

    return mem_mb


def batch_role_of(dataset):
    """The batch role embedding models of ``dataset`` see (a params function)."""

    def batch_role(wildcards):
        return PLAN.batch_role(dataset)

    return batch_role


def tuning_batch_role(task_id):
    """The batch role a tuning job of ``task_id`` passes (embedding tasks only)."""

    def batch_role(wildcards):
        return PLAN.batch_role(wildcards.dataset) if TASKS[task_id].scores_embeddings else ""

    return batch_role


def task_options(wildcards):
    return json.dumps(PLAN.task_options(TASKS[wildcards.task], wildcards.dataset), sort_keys=True)


def task_options_of(task_id):
    """:func:`task_options` for a rule whose task is fixed."""

    def options(wildcards):
        return json.dumps(PLAN.task_options(TASKS[task_id], wildcards.dataset), sort_keys=True)

    return options


def prepared(datasets):
    return targets(rules.prepare_dataset.output.h5ad, [{"dataset": ds} for ds in datasets])


# Functions of the results rules; they read rules.<name>.output, so they are called only after every
# rule file is included.


def split_args(plan):
    """--split TASK:DATASET=FILE for every split of a (task, split key, options) plan, and each one's options."""
    files = targets(SPLIT, [key for _, key, _ in plan])
    splits = " ".join(f"--split {task}:{key['dataset']}={path}" for (task, key, _), path in zip(plan, files))
    options = json.dumps({f"{task}:{key['dataset']}": opts for task, key, opts in plan}, sort_keys=True)
    return f"{splits} --options {shlex.quote(options)}"


def submission_args(model):
    """The planned splits of the submitted model (split_args)."""
    return split_args(PLAN.submission_plan(model))


def broken_models():
    """The model folders that cannot run and have runs in the plan (their rows say why)."""
    return [{"model": m} for m in PLAN.broken if PLAN.broken_plan(m)]


# The files model jobs write, one per model (the jobs' rules are made per task or dataset from these).
MODEL_RUN = f"{RESULTS}/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.parquet"
TUNED_RUN = f"{RESULTS}/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.parquet"
EMBEDDING = f"{RESULTS}/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.npz"
TUNED_EMBEDDING = f"{RESULTS}/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.npz"
TUNING_RECORD = f"{RESULTS}/tuning/{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.json"
EMBEDDING_SCORES = f"{RESULTS}/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}.parquet"  # every model's
# ... and the log of the job that wrote each
MODEL_RUN_LOG = f"{RESULTS}/logs/run_{{task}}/{{dataset}}/{{split_name}}.log"  # one job for every seed
TUNED_RUN_LOG = f"{RESULTS}/logs/run_{{task}}/{{dataset}}/{{split_name}}.tuned.log"
EMBEDDING_SCORES_LOG = f"{RESULTS}/logs/run_{{task}}/{{dataset}}/{{split_name}}.log"


def scored_embedding_patterns(wildcards):
    """The embeddings a scoring job scores, {seed} left open: each seed scores the same models."""
    each = {s: [(e["model"], e["tuned"]) for e in PLAN.scored_embeddings(wildcards.task, wildcards.dataset, s)]
            for s in SEEDS}
    first = each[SEEDS[0]]
    if any(models != first for models in each.values()):
        raise ValueError(f"{wildcards.task} on {wildcards.dataset}: the seeds score different embeddings {each}")
    return [seed_template(TUNED_EMBEDDING if tuned else EMBEDDING, wildcards, model=m) for m, tuned in first]


def scored_embedding_files(wildcards):
    """Every embedding a scoring job reads (its inputs), seed by seed."""
    return [fill(p, seed=s) for s in SEEDS for p in scored_embedding_patterns(wildcards)]


def scored_embedding_args(wildcards):
    """The scoring command's embeddings, each with {seed}."""
    return " ".join(f"'{p}'" for p in scored_embedding_patterns(wildcards))


def all_runs(logs=False):
    """Every per-run result file of the plan (``logs``: the log of the job that wrote each, in the same order)."""
    pick = (lambda result, log: log) if logs else (lambda result, log: result)
    return (targets(pick(MODEL_RUN, MODEL_RUN_LOG), PLAN.model_runs())
            + targets(pick(TUNED_RUN, TUNED_RUN_LOG), PLAN.model_runs(tuned=True))
            + targets(pick(EMBEDDING_SCORES, EMBEDDING_SCORES_LOG), PLAN.scoring_jobs())
            + targets(pick(rules.import_submission.output.scores, rules.import_submission.log[0]),
                      [{"model": m} for m in PLAN.submissions])
            + targets(pick(rules.report_broken_model.output.scores, rules.report_broken_model.log[0]),
                      broken_models()))


def intermediate_targets():
    """Every intermediate file, so that deleting any one re-creates it and re-runs what depends on it."""
    datasets = [{"dataset": ds} for ds in PLAN.prepared_datasets()]
    return (targets(rules.fetch_dataset.output.manifest, datasets)
            + targets(rules.prepare_dataset.output.h5ad, datasets)
            + targets(rules.pretrain_transformer.output.weights, PLAN.pretrain_jobs())
            + targets(rules.pretrain_transformer.output.card, PLAN.pretrain_jobs())
            + targets(SPLIT, PLAN.split_jobs())
            + targets(EMBEDDING, PLAN.embed_jobs())
            + targets(TUNED_EMBEDDING, PLAN.embed_jobs(tuned=True))
            + targets(TUNING_RECORD, PLAN.tuning_jobs())
            + all_runs())


def claims_folder(files) -> str:
    """The folder of the claim cards (the config's claims_dir when it holds none)."""
    return str(Path(files[0]).parent) if len(files) else config["claims_dir"]
