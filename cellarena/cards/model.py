"""Model cards (``models/<id>/model.yaml``) and loading of plug-ins (``models/<id>/model.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cellarena.cards.base import Strict, load_yaml_card, require_matching_id
from cellarena.errors import CardError
from cellarena.ids import ID_PATTERN
from cellarena.plugin import BaseModel
from cellarena.tasks import TASKS


class ParamRange(Strict):
    """Where one parameter is searched: a float or int range (optionally log-scaled) or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical range needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("a categorical range takes `choices` only (no low/high/log)")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} range takes low/high, not choices")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} range needs low < high (got low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int range needs integer low and high")
        return self

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

    def suggest(self, trial, name: str):
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)


def check_search_space(space: dict[str, ParamRange], params: dict[str, Any]) -> None:
    """Every tuned parameter has a default in ``params`` that lies in its range (trial 0 runs the defaults)."""
    for name, rng in space.items():
        if name not in params:
            raise ValueError(f"search_space.{name} has no default: add `{name}` to params")
        if not rng.contains(params[name]):
            where = rng.choices if rng.type == "categorical" else f"[{rng.low}, {rng.high}]"
            raise ValueError(f"search_space.{name}: the default {params[name]!r} (params.{name}) is not in "
                             f"{where}; widen the range or change the default")


class Resources(Strict):
    gpu: Literal["none", "optional", "required"] = "none"
    mem_mb: int = Field(2000, gt=0)
    threads: int = Field(1, ge=1)
    time_limit_s: float | None = Field(None, gt=0, description="seconds a run of this model may take before it "
                                       "is stopped and recorded as failed (default: the config's time_limit_s)")


class Recipe(Strict):
    """How the workflow pretrains an in-suite transformer on its corpus (``pretrain_transformer``)."""

    preset: Literal["tiny", "base"]
    encoding: Literal["rank", "bin", "projection"]
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="TransformerConfig fields that override the preset")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    mask_fraction: float = Field(0.15, gt=0, lt=1)
    max_steps: int | None = Field(None, ge=1)
    sample_keys: list[Literal["batch"]] = Field(
        default_factory=list, description="sample-level special tokens (the corpus' datasets as batches)")


class Pretraining(Strict):
    corpus: str = Field(pattern=ID_PATTERN, description="id of datasets/corpora/<id>.yaml")
    notes: str = ""
    recipe: Recipe | None = Field(
        None, description="in-suite models only: the workflow pretrains the model with this recipe "
                          "and hands the checkpoint to the plug-in (RunContext.checkpoint)")


class CheckpointFile(Strict):
    name: str = Field(min_length=1, description="path inside the release folder, as published")
    size_bytes: int | None = Field(None, gt=0, description="as published, where published")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="as published, where published")


class Checkpoint(Strict):
    """Published weights an adapter loads (cellarena/zoo/adapters/releases.py): never downloaded at run time."""

    release: str = Field(min_length=1, description="the release's name, e.g. scGPT_human (whole-human)")
    folder: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                        description="subfolder of the checkpoints directory that holds the files")
    files: list[CheckpointFile] = Field(min_length=1)
    source: str = Field(min_length=1, description="where to obtain the files (URL and any steps)")
    notes: str = ""


class InputSpec(Strict):
    """What a pretrained model expects of its input."""

    gene_id_type: Literal["symbol", "ensembl"]
    normalization: str = Field(min_length=1, description="what the model does to the raw counts")


