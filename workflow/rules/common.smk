# Config validation, dataset/model lookup and the target list. No computation here.
import json
import sys
from pathlib import Path

from snakemake.utils import validate

from cellarena.cards import card_path, load_card
from cellarena.corpora import corpus_path, load_corpus
from cellarena.ids import WILDCARD_PATTERN
from cellarena.models import discover, load_model_card
from cellarena.submission import submission_files
from cellarena.perturbation import PerturbationSplitSpec
from cellarena.splits import SplitSpec


validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results_dir"]
ENV_FILE = "../../environment.yml"  # documents the software; used with --sw-deployment-method conda
# corpus cards for the leakage columns are read from the plan's datasets_dir, on any executor
_CHECKPOINTS = (f"CELLARENA_CHECKPOINTS={Path(config['checkpoints_dir']).expanduser().resolve()} "
                if config.get("checkpoints_dir") else "")
CELLARENA = (f"CELLARENA_DATASETS_DIR={Path(config['datasets_dir']).resolve()} {_CHECKPOINTS}"
             f"{sys.executable} -m cellarena")
CACHE_ARG = f"--cache {config['cache_dir']}" if config.get("cache_dir") else ""


wildcard_constraints:
    dataset=WILDCARD_PATTERN,
    model=WILDCARD_PATTERN,
    split_name=WILDCARD_PATTERN,
    seed=r"\d+",


def _cards():
    cards = {}
    for ds in config["datasets"]:
        card = load_card(card_path(config["datasets_dir"], ds))
        if card.requires_network and not config["include_network_datasets"]:
            print(f"cellarena: skipping {ds} (requires_network; set include_network_datasets)",
                  file=sys.stderr)
            continue
        cards[ds] = card
    return cards


CARDS = _cards()
EMBEDDING_TASKS = ("integration", "zero_shot")
EMBEDDING_SPLIT = "all"  # embedding tasks score every cell
SPLITS = {name: SplitSpec.model_validate(spec)
          for name, spec in config["annotation"]["splits"].items()}
if EMBEDDING_SPLIT in SPLITS:
    raise ValueError(f"the split name {EMBEDDING_SPLIT!r} is reserved for the embedding tasks")
SPLITS[EMBEDDING_SPLIT] = SplitSpec(scheme="all")
PERTURBATION_SPLITS = {name: PerturbationSplitSpec.model_validate(spec)
                       for name, spec in config["perturbation"]["splits"].items()}
if set(PERTURBATION_SPLITS) & set(SPLITS):
    raise ValueError(f"split names {sorted(set(PERTURBATION_SPLITS) & set(SPLITS))} are used by two tasks; "
                     "give the perturbation splits their own names")
SPLITS.update(PERTURBATION_SPLITS)
TASK_MODELS = {task: list(config[task]["models"])
               for task in ("annotation", *EMBEDDING_TASKS, "perturbation")}
FOLDERS = discover(config["models_dir"])


def _new_models():
    """Model folders no task list names (auto_models): each joins every task its card declares."""
    listed = {m for models in TASK_MODELS.values() for m in models}
    return {m: load_model_card(folder) for m, folder in FOLDERS.items()
            if m not in listed and (folder / "model.py").exists()}


if config["auto_models"]:
    for _m, _card in _new_models().items():
        _tasks = [t for t in _card.tasks if t in TASK_MODELS]
        for _t in _tasks:
            TASK_MODELS[_t].append(_m)
        print(f"cellarena: new model folder {_m} joins {', '.join(_tasks)} (auto_models)", file=sys.stderr)
MODEL_CARDS = {m: load_model_card(Path(config["models_dir"]) / m)
               for models in TASK_MODELS.values() for m in models}
# Folders with submitted results (models/<id>/submitted/): shown as the `submitted` variant.
SUBMISSIONS = {m: folder for m, folder in FOLDERS.items() if config["submissions"] and submission_files(folder)}


def card_file(wildcards):
    return str(card_path(config["datasets_dir"], wildcards.dataset))


