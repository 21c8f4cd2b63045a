"""Cell-Ontology-aware annotation metrics: partial credit for a wrong label close to the right one.

A dataset card may map each of its labels to a Cell Ontology term (``labels.ontology``); the plan
hands that mapping to the annotation task as its ``cell_ontology`` option, and these metrics score
the predictions through it. The ontology is the one that ships, offline, in
``cellxgene-ontology-guide`` for the CELLxGENE schema :data:`SCHEMA_VERSION` (CL
:data:`CL_VERSION`), pinned so that a score never moves with the package's default.

With ``T`` the true term's ancestors and ``P`` the predicted term's (each including the term itself
and leaving out the root ``cell``, which every term shares):

- hierarchical precision ``sum |T ∩ P| / sum |P|``, recall ``sum |T ∩ P| / sum |T|`` and their F1,
  summed over the test cells (Kiritchenko et al. 2005);
- ontology distance: the mean over cells of the shortest path between the two terms through a
  common ancestor, in is-a edges (0 when the terms are equal);
- subclass accuracy: accuracy after rolling both terms up to CELLxGENE's cell-subclass level (the
  most specific subclasses above each term; a term under none stays itself); a cell counts as right
  when the two roll-ups share a subclass.

Cells whose true label has no term (mapped to null) are left out. A predicted label with no term
counts as the root ``cell``: it earns no precision penalty and no recall, its distance is the true
term's distance to the root, and it is never the right subclass.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from importlib import resources

import numpy as np
from cellarena.metrics import MetricSpec

SCHEMA_VERSION = "7.1.0"  # the CELLxGENE schema whose ontology versions are used
CL_VERSION = "v2026-03-26"  # the Cell Ontology release of that schema (checked on load)
ROOT = "CL:0000000"  # 'cell'
TERM = re.compile(r"CL:\d{7}")


@functools.cache
def parser():
    """The pinned Cell Ontology (loaded once per process, offline)."""
    from cellxgene_ontology_guide.ontology_parser import OntologyParser  # noqa: PLC0415

    p = OntologyParser(schema_version=SCHEMA_VERSION)
    found = p.cxg_schema.supported_ontologies["CL"]["version"]
    if found != CL_VERSION:
        raise RuntimeError(f"cellxgene-ontology-guide gives Cell Ontology {found} for schema {SCHEMA_VERSION}, "
                           f"expected {CL_VERSION}: install the version pinned in the lock file")
    return p


def term_problems(mapping: Mapping[str, str | None]) -> list[str]:
    """Why entries of a label -> CL term mapping cannot be used (an empty list: every entry can)."""
    p = parser()
    problems = []
    for label, term in mapping.items():
        if term is None:
            continue
        if not isinstance(term, str) or not TERM.fullmatch(term):
            problems.append(f"{label!r}: {term!r} is not a Cell Ontology id (CL: and 7 digits)")
        elif not p.is_valid_term_id(term):
            problems.append(f"{label!r}: {term} is not a term of Cell Ontology {CL_VERSION}")
        elif p.is_term_deprecated(term):
            new = p.get_term_replacement(term)
            problems.append(f"{label!r}: {term} ({p.get_term_label(term)}) is obsolete in Cell Ontology {CL_VERSION}"
                            + (f"; its replacement is {new} ({p.get_term_label(new)})" if new else ""))
    return problems


@functools.cache
def ancestor_distances(term: str) -> dict[str, int]:
    """Every ancestor of ``term`` (itself included, at 0) with its distance in is-a edges."""
    if term == ROOT:
        return {ROOT: 0}
    return dict(parser().get_term_ancestors_with_distances(term, include_self=True))


def ancestors(term: str) -> frozenset[str]:
    """``term`` and its ancestors, without the root 'cell'."""
    return frozenset(ancestor_distances(term)) - {ROOT}


def distance(a: str, b: str) -> int:
    """The shortest path between two terms through a common ancestor (is-a edges)."""
    da, db = ancestor_distances(a), ancestor_distances(b)
    common = set(da) & set(db)
    if not common:  # every CL term sits under 'cell'; kept for a term outside it
        return da.get(ROOT, 0) + db.get(ROOT, 0)
    return min(da[c] + db[c] for c in common)


@functools.cache
def subclasses() -> frozenset[str]:
    """CELLxGENE's cell-subclass terms (obsolete ones left out)."""
    text = resources.files("cellxgene_ontology_guide").joinpath("data", "cell_subclass_list.json").read_text()
    p = parser()
    return frozenset(t for t in json.loads(text) if p.is_valid_term_id(t) and not p.is_term_deprecated(t))


@functools.cache
def rollup(term: str) -> frozenset[str]:
    """The most specific cell subclasses at or above ``term``; ``{term}`` when there is none."""
    above = subclasses() & set(ancestor_distances(term))
    if not above:
        return frozenset({term})
    return frozenset(s for s in above if not any(s != o and s in ancestor_distances(o) for o in above))


