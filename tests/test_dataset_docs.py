"""datasets/README.md documents every field the card schemas accept, each in its own section."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from cellarena.cards import corpus, dataset

README = Path(__file__).resolve().parent.parent / "datasets" / "README.md"

# schema class -> the README section ("### ..." or "## ...") that documents its fields
SECTIONS = {
    dataset.DatasetCard: "### Top level",
    dataset.Identifier: "### Top level",
    dataset.PypiWheelSource: "### Source kinds",
    dataset.UrlSource: "### Source kinds",
    dataset.LocalSource: "### Source kinds",
    dataset.DerivedSource: "### Source kinds",
    dataset.CensusSource: "### Source kinds",
    dataset.CompanionFile: "### Companion files",
    dataset.ObsFile: "### Companion files",
    dataset.Counts: "### Counts",
    dataset.Labels: "### Labels",
    dataset.MarkerProcedure: "### Labels",
    dataset.Perturbations: "### Perturbations",
    dataset.ScreenSimulation: "### Simulation",
    corpus.CorpusCard: "## Pretraining-corpus cards (`corpora/<id>.yaml`)",
    corpus.ContainedStudy: "## Pretraining-corpus cards (`corpora/<id>.yaml`)",
    corpus.Census: "## Pretraining-corpus cards (`corpora/<id>.yaml`)",
}
COMMON_SOURCE = "### Sources"  # the fields every source kind shares


def _section(text: str, heading: str) -> str:
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading):]
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)]
    return rest[:ends[0]] if ends else rest


def _documented(section: str, field: str) -> bool:
    """A field is documented when the section names it in code (`field`, `parent.field`) or as a
    YAML key of an example (``field:``)."""
    return bool(re.search(rf"`(?:[a-z_]+\.)?{field}`|^\s*-?\s*{field}:", section, flags=re.M))


def _models() -> set[type[BaseModel]]:
    """Every schema class reachable from the two cards (so a new nested model must be listed)."""
    seen, todo = set(), [dataset.DatasetCard, corpus.CorpusCard]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for info in model.model_fields.values():
            stack = [info.annotation]
            while stack:
                tp = stack.pop()
                if isinstance(tp, type) and issubclass(tp, BaseModel):
                    todo.append(tp)
                stack.extend(typing.get_args(tp))
    return seen


def test_every_schema_class_has_a_section():
    assert _models() == set(SECTIONS)


@pytest.mark.parametrize("model", list(SECTIONS), ids=lambda m: m.__name__)
def test_every_field_is_documented(model):
    text = README.read_text()
    section = _section(text, SECTIONS[model])
    common = _section(text, COMMON_SOURCE)
    shared = set(dataset._SourceBase.model_fields) if issubclass(model, dataset._SourceBase) else set()
    missing = [f for f in model.model_fields
               if not _documented(common if f in shared else section, f)]
    assert not missing, f"datasets/README.md, section {SECTIONS[model]!r}: document {missing}"


def test_the_readme_names_only_accepted_formats_and_transforms():
    text = README.read_text()
    formats = typing.get_args(dataset._SourceBase.model_fields["format"].annotation)
    transforms = typing.get_args(dataset.Counts.model_fields["transform"].annotation)
    for value in (*formats, *transforms):
        assert f"`{value}`" in text, value
    assert "Pending" not in text  # nothing described as not yet accepted