def model_files(wildcards):
    folder = Path(config["models_dir"]) / wildcards.model
    files = {"card": str(folder / "model.yaml"), "code": str(folder / "model.py")}
    if wildcards.model in PRETRAINED:
        files["checkpoint"] = checkpoint_prefix(wildcards.model, wildcards.seed) + ".json"
    return files


# In-suite transformers: models whose card carries a pretraining recipe; the workflow pretrains them.
PRETRAINED = {m: c for m, c in MODEL_CARDS.items() if c.pretraining and c.pretraining.recipe}
CORPORA = {m: load_corpus(corpus_path(config["datasets_dir"], c.pretraining.corpus))
           for m, c in PRETRAINED.items()}


def checkpoint_prefix(model, seed):
    return f"{RESULTS}/pretrain/{model}/seed{seed}/model"


def checkpoint_arg(wildcards):
    if wildcards.model not in PRETRAINED:
        return ""
    return f"--checkpoint {checkpoint_prefix(wildcards.model, wildcards.seed)}"


def pretrain_inputs(wildcards):
    folder = Path(config["models_dir"]) / wildcards.model
    corpus = CORPORA[wildcards.model]
    files = {"card": str(folder / "model.yaml"), "code": str(folder / "model.py"),
             "corpus": str(corpus_path(config["datasets_dir"], corpus.id))}
    files.update({f"corpus_{ds}": f"{RESULTS}/prepare_dataset/{ds}.h5ad" for ds in corpus.datasets})
    files.update({f"evaluation_{ds}": f"{RESULTS}/prepare_dataset/{ds}.h5ad" for ds in CARDS})
    return files


def pretrain_data_args(wildcards):
    corpus = CORPORA[wildcards.model]
    args = [f"--corpus-data {ds}={RESULTS}/prepare_dataset/{ds}.h5ad" for ds in corpus.datasets]
    args += [f"--evaluation {ds}={RESULTS}/prepare_dataset/{ds}.h5ad" for ds in CARDS]
    return " ".join(args)


def split_spec_json(wildcards):
    return json.dumps(SPLITS[wildcards.split_name].model_dump(mode="json", exclude_defaults=True))


def model_threads(wildcards):
    return MODEL_CARDS[wildcards.model].resources.threads


def model_mem_mb(wildcards, attempt):
    return MODEL_CARDS[wildcards.model].resources.mem_mb * attempt


def split_applies(card, spec):
    """A held-out split needs its role in the card; a stratified split applies everywhere."""
    role = spec.required_role()
    return role is None or role in card.role_columns()


def derived_inputs(wildcards):
    """Prepared files of the datasets a card's derived sources read (simulated datasets)."""
    card = load_card(card_path(config["datasets_dir"], wildcards.dataset))
    return {f"parent_{s.dataset}": f"{RESULTS}/prepare_dataset/{s.dataset}.h5ad"
            for s in card.sources if s.kind == "derived"}


def derived_args(wildcards):
    return " ".join(f"--derived {k.removeprefix('parent_')}={v}" for k, v in derived_inputs(wildcards).items())


def annotation_runs():
    """Every per-run result file of the annotation task: default variants, then tuned ones."""
    return [
        f"{RESULTS}/run_annotation/{ds}/{name}_seed{seed}/{model}.parquet"
        for ds, name, seed in annotation_splits()
        for model in TASK_MODELS["annotation"]
    ] + [
        f"{RESULTS}/run_annotation/{ds}/{name}_seed{seed}/{model}.tuned.parquet"
        for ds, name, seed in tuned_annotation_splits()
        for model in TUNED["annotation"]
    ]


def tuned_annotation_splits():
    """The annotation (dataset, split, seed) that the plan tunes on."""
    return [(ds, name, seed) for ds, name, seed in annotation_splits()
            if _listed(TUNING["annotation"].get("splits"), name)
            and _listed(TUNING["annotation"].get("datasets"), ds)]


def tuned_integration_datasets():
    return [ds for ds in embedding_datasets("integration") if _listed(TUNING["integration"].get("datasets"), ds)]


def _listed(allowed, value):
    return allowed is None or value in allowed


