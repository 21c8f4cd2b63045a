"""A published claim as a card: ``claims/<id>.yaml``, re-run by ``cellarena claims``.

A claim card holds the claim in one sentence, its source (a DOI and the table or figure), the
original numbers, and one or two **tests** of it: ``original`` (the paper's datasets and models, as
this suite's cards name them; usually not runnable offline: a network dataset, a published
checkpoint, a GPU) and ``proxy`` (offline datasets and models that test the same statement,
labelled a proxy). Each test is a list of comparisons ``a <relation> b`` on one metric, each judged
on every dataset and split scheme the test names from the paired difference and its 95 % interval
(:mod:`cellarena.analysis.claims`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from cellarena.cards.base import Id, Strict, load_yaml_card, require_matching_id
from cellarena.tasks import TASK_IDS

RELATIONS = ("greater", "less", "equivalent", "at_least", "at_most")
RELATION_TEXT = {
    "greater": "A > B + margin",
    "less": "A < B − margin",
    "equivalent": "|A − B| ≤ margin",
    "at_least": "A ≥ B − margin (not worse by more than the margin)",
    "at_most": "A ≤ B + margin (not better by more than the margin)",
}


# Composite scores papers report, which a claim may name as its metric; cellarena.analysis.claims
# computes them per run from the results table.
DERIVED = {
    "avg_bio": "AvgBIO: mean of nmi, ari and silhouette_label per run",
    "mean_scaled": "mean over the task's metrics of the values scaled between the run's controls (not clipped)",
}
AVG_BIO_PARTS = ("nmi", "ari", "silhouette_label")


def known_metrics(task_id: str) -> set[str]:
    """The metric ids a claim on ``task_id`` may name: the task's own (with every option that adds
    some) and the composites of :data:`DERIVED` its metrics allow."""
    from cellarena import tasks  # noqa: PLC0415

    own = set(tasks.get(task_id).metric_specs({"batch_role": "batch", "include_kbet": True}))
    derived = {"mean_scaled"} | ({"avg_bio"} if set(AVG_BIO_PARTS) <= own else set())
    return own | derived


class Source(Strict):
    """Where the claim was published."""

    citation: Annotated[str, Field(min_length=10)]
    doi: Annotated[str, Field(pattern=r"^10\.\d{4,9}/\S+$", description="the DOI, e.g. 10.1038/s41592-025-02772-6")]
    where: Annotated[str, Field(min_length=3, description="table, figure or section holding the numbers")]
    numbers_from: str = Field("", description="where the original numbers come from when not from this "
                                              "paper (another benchmark's table: citation and DOI)")


class Entry(Strict):
    """One side of a comparison: a model card id and its variant."""

    model: Id
    variant: Literal["default", "tuned", "submitted"] = "default"

    @property
    def label(self) -> str:
        return self.model if self.variant == "default" else f"{self.model} ({self.variant})"


class Comparison(Strict):
    a: Entry
    b: Entry
    relation: Literal["greater", "less", "equivalent", "at_least", "at_most"]
    margin: Annotated[float, Field(ge=0)] = 0.0


class Test(Strict):
    """A re-runnable check: every comparison on every dataset (and split scheme) listed."""

    task: Literal[TASK_IDS]  # type: ignore[valid-type]
    datasets: Annotated[list[Id], Field(min_length=1)]
    schemes: list[str] = Field(default_factory=list, description="split schemes judged; empty: every scheme run")
    metric: Id
    comparisons: Annotated[list[Comparison], Field(min_length=1)]
    min_seeds: Annotated[int, Field(ge=1)] = 3
    needs: str = Field("", description="what running it takes, when the default plan does not run it")
    note: str = Field("", description="how this test differs from the paper's, if it does")

    @model_validator(mode="after")
    def _metric_is_known(self) -> Test:
        known = known_metrics(self.task)
        if self.metric not in known:
            raise ValueError(f"metric {self.metric!r} is not a metric of task {self.task}; choose one of "
                             f"{sorted(known)}")
        return self


class Claim(Strict):
    id: Id
    version: Annotated[int, Field(ge=1)] = 1
    claim: Annotated[str, Field(min_length=10, description="the claim in one sentence")]
    source: Source
    original_numbers: dict[str, float] = Field(default_factory=dict, description="label -> the paper's number "
                                               "(empty when the paper shows it in a figure without numbers)")
    original_metric: Annotated[str, Field(min_length=2, description="the paper's metric, in its words")]
    original: Test
    proxy: Test | None = None

    @model_validator(mode="after")
    def _proxy_is_offline(self) -> Claim:
        if self.proxy is not None and not self.proxy.note:
            raise ValueError("proxy.note must say how the proxy tests the same statement as the original")
        return self


def load_claim(path: str | Path) -> Claim:
    path = Path(path)
    claim = load_yaml_card(Claim, path, "claim card", fix_missing="write claims/<id>.yaml (claims/README.md)",
                           fix_invalid="fix the keys listed (claims/README.md describes each)")
    require_matching_id(claim.id, path.stem, path, what="claim", rename=f"{claim.id}.yaml")
    return claim


def load_claims(folder: str | Path) -> list[Claim]:
    """Every ``<id>.yaml`` of ``folder``, sorted by id (none when the folder does not exist)."""
    folder = Path(folder)
    return [load_claim(p) for p in sorted(folder.glob("*.yaml"))] if folder.is_dir() else []
