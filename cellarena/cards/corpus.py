"""Pretraining-corpus cards: ``datasets/corpora/<id>.yaml``.

A corpus card says what a model was pretrained on. Two kinds:

- ``in_suite``: a corpus cellarena builds itself from dataset cards (``datasets``). It is exact by
  construction: the pretraining job reads those prepared datasets, removes every cell that is also
  in an evaluation dataset of the plan (cell fingerprints, :mod:`cellarena.data.leakage`), verifies that
  none is left, and records the exclusion in the checkpoint's card.
- ``published``: the corpus of a published model, known from its paper or repository. It lists the
  source studies it is known to contain by stable identifiers, with the reference each fact comes
  from and how complete the list is (``confidence``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cellarena.cards.dataset import Identifier
from cellarena.cards.base import Id, Strict, load_yaml_card, require_matching_id
from cellarena.errors import CardError
from cellarena.ids import ID_PATTERN

CORPORA_DIR = "corpora"


class ContainedStudy(Identifier):
    """A study a published corpus is known to contain, with where that fact comes from."""

    source: str = Field("", description="the reference (paper table, repository file@commit) that says so")
    verified: bool = Field(True, description="false when only a third party says so")


class Census(Strict):
    """A corpus drawn from a CELLxGENE Census release with a filter (resolvable to dataset IDs)."""

    release: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$", description="Census release date")
    organisms: list[Literal["homo_sapiens", "mus_musculus"]] = Field(min_length=1)
    filter: str = Field(description="the obs filter the authors applied, as they wrote it")
    value_filter: str | None = Field(None, description="the same filter as a SOMA obs value filter, which "
                                                       "`cellarena census-datasets` resolves to dataset ids")
    dataset_ids: list[str] = Field(default_factory=list,
                                   description="the CELLxGENE dataset ids of the release's cells that pass "
                                               "the filter (resolved); with them, evaluation data from the "
                                               "Census get a dataset-level leakage verdict")
    notes: str = ""


class CorpusCard(Strict):
    id: Id
    version: int = Field(ge=1)
    title: str
    description: str = ""
    kind: Literal["in_suite", "published"]
    confidence: Literal["exact", "census_release", "stated_in_paper"] = Field(
        description="exact: every source is listed; census_release: a CELLxGENE Census release "
                    "(resolvable to dataset IDs); stated_in_paper: the studies the authors name")
    datasets: list[Id] = Field(default_factory=list,
                               description="in_suite: dataset cards whose prepared cells form the corpus")
    contains: list[ContainedStudy] = Field(default_factory=list,
                                           description="studies known to be in the corpus")
    census: Census | None = Field(None, description="census_release corpora: the release and filter")
    references: list[str] = Field(default_factory=list, description="where the facts come from")
    n_cells: int | None = Field(None, ge=1, description="size of the corpus as published")

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind == "in_suite":
            if not self.datasets:
                raise ValueError("an in_suite corpus lists the dataset cards it is built from under 'datasets'")
            if self.confidence != "exact":
                raise ValueError("an in_suite corpus is exact by construction: set confidence: exact")
        elif self.datasets:
            raise ValueError("'datasets' is for in_suite corpora; list a published corpus' studies "
                             "under 'contains'")
        if self.kind == "published" and not self.references:
            raise ValueError("a published corpus must cite where its contents are documented (references)")
        if (self.confidence == "census_release") != (self.census is not None):
            raise ValueError("confidence census_release goes with a 'census' block (release, organisms, "
                             "filter), and a 'census' block with confidence census_release")
        return self


def corpus_path(datasets_dir: str | Path, corpus_id: str) -> Path:
    if not re.fullmatch(ID_PATTERN, corpus_id):
        raise CardError(f"invalid corpus id {corpus_id!r}", where=datasets_dir,
                        fix="corpus ids are lower-case snake_case")
    return Path(datasets_dir) / CORPORA_DIR / f"{corpus_id}.yaml"


def load_corpus(path: str | Path) -> CorpusCard:
    path = Path(path)
    card = load_yaml_card(CorpusCard, path, "corpus card",
                          fix_missing="corpus cards live in datasets/corpora/<id>.yaml",
                          fix_invalid="edit the card to match cellarena.cards.corpus.CorpusCard (see datasets/README.md)")
    require_matching_id(card.id, path.stem, path, what="corpus", rename=f"{card.id}.yaml")
    return card


def list_corpora(datasets_dir: str | Path) -> dict[str, CorpusCard]:
    folder = Path(datasets_dir) / CORPORA_DIR
    return {p.stem: load_corpus(p) for p in sorted(folder.glob("*.yaml"))}