# Tuning: the same budget for every tuned model (cellarena/tuning.py)
TUNING = config["tuning"]
TUNED = {task: list(TUNING[task]["models"]) for task in ("annotation", "integration")}
for _task, _models in TUNED.items():
    for _m in _models:
        if _m not in TASK_MODELS[_task]:
            raise ValueError(f"tuning.{_task}.models lists {_m!r}, which is not in {_task}.models; "
                             f"add it there too (the tuned row is shown next to the default one)")
        if not MODEL_CARDS[_m].search_space:
            raise ValueError(f"tuning.{_task}.models lists {_m!r}, whose model.yaml declares no search_space; "
                             f"add one (see models/logistic_regression/model.yaml)")


def tuning_budget():
    return json.dumps({k: TUNING[k] for k in ("n_trials", "timeout_s", "inner_folds", "max_cells")},
                      sort_keys=True)


def tuning_storage_arg(wildcards):
    return f"--storage '{TUNING['storage']}'" if TUNING.get("storage") else ""


def tuning_record(wildcards):
    return (f"{RESULTS}/tuning/{{task}}/{wildcards.dataset}/{wildcards.split_name}_seed{wildcards.seed}/"
            f"{wildcards.model}.json")


def tuning_records():
    """Every tuning record of the plan (the tuned runs read them)."""
    out = [f"{RESULTS}/tuning/annotation/{ds}/{name}_seed{seed}/{m}.json"
           for ds, name, seed in tuned_annotation_splits() for m in TUNED["annotation"]]
    out += [f"{RESULTS}/tuning/integration/{ds}/{EMBEDDING_SPLIT}_seed{seed}/{m}.json"
            for ds in tuned_integration_datasets() for seed in config["seeds"] for m in TUNED["integration"]]
    return out


def annotation_splits():
    listed = config["annotation"].get("datasets")
    return [
        (ds, name, seed)
        for ds, card in CARDS.items()
        if listed is None or ds in listed
        for name, spec in SPLITS.items()
        if name != EMBEDDING_SPLIT and name not in PERTURBATION_SPLITS and split_applies(card, spec)
        for seed in config["seeds"]
    ]


# A perturbation split fits a dataset when its scheme fits the kind of perturbations the card has.
PERTURBATION_SCHEME_KIND = {"heldout_context": "stimulus", "unseen_perturbations": "genetic"}


def perturbation_splits():
    return [
        (ds, name, seed)
        for ds in config["perturbation"]["datasets"]
        if ds in CARDS and CARDS[ds].perturbations is not None
        for name, spec in PERTURBATION_SPLITS.items()
        if PERTURBATION_SCHEME_KIND[spec.scheme] == CARDS[ds].perturbations.kind
        for seed in config["seeds"]
    ]


def perturbation_runs():
    return [
        f"{RESULTS}/run_perturbation/{ds}/{name}_seed{seed}/{model}.parquet"
        for ds, name, seed in perturbation_splits()
        for model in TASK_MODELS["perturbation"]
    ]


def perturbation_options():
    return json.dumps({k: config["perturbation"][k] for k in ("n_genes", "top_de")}, sort_keys=True)


def embedding_datasets(task):
    """Datasets of an embedding task that are also in this plan's dataset list."""
    return [ds for ds in config[task]["datasets"] if ds in CARDS]


def embedded_datasets():
    """Every dataset that some embedding task scores, sorted."""
    return sorted({ds for t in EMBEDDING_TASKS for ds in embedding_datasets(t)})


def embedding_models(dataset):
    """Models that embed ``dataset``: those of every embedding task that scores it (each embeds once)."""
    models = []
    for task in EMBEDDING_TASKS:
        if dataset in embedding_datasets(task):
            models += [m for m in TASK_MODELS[task] if m not in models]
    return models


def planned_splits():
    out = annotation_splits() + perturbation_splits()
    out += [(ds, EMBEDDING_SPLIT, seed) for ds in embedded_datasets() for seed in config["seeds"]]
    return out


def embedding_task_options(dataset, task):
    opts = {"include_kbet": config[task]["include_kbet"]}
    role = config["batch_roles"].get(dataset)
    if role:
        opts["batch_role"] = role
    return opts


