"""The plan: a workflow config in, the jobs of a benchmark run out. Pure Python, no Snakemake.

:func:`load` reads the dataset, model and corpus cards a config names and checks that the config
holds together (split names, tuned models, the models' search spaces); :class:`Plan` then lists
every job of the run as the wildcard values of the rule that makes it (``dataset``, ``split_name``,
``seed``, ``model``, ``task``). The workflow (``workflow/rules/*.smk``) turns those into targets
with each rule's own output pattern, so no path is written twice, and hands a job its settings as
arguments (:meth:`Plan.job_args`).

What decides which jobs exist:

- each task's datasets (its ``datasets`` list; for annotation, ``null`` means every dataset of
  the plan) and the splits of its section whose scheme fits the dataset (a held-out split needs
  its role; a perturbation scheme needs the card's kind of perturbation); the embedding tasks
  score every cell (split ``all``) and each model embeds a dataset once for all of them;
- each task's models, plus, with ``auto_models``, every model folder that no list names, for
  each task its card declares;
- the tuned models (``tuning.<task>.models``), which must also be among the task's models and
  declare a search space, on the datasets and splits ``tuning`` selects;
- the in-suite transformers (cards with ``pretraining.recipe``), pretrained once per seed on their
  corpus with every evaluation dataset excluded;
- model folders with submitted results (``models/<id>/submitted/``), checked against the plan's
  splits of the tasks their card declares;
- model folders that cannot run (a model.yaml that does not load, no model.py and no submitted
  results): no job runs their code; one job per folder writes ``failed`` rows, with the reason and
  its fix, for every run the plan would have given it (:meth:`Plan.broken_plan`), and the other
  models run as usual.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from cellarena.cards.corpus import CorpusCard, corpus_path, load_corpus
from cellarena.cards.dataset import DatasetCard, card_path, load_card
import yaml

from cellarena.cards.model import ModelCard, discover, load_model_card, unfit_reason
from cellarena.data.perturbation import split_spec
from cellarena.data.splits import SplitSpec
from cellarena.errors import CardError, CellarenaError
from cellarena.ids import is_valid_id
from cellarena.metrics.bootstrap import DEFAULT_REPLICATES
from cellarena.review.submission import submission_files
from cellarena.tasks import EMBEDDING_SPLIT, TASKS, TUNED_EMBEDDING_TASK, Task

CONFIG = "the workflow config (workflow/config*.yaml or --config)"


class PlanError(CellarenaError):
    """The config does not hold together."""


@dataclasses.dataclass(frozen=True)
class Plan:
    config: dict
    cards: dict[str, DatasetCard]  # the datasets the plan runs, in config order
    splits: dict[str, SplitSpec]  # split name -> scheme, every task's (the embedding tasks' `all` included)
    task_models: dict[str, list[str]]  # task id -> model ids
    model_cards: dict[str, ModelCard]
    tuned: dict[str, list[str]]  # tuned task id -> tuned model ids
    corpora: dict[str, CorpusCard]  # in-suite transformer -> the corpus it is pretrained on
    submissions: dict[str, Path]  # model id -> folder with submitted results
    notes: tuple[str, ...] = ()  # what loading decided, for the log (skipped datasets, new models)
    # model id -> (why its folder cannot run, the tasks it would have joined): failed rows, no runs
    broken: dict[str, tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)

    # ---------------------------------------------------------------------------------------------
    # datasets and splits

    def task_datasets(self, task: Task) -> list[str]:
        """The datasets of the plan that ``task`` runs on."""
        listed = self.config.get(task.id, {}).get("datasets")
        return [ds for ds in self.cards if listed is None or ds in listed]

    def task_splits(self, task: Task) -> dict[str, SplitSpec]:
        """The splits of ``task``'s section (the embedding tasks': ``all``)."""
        return {name: spec for name, spec in self.splits.items() if spec.scheme in task.split_schemes}

    def split_keys(self, task: Task) -> list[dict]:
        """Every (dataset, split_name, seed) ``task`` runs on: the splits whose scheme fits the dataset."""
        return [{"dataset": ds, "split_name": name, "seed": seed}
                for ds in self.task_datasets(task)
                for name, spec in self.task_splits(task).items() if spec.applies_to(self.cards[ds])
                for seed in self.config["seeds"]]

    def split_jobs(self) -> list[dict]:
        """Every split file of the plan (rule make_split)."""
        return _unique(key for task in TASKS.values() for key in self.split_keys(task))

    def prepared_datasets(self) -> list[str]:
        """Every dataset to fetch and prepare: the plan's, the parents of derived ones, the corpora's."""
        parents = {s.dataset for c in self.cards.values() for s in c.sources if s.kind == "derived"}
        corpus = {ds for c in self.corpora.values() for ds in c.datasets}
        return sorted(set(self.cards) | parents | corpus)

    def derived_parents(self, dataset: str) -> list[str]:
        """The datasets whose prepared files a derived card reads (simulated datasets)."""
        card = load_card(card_path(self.config["datasets_dir"], dataset))
        return [s.dataset for s in card.sources if s.kind == "derived"]

    def batch_role(self, dataset: str) -> str:
        """The obs role embedding models see as the batch ('' when the dataset has none)."""
        return self.config["batch_roles"].get(dataset) or ""

    def task_options(self, task: Task, dataset: str) -> dict:
        """The options a job of ``task`` gets: its config keys, and the batch role of embedding tasks."""
        section = self.config.get(task.id, {})
        options = {k: section[k] for k in task.option_keys if k in section}
        if task.bootstrap_unit:
            options["bootstrap_replicates"] = int(self.config.get("bootstrap_replicates", DEFAULT_REPLICATES))
        if task.scores_embeddings and self.batch_role(dataset):
            options["batch_role"] = self.batch_role(dataset)
        if task.scores_embeddings and self.config.get("scoring_max_cells"):
            options["max_cells"] = int(self.config["scoring_max_cells"])
        ontology = self.cards[dataset].labels.ontology if dataset in self.cards else None
        if task.ontology_metrics and ontology:
            options["cell_ontology"] = dict(ontology)
        return options

    # ---------------------------------------------------------------------------------------------
    # model runs

    def model_tasks(self) -> list[Task]:
        """The tasks whose runs are one job per model (the others score shared embeddings)."""
        return [t for t in TASKS.values() if not t.scores_embeddings]

    def model_runs(self, tuned: bool = False) -> list[dict]:
        """Every run of a model-run task (rule run_model; ``tuned``: run_model_tuned)."""
        return [{"task": task.id, **key, "model": m}
                for task in self.model_tasks()
                for key in (self.tuned_keys(task) if tuned else self.split_keys(task))
                for m in (self.tuned.get(task.id, []) if tuned else self.task_models[task.id])]

    def embedded_datasets(self) -> list[str]:
        """Every dataset some embedding task scores."""
        return sorted({ds for t in TASKS.values() if t.scores_embeddings for ds in self.task_datasets(t)})

    def embedding_models(self, dataset: str) -> list[str]:
        """The models that embed ``dataset``: those of every embedding task that scores it, once each."""
        return list(dict.fromkeys(m for t in TASKS.values() if t.scores_embeddings and dataset in self.task_datasets(t)
                                  for m in self.task_models[t.id]))

    def embed_jobs(self, tuned: bool = False) -> list[dict]:
        """Every embedding to make (rule embed_cells; ``tuned``: embed_cells_tuned)."""
        if tuned:
            task = TASKS.get(TUNED_EMBEDDING_TASK)
            return [] if task is None else [{**key, "model": m} for key in self.tuned_keys(task)
                                            for m in self.tuned.get(task.id, [])]
        return [{"dataset": ds, "split_name": EMBEDDING_SPLIT, "seed": seed, "model": m}
                for ds in self.embedded_datasets() for seed in self.config["seeds"]
                for m in self.embedding_models(ds)]

    def scoring_jobs(self) -> list[dict]:
        """Every (embedding task, dataset, split, seed) scoring job (rule score_embeddings)."""
        return [{"task": t.id, **key} for t in TASKS.values() if t.scores_embeddings for key in self.split_keys(t)]

    def scored_embeddings(self, task_id: str, dataset: str, seed: int) -> list[dict]:
        """The embeddings one scoring job reads: one per model of the task, and one per tuned model
        (``{"model", "tuned"}``)."""
        tuned = [k["model"] for k in self.embed_jobs(tuned=True)
                 if k["dataset"] == dataset and int(k["seed"]) == int(seed) and task_id == TUNED_EMBEDDING_TASK]
        return ([{"model": m, "tuned": False} for m in self.task_models[task_id]]
                + [{"model": m, "tuned": True} for m in dict.fromkeys(tuned)])

    # ---------------------------------------------------------------------------------------------
    # tuning, pretraining, submissions

    def tuned_keys(self, task: Task) -> list[dict]:
        """The (dataset, split_name, seed) the plan tunes ``task`` on."""
        if task.tuning is None:
            return []
        section = self.config["tuning"].get(task.id, {})
        return [k for k in self.split_keys(task)
                if _listed(section.get("splits"), k["split_name"]) and _listed(section.get("datasets"), k["dataset"])]

    def tuning_jobs(self) -> list[dict]:
        """Every tuning record to make (rule tune_model)."""
        return [{"task": task.id, **key, "model": m} for task in TASKS.values()
                for key in self.tuned_keys(task) for m in self.tuned.get(task.id, [])]

    def tuning_budget(self) -> str:
        """The one budget every tuned model gets, as the JSON `cellarena tune --budget` takes."""
        return json.dumps({k: self.config["tuning"][k] for k in ("n_trials", "timeout_s", "inner_folds", "max_cells")},
                          sort_keys=True)

    def model_params(self, model: str) -> dict:
        """The parameters this plan sets for ``model`` instead of its card's (config ``model_params``)."""
        return dict((self.config.get("model_params") or {}).get(model, {}))

    def pretrain_jobs(self) -> list[dict]:
        """Every in-suite transformer checkpoint (rule pretrain_transformer): one per seed, or one in
        all with ``pretrain_seed``."""
        seeds = dict.fromkeys(self.pretrain_seed(s) for s in self.config["seeds"])
        used = {m for task in TASKS.values() for m in self.task_models.get(task.id, [])
                for ds in self.task_datasets(task) if self.needs_checkpoint(m, ds)}
        return [{"model": m, "seed": seed} for m in self.corpora if m in used for seed in seeds]

    def pretrain_seed(self, seed: int | str) -> int:
        """The seed of the checkpoint the runs of ``seed`` fine-tune (config ``pretrain_seed``)."""
        shared = self.config.get("pretrain_seed")
        return int(seed) if shared is None else int(shared)

    def pretrained(self, model: str) -> bool:
        return model in self.corpora

    def unfit(self, model: str, dataset: str) -> str:
        """Why ``model`` cannot read ``dataset``, known from the two cards before anything runs
        ('' when it can): its runs there end not_applicable with this reason."""
        card, data = self.model_cards.get(model), self.cards.get(dataset)
        return unfit_reason(card, data.organism, data.gene_id_type) if card and data else ""

    def readable_datasets(self, model: str) -> list[str]:
        """The plan's datasets ``model`` can read (:meth:`unfit`): those its pretraining corpus must
        exclude; a dataset it cannot read never gets a run of it, and adding one changes no checkpoint."""
        return [ds for ds in self.cards if not self.unfit(model, ds)]

    def needs_checkpoint(self, model: str, dataset: str) -> bool:
        """Whether the jobs of ``model`` on ``dataset`` wait for its pretrained checkpoint: not where
        the model cannot read the data (those runs end not_applicable without it)."""
        return self.pretrained(model) and not self.unfit(model, dataset)

    def submission_files(self, model: str) -> list[Path]:
        """The files of a model's submitted results."""
        return submission_files(self.submissions[model])

    def submission_plan(self, model: str) -> list[tuple[str, dict, dict]]:
        """(task, split key, task options) of every split of this plan on which the submitted model's
        tasks run (the metrics of failed rows depend on the options)."""
        card = load_model_card(self.submissions[model])
        return [(task_id, key, self.task_options(TASKS[task_id], key["dataset"]))
                for task_id in card.tasks for key in self.split_keys(TASKS[task_id])]

    def broken_plan(self, model: str) -> list[tuple[str, dict, dict]]:
        """(task, split key, task options) of every run a model folder that cannot run would have had;
        each becomes ``failed`` rows with the reason (``Plan.broken``)."""
        return [(task_id, key, self.task_options(TASKS[task_id], key["dataset"]))
                for task_id in self.broken[model][1] for key in self.split_keys(TASKS[task_id])]

    # ---------------------------------------------------------------------------------------------
    # what a job is told

    @property
    def device(self) -> str:
        """Where models that allow a GPU run (and in-suite transformers pretrain): cpu unless the config
        says cuda."""
        return self.config.get("device", "cpu")

    def job_args(self) -> str:
        """The settings every model job gets as arguments: where corpus cards and published
        checkpoints are, the device and the time limit of a run."""
        args = f"--datasets-dir {shlex.quote(str(Path(self.config['datasets_dir']).resolve()))}"
        args += f" --device {self.device} --time-limit {float(self.config.get('time_limit_s', 7200)):g}"
        if self.config.get("checkpoints_dir"):
            path = Path(self.config["checkpoints_dir"]).expanduser().resolve()
            args += f" --checkpoints-dir {shlex.quote(str(path))}"
        return args