def _pair_parts(true_term: str | None, pred_term: str | None) -> tuple[float, ...]:
    """(|T ∩ P|, |P|, |T|, distance, same subclass) of one true/predicted pair; NaNs when the true
    label has no term."""
    if true_term is None:
        return (np.nan,) * 5
    pred_term = pred_term or ROOT
    t, p = ancestors(true_term), ancestors(pred_term)
    same = bool(rollup(true_term) & rollup(pred_term)) if pred_term != ROOT else False
    return float(len(t & p)), float(len(p)), float(len(t)), float(distance(true_term, pred_term)), float(same)


class OntologyScorer:
    """Per-cell parts of the ontology metrics for one dataset's label -> term mapping (computed once
    per distinct (true, predicted) pair, so bootstrap resamples are cheap)."""

    def __init__(self, mapping: Mapping[str, str | None]):
        self.mapping = {str(k): v for k, v in mapping.items()}
        self._pairs: dict[tuple[str, str], tuple[float, ...]] = {}

    def parts(self, y_true, y_pred) -> np.ndarray:
        """An (n cells, 5) array; rows of NaN for cells whose true label has no term."""
        y_true = np.asarray(y_true, dtype=object).astype(str)
        y_pred = np.asarray(y_pred, dtype=object).astype(str)
        if y_true.ndim != 1 or y_true.shape != y_pred.shape:
            raise ValueError(f"y_true and y_pred must be 1-d of equal length, got {y_true.shape} and {y_pred.shape}")
        keys, inverse = np.unique(np.stack([y_true, y_pred], axis=1), axis=0, return_inverse=True)
        table = np.array([self._pair(str(t), str(p)) for t, p in keys], dtype=float).reshape(-1, 5)
        return table[inverse.reshape(-1)]

    def _pair(self, t: str, p: str) -> tuple[float, ...]:
        if (t, p) not in self._pairs:
            self._pairs[(t, p)] = _pair_parts(self.mapping.get(t), self.mapping.get(p))
        return self._pairs[(t, p)]

    def scored(self, y_true, y_pred) -> np.ndarray:
        parts = self.parts(y_true, y_pred)
        return parts[~np.isnan(parts[:, 0])]

    def hierarchical_precision(self, y_true, y_pred) -> float:
        s = self.scored(y_true, y_pred)
        return _ratio(s[:, 0].sum(), s[:, 1].sum())

    def hierarchical_recall(self, y_true, y_pred) -> float:
        s = self.scored(y_true, y_pred)
        return _ratio(s[:, 0].sum(), s[:, 2].sum())

    def hierarchical_f1(self, y_true, y_pred) -> float:
        s = self.scored(y_true, y_pred)  # 2 hP hR / (hP + hR) = 2 sum|T ∩ P| / (sum|P| + sum|T|)
        return _ratio(2 * s[:, 0].sum(), s[:, 1].sum() + s[:, 2].sum())

    def ontology_distance(self, y_true, y_pred) -> float:
        s = self.scored(y_true, y_pred)
        return float(s[:, 3].mean()) if len(s) else float("nan")

    def subclass_accuracy(self, y_true, y_pred) -> float:
        s = self.scored(y_true, y_pred)
        return float(s[:, 4].mean()) if len(s) else float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _on_labels(fn):
    """Mark a metric that reads the labels themselves (the bootstrap must not hand it integer codes)."""
    fn.on_labels = True
    return fn


def metric_specs(mapping: Mapping[str, str | None]) -> dict[str, MetricSpec]:
    """The ontology metrics of a dataset whose labels map to terms as ``mapping`` says."""
    s = OntologyScorer(mapping)

    def wrap(name):
        method = getattr(s, name)
        return _on_labels(lambda y_true, y_pred: method(y_true, y_pred))

    return {m.id: m for m in (
        MetricSpec("hierarchical_precision", wrap("hierarchical_precision"), True, (0.0, 1.0),
                   "share of the predicted Cell Ontology term's ancestors that are the true term's"),
        MetricSpec("hierarchical_recall", wrap("hierarchical_recall"), True, (0.0, 1.0),
                   "share of the true Cell Ontology term's ancestors that the prediction reaches"),
        MetricSpec("hierarchical_f1", wrap("hierarchical_f1"), True, (0.0, 1.0),
                   "harmonic mean of hierarchical precision and recall (partial credit by ontology closeness)"),
        MetricSpec("ontology_distance", wrap("ontology_distance"), False, (0.0, 100.0),
                   "mean is-a path length between the predicted and the true Cell Ontology term (0: exact)"),
        MetricSpec("subclass_accuracy", wrap("subclass_accuracy"), True, (0.0, 1.0),
                   "accuracy after rolling both labels up to CELLxGENE's cell subclasses"),
    )}