def task_options(wildcards, task):
    return json.dumps(embedding_task_options(wildcards.dataset, task), sort_keys=True)


def task_embeddings(wildcards):
    """The embedding files one scoring job reads: one per model of the task, and one per tuned model."""
    prefix = f"{RESULTS}/embed/{wildcards.dataset}/{wildcards.split_name}_seed{wildcards.seed}"
    tuned = TUNED["integration"] if (wildcards.task == "integration"
                                     and wildcards.dataset in tuned_integration_datasets()) else []
    return [f"{prefix}/{m}.npz" for m in TASK_MODELS[wildcards.task]] + [f"{prefix}/{m}.tuned.npz" for m in tuned]


def embedding_files():
    return [
        f"{RESULTS}/embed/{ds}/{EMBEDDING_SPLIT}_seed{seed}/{model}.npz"
        for ds in embedded_datasets()
        for seed in config["seeds"]
        for model in embedding_models(ds)
    ] + [
        f"{RESULTS}/embed/{ds}/{EMBEDDING_SPLIT}_seed{seed}/{model}.tuned.npz"
        for ds in tuned_integration_datasets()
        for seed in config["seeds"]
        for model in TUNED["integration"]
    ]


def embedding_runs(task):
    return [
        f"{RESULTS}/run_{task}/{ds}/{EMBEDDING_SPLIT}_seed{seed}.parquet"
        for ds in embedding_datasets(task)
        for seed in config["seeds"]
    ]


def submission_splits(model):
    """{TASK:DATASET=split file} of every split of this plan on which the submitted model's tasks run,
    with each one's task options (the metrics of failed rows depend on them)."""
    card = load_model_card(SUBMISSIONS[model])
    out = []
    for task in card.tasks:
        if task == "annotation":
            keys = annotation_splits()
        elif task == "perturbation":
            keys = perturbation_splits()
        else:
            keys = [(ds, EMBEDDING_SPLIT, seed) for ds in embedding_datasets(task) for seed in config["seeds"]]
        for ds, name, seed in keys:
            if task == "perturbation":
                opts = {k: config["perturbation"][k] for k in ("n_genes", "top_de")}
            elif task == "annotation":
                opts = {}
            else:
                opts = embedding_task_options(ds, task)
            out.append((task, ds, f"{RESULTS}/make_split/{ds}/{name}_seed{seed}.json", opts))
    return out


def submission_inputs(wildcards):
    folder = SUBMISSIONS[wildcards.model]
    return {"card": str(folder / "model.yaml"), "files": [str(p) for p in submission_files(folder)],
            "splits": sorted({path for _, _, path, _ in submission_splits(wildcards.model)})}


def submission_args(wildcards):
    plan = submission_splits(wildcards.model)
    splits = " ".join(f"--split {task}:{ds}={path}" for task, ds, path, _ in plan)
    options = json.dumps({f"{task}:{ds}": opts for task, ds, _, opts in plan}, sort_keys=True)
    return f"{splits} --options '{options}'"


def submission_runs():
    return [f"{RESULTS}/import_submission/{m}.parquet" for m in SUBMISSIONS]


def all_runs():
    return (annotation_runs() + embedding_runs("integration") + embedding_runs("zero_shot")
            + perturbation_runs() + submission_runs())


def intermediate_targets():
    parents = {s.dataset for c in CARDS.values() for s in c.sources if s.kind == "derived"}
    prepared = sorted(set(CARDS) | parents | {ds for c in CORPORA.values() for ds in c.datasets})
    out = [f"{RESULTS}/fetch_dataset/{ds}.json" for ds in prepared]
    out += [f"{RESULTS}/prepare_dataset/{ds}.h5ad" for ds in prepared]
    out += [checkpoint_prefix(m, seed) + ext for m in PRETRAINED for seed in config["seeds"]
            for ext in (".safetensors", ".json")]
    out += [f"{RESULTS}/make_split/{ds}/{name}_seed{seed}.json" for ds, name, seed in planned_splits()]
    return out + embedding_files() + tuning_records() + all_runs()