def _listed(allowed, value) -> bool:
    return allowed is None or value in allowed


def _unique(items) -> list[dict]:
    return list({json.dumps(i, sort_keys=True): i for i in items}.values())


def columns(jobs: list[dict]) -> dict[str, list]:
    """Jobs as one list per wildcard, the form Snakemake's ``expand(pattern, zip, ...)`` takes."""
    return {k: [j[k] for j in jobs] for k in (jobs[0] if jobs else {})}


# --------------------------------------------------------------------------------------------------
# loading a config

def load(config: dict) -> Plan:
    """Read the cards a validated config names and check that the config holds together."""
    notes = []
    cards = {}
    for ds in config["datasets"]:
        card = load_card(card_path(config["datasets_dir"], ds))
        if card.requires_network and not config["include_network_datasets"]:
            notes.append(f"skipping {ds} (requires_network; set include_network_datasets)")
            continue
        cards[ds] = card
    splits = _splits(config)
    task_models = {t: list(config.get(t, {}).get("models", [])) for t in TASKS}
    folders = discover(config["models_dir"])
    broken = {}
    for m in dict.fromkeys(m for models in task_models.values() for m in models):  # listed: a folder must exist
        problem = model_folder_problem(Path(config["models_dir"]) / m) if m in folders else None
        if problem:
            broken[m] = (problem, tuple(t for t, models in task_models.items() if m in models))
    if config["auto_models"]:
        listed = {m for models in task_models.values() for m in models}
        for m, folder in folders.items():
            if m in listed or (not (folder / "model.py").exists() and submission_files(folder)):
                continue  # listed, or a folder of submitted results only
            if not is_valid_id(m):
                notes.append(f"skipping model folder {m!r}: its name is not a snake_case id (rename the folder)")
                continue
            problem = model_folder_problem(folder)
            if problem:
                broken[m] = (problem, _declared_tasks(folder))
                continue
            joined = [t for t in load_model_card(folder).tasks if t in task_models]
            for t in joined:
                task_models[t].append(m)
            notes.append(f"new model folder {m} joins {', '.join(joined)} (auto_models)")
    for m, (problem, tasks) in broken.items():
        notes.append(f"model folder {m} cannot run; its runs in {', '.join(tasks)} are failed rows: "
                     f"{problem.splitlines()[0]}")
    task_models = {t: [m for m in models if m not in broken] for t, models in task_models.items()}
    model_cards = {m: load_model_card(Path(config["models_dir"]) / m) for models in task_models.values() for m in models}
    tuned = _tuned(config, task_models, model_cards, broken)
    _check_model_params(config, model_cards)
    corpora = {m: load_corpus(corpus_path(config["datasets_dir"], c.pretraining.corpus))
               for m, c in model_cards.items() if c.pretraining and c.pretraining.recipe}
    submissions = {m: folder for m, folder in folders.items()
                   if config["submissions"] and m not in broken and submission_files(folder)}
    return Plan(config, cards, splits, task_models, model_cards, tuned, corpora, submissions, tuple(notes), broken)