class ModelCard(Strict):
    id: str = Field(pattern=ID_PATTERN)
    version: str = Field(min_length=1)
    name: str
    kind: Literal["baseline", "control", "transformer", "adapter"]
    tasks: list[str] = Field(min_length=1, description="the tasks it runs (cellarena/tasks.py)")
    description: str = ""
    citation: str
    licence: str
    params: dict[str, Any] = Field(default_factory=dict, description="default parameters")
    resources: Resources = Resources()
    pretraining: Pretraining | None = None
    uses_solution: bool = Field(False, description="controls only: receives the true test labels")
    validation_params: dict[str, Any] = Field(
        default_factory=dict, description="overrides of params that `cellarena validate` uses on its tiny data "
                                          "to keep the check to seconds (e.g. fewer training steps)")
    checkpoint: Checkpoint | None = Field(None, description="adapters: the published weights they load")
    input: InputSpec | None = Field(None, description="pretrained models: the gene ids and normalization they expect")
    organisms: list[Literal["homo_sapiens", "mus_musculus"]] | None = Field(
        None, description="organisms the model was trained on; other datasets are not_applicable (None: any)")
    search_space: dict[str, ParamRange] = Field(
        default_factory=dict, description="parameters the tuner searches (cellarena/run/tuning.py); each has "
                                          "its default in params, inside the range")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks {unknown} are not tasks of this suite; choose from {list(TASKS)}")
        return tasks

    @model_validator(mode="after")
    def _rules(self):
        if self.uses_solution and self.kind != "control":
            raise ValueError("only a model of kind 'control' may set uses_solution: true")
        if self.kind in ("transformer", "adapter") and self.pretraining is None:
            raise ValueError(f"a model of kind {self.kind!r} must declare its pretraining corpus")
        if self.kind == "adapter" and self.checkpoint is None:
            raise ValueError("a model of kind 'adapter' must declare the published checkpoint it loads")
        if self.search_space and self.kind == "control":
            raise ValueError("a control is never tuned: remove its search_space")
        check_search_space(self.search_space, self.params)
        unknown = sorted(set(self.validation_params) - set(self.params))
        if unknown:
            raise ValueError(f"validation_params {unknown} are not in params; validation may only change "
                             "the value of a parameter the model already has")
        return self


def unfit_reason(card: ModelCard, organism: str | None, gene_id_type: str | None) -> str:
    """Why ``card``'s model cannot read a dataset of ``organism`` and ``gene_id_type``, from the two
    cards alone ('' when it can): another organism than it was trained on, or genes without names
    for a pretrained model, which matches genes to its vocabulary by name."""
    if card.organisms and organism and organism not in card.organisms:
        return f"model {card.id} was trained on {', '.join(card.organisms)}; this dataset is {organism}"
    if gene_id_type == "none" and (card.pretraining is not None or card.input is not None):
        return (f"the dataset's features have no gene names (gene_id_type: none), and model {card.id} matches "
                "genes to its pretrained vocabulary by name")
    return ""


def load_model_card(model_dir: str | Path) -> ModelCard:
    model_dir = Path(model_dir)
    path = model_dir / "model.yaml"
    card = load_yaml_card(ModelCard, path, "model card", fix_missing="every model folder needs model.yaml",
                          fix_invalid="edit model.yaml to match the schema in cellarena/cards/model.py")
    require_matching_id(card.id, model_dir.name, path, what="model", rename=f"models/{card.id}")
    return card


def load_plugin(model_dir: str | Path) -> type[BaseModel]:
    """Import ``model.py`` from ``model_dir`` by path and return its ``Model`` class."""
    model_dir = Path(model_dir)
    path = model_dir / "model.py"
    if not path.is_file():
        raise CardError("plug-in not found", where=path, fix="every model folder needs model.py")
    name = f"cellarena_plugin_{model_dir.name}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # errors propagate: the runner records them as `failed`
    cls = getattr(module, "Model", None)
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise CardError("model.py must define `class Model(cellarena.plugin.BaseModel)`", where=path)
    return cls


def discover(models_dir: str | Path) -> dict[str, Path]:
    """Model folders under ``models_dir`` (those starting with '_' or '.' are templates/hidden)."""
    return {p.name: p for p in sorted(Path(models_dir).iterdir())
            if p.is_dir() and not p.name.startswith(("_", ".")) and (p / "model.yaml").exists()}