def model_folder_problem(folder: str | Path) -> str | None:
    """Why a model folder cannot run, naming the file and the fix (a model.yaml that does not load,
    no model.py and no submitted results); None when it can."""
    folder = Path(folder)
    try:
        load_model_card(folder)
    except CellarenaError as exc:
        fix = exc.fix or (f"make it a model card (see models/_template/model.yaml); `cellarena validate {folder}` "
                          "checks it")
        return str(CardError(exc.message, where=exc.where, fix=fix))
    if not (folder / "model.py").is_file() and not submission_files(folder):
        return str(CardError("plug-in not found", where=folder / "model.py",
                             fix="add model.py (copy models/_template/model.py), or submitted results "
                                 "(`cellarena submit`)"))
    return None


def _declared_tasks(folder: Path) -> tuple[str, ...]:
    """The tasks a card that does not load declares, where its YAML says; else every task."""
    try:
        raw = yaml.safe_load((folder / "model.yaml").read_text())
    except (OSError, yaml.YAMLError):
        raw = None
    tasks = raw.get("tasks") if isinstance(raw, dict) else None
    declared = [t for t in tasks if t in TASKS] if isinstance(tasks, list) else []
    return tuple(dict.fromkeys(declared)) or tuple(TASKS)


def _splits(config: dict) -> dict[str, SplitSpec]:
    """Every task section's splits, checked: each name used once, ``all`` reserved, schemes of the task."""
    cap = config.get("split_max_cells")
    splits = {EMBEDDING_SPLIT: SplitSpec(scheme="all", max_cells=cap)}
    for task in TASKS.values():
        for name, raw in config.get(task.id, {}).get("splits", {}).items():
            if name in splits:
                which = ("is reserved for the embedding tasks" if name == EMBEDDING_SPLIT
                         else "is used by two tasks")
                raise PlanError(f"the split name {name!r} {which}", where=CONFIG,
                                fix=f"rename {task.id}.splits.{name}")
            spec = split_spec(raw)
            if isinstance(spec, SplitSpec) and spec.max_cells is None and cap is not None:
                spec = spec.model_copy(update={"max_cells": cap})  # the plan's cap; a split's own wins
            if spec.scheme not in task.split_schemes:
                raise PlanError(f"{task.id}.splits.{name} has scheme {spec.scheme!r}", where=CONFIG,
                                fix=f"a {task.id} split's scheme is one of {list(task.split_schemes)}")
            splits[name] = spec
    return splits


def _check_model_params(config: dict, model_cards: dict) -> None:
    """``model_params`` may set only parameters a planned model's card has."""
    for model, params in (config.get("model_params") or {}).items():
        if model not in model_cards:
            continue  # a model this plan does not run (or whose folder cannot run) needs no budget
        unknown = sorted(set(params) - set(model_cards[model].params))
        if unknown:
            raise PlanError(f"model_params.{model} sets {unknown}, which models/{model}/model.yaml does not have",
                            where=CONFIG, fix=f"use its params: {sorted(model_cards[model].params)}")


def _tuned(config: dict, task_models: dict, model_cards: dict, broken: dict) -> dict[str, list[str]]:
    """The tuned models of each tuned task, each also run with its defaults and declaring a search space
    (a folder that cannot run is not tuned: its rows say why)."""
    tuned = {t.id: [m for m in config["tuning"].get(t.id, {}).get("models", []) if m not in broken]
             for t in TASKS.values() if t.tuning}
    for task, models in tuned.items():
        for m in models:
            if m not in task_models[task]:
                raise PlanError(f"tuning.{task}.models lists {m!r}, which is not in {task}.models", where=CONFIG,
                                fix="add it there too (the tuned row is shown next to the default one)")
            if not model_cards[m].search_space:
                raise PlanError(f"tuning.{task}.models lists {m!r}, whose model.yaml declares no search_space",
                                where=CONFIG, fix="add one (see models/logistic_regression/model.yaml)")
    return tuned
