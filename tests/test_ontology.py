"""Cell-Ontology-aware annotation scoring, on the real Cell Ontology that ships offline in
cellxgene-ontology-guide (CL v2026-03-26). The expected numbers are worked by hand from the ancestor
sets written out below (read off the ontology once and checked here, so a changed release fails)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from cellarena.metrics import annotation
from cellarena.metrics import ontology as onto
from cellarena.metrics.bootstrap import decode

from cellarena import results
from cellarena.cards.dataset import load_card, parse_card
from cellarena.data.fetch import sha256_file
from cellarena.data.prepare import prepare, write_h5ad
from cellarena.data.splits import read_split
from cellarena.errors import CardError, DataError
from cellarena.run import run_task

CD4, CD8, NK = "CL:0000624", "CL:0000625", "CL:0000623"
NAIVE_CD4, MICROGLIA = "CL:0000895", "CL:0000129"

# The ancestors (is-a, the term itself included, the root 'cell' CL:0000000 left out)
T_CELL_TRUNK = {
    "CL:0000791",  # mature alpha-beta T cell
    "CL:0000789",  # alpha-beta T cell
    "CL:0000084",  # T cell
    "CL:0002419",  # mature T cell
    "CL:0000542",  # lymphocyte
    "CL:0000842",  # mononuclear cell
    "CL:0000226",  # single nucleate cell
    "CL:0000738",  # leukocyte
    "CL:0000255",  # eukaryotic cell
    "CL:0002242",  # nucleate cell
    "CL:0000219",  # motile cell
    "CL:0000988",  # hematopoietic cell
}
ANCESTORS = {
    CD4: T_CELL_TRUNK | {CD4},
    CD8: T_CELL_TRUNK | {CD8},
    NAIVE_CD4: T_CELL_TRUNK | {CD4, NAIVE_CD4, "CL:0000898"},  # + naive T cell
    NK: {NK, "CL:0001065", "CL:0001067",  # innate lymphoid cell, group 1 innate lymphoid cell
         "CL:0000542", "CL:0000842", "CL:0000226", "CL:0000738", "CL:0000255", "CL:0002242", "CL:0000219",
         "CL:0000988"},
}
MAPPING = {"CD4": CD4, "CD8": CD8, "naive CD4": NAIVE_CD4, "NK": NK, "doublet": None}


def test_the_pinned_ontology_and_its_ancestor_sets():
    assert onto.parser().cxg_schema.supported_ontologies["CL"]["version"] == "v2026-03-26"
    for term, expected in ANCESTORS.items():
        assert onto.ancestors(term) == expected, term
    assert onto.parser().get_term_label(NAIVE_CD4) == "naive thymus-derived CD4-positive, alpha-beta T cell"


def test_distance_is_the_shortest_path_through_a_common_ancestor():
    assert onto.distance(CD4, CD4) == 0
    assert onto.distance(CD4, CD8) == 2  # CD4 -> mature alpha-beta T <- CD8
    assert onto.distance(NAIVE_CD4, CD8) == 3  # naive CD4 -> CD4 -> mature alpha-beta T <- CD8
    # NK -> ILC group 1 -> ILC -> lymphocyte (3) and CD4 -> mature ab T -> ab T -> T -> lymphocyte (4)
    assert onto.ancestor_distances(NK)["CL:0000542"] == 3 and onto.ancestor_distances(CD4)["CL:0000542"] == 4
    assert onto.distance(NK, CD4) == 7
    assert onto.ancestor_distances(NK)[onto.ROOT] == 7  # what an unmapped prediction costs on an NK cell


def test_rollup_to_cellxgene_subclasses():
    assert onto.rollup(NAIVE_CD4) == {CD4}  # CD4 alpha-beta T cell is itself a subclass
    assert onto.rollup(NK) == {"CL:0000542"}  # lymphocyte: no finer subclass above NK cells
    assert onto.rollup(MICROGLIA) == {"CL:0000125", "CL:0000235"}  # glial cell and macrophage
    assert onto.rollup("CL:0000881") == {"CL:0000235"}  # perivascular macrophage -> macrophage


def test_hand_worked_scores():
    """Five cells; the 'doublet' one has no term and is left out. Per cell (|T ∩ P|, |P|, |T|):
    CD4/CD4 (13, 13, 13), CD4/CD8 (12, 13, 13), CD8/naive CD4 (12, 15, 13), NK/doublet (0, 0, 11):
    hP = 37/41, hR = 37/50, hF = 74/91; distances 0, 2, 3, 7 -> 3; same subclass 1 of 4."""
    specs = annotation.metric_specs({"cell_ontology": MAPPING})
    y_true = ["CD4", "CD4", "CD8", "NK", "doublet"]
    y_pred = ["CD4", "CD8", "naive CD4", "doublet", "CD4"]
    got = {m: specs[m].fn(y_true, y_pred) for m in onto.metric_specs(MAPPING)}
    assert got == pytest.approx({"hierarchical_precision": 37 / 41, "hierarchical_recall": 37 / 50,
                                 "hierarchical_f1": 74 / 91, "ontology_distance": 3.0, "subclass_accuracy": 0.25})
    assert not specs["ontology_distance"].higher_is_better and specs["hierarchical_f1"].higher_is_better
    # all right: full credit
    perfect = {m: specs[m].fn(y_true[:4], y_true[:4]) for m in onto.metric_specs(MAPPING)}
    assert perfect == {"hierarchical_precision": 1.0, "hierarchical_recall": 1.0, "hierarchical_f1": 1.0,
                       "ontology_distance": 0.0, "subclass_accuracy": 1.0}
    # a near miss earns more than a far one
    near, far = (specs["hierarchical_f1"].fn(["CD4"], [p]) for p in ("naive CD4", "NK"))
    assert near > far > 0


def test_without_the_option_annotation_has_its_exact_metrics_only():
    assert set(annotation.metric_specs({})) == {"accuracy", "macro_f1", "balanced_accuracy", "weighted_f1",
                                                 "f1_per_class"}


def test_card_terms_are_checked_against_the_ontology():
    base = {"id": "toy", "version": 1, "title": "t", "organism": "homo_sapiens", "gene_id_type": "symbol",
            "licence": "CC0", "citation": "x", "roles": {"cell_type": "label"},
            "sources": [{"id": "main", "kind": "local", "path": "x.h5ad", "sha256": "0" * 64}]}
    ok = parse_card({**base, "labels": {"quality": "expert", "ontology": {"B": "CL:0000236", "junk": None}}}, "toy.yaml")
    assert ok.labels.ontology == {"B": "CL:0000236", "junk": None}
    for term, said in [("CL:0000473", "obsolete"), ("CL:9999999", "not a term of Cell Ontology v2026-03-26"),
                       ("B cell", "is not a Cell Ontology id")]:
        with pytest.raises(CardError, match=said) as err:
            parse_card({**base, "labels": {"quality": "expert", "ontology": {"B": term}}}, "toy.yaml")
        assert "toy.yaml" in str(err.value) and "'B'" in str(err.value)
    with pytest.raises(CardError, match="maps no label"):
        parse_card({**base, "labels": {"quality": "expert", "ontology": {"B": None}}}, "toy.yaml")


def test_every_labelled_card_maps_its_labels(repo):
    """The suite's labelled datasets all carry a mapping, and every term is current."""
    for card_id in ("pbmc68k_reduced", "kang2018_ifnb", "pbmc_cross_study", "zeisel2015_mouse_brain",
                    "scib_human_immune", "scib_human_pancreas", "wang2018_starmap_mpfc", "wu2020_tumour_t_cells"):
        mapping = load_card(repo / "datasets" / f"{card_id}.yaml").labels.ontology
        assert mapping and not onto.term_problems(mapping), card_id


def test_prepare_refuses_a_label_the_mapping_lacks(tmp_path):
    rng = np.random.default_rng(0)
    raw = ad.AnnData(rng.poisson(1.0, (6, 5)).astype(np.float32))
    raw.var_names = [f"G{i}" for i in range(5)]
    raw.obs["label"] = ["B", "B", "NK", "NK", "Mystery", "Mystery"]
    path = tmp_path / "raw.h5ad"
    raw.write_h5ad(path)
    card = {"id": "toy", "version": 1, "title": "t", "organism": "homo_sapiens", "gene_id_type": "symbol",
            "licence": "CC0", "citation": "x", "roles": {"cell_type": "label"},
            "sources": [{"id": "main", "kind": "local", "path": str(path), "sha256": sha256_file(path)}],
            "labels": {"quality": "expert", "ontology": {"B": "CL:0000236", "NK": NK}}}
    with pytest.raises(DataError, match=r"no entry for 1 of the 3 cell-type labels: \['Mystery'\]") as err:
        prepare(parse_card(card, "toy.yaml"), {"main": path})
    assert "null where no term fits" in str(err.value)
    card["labels"]["ontology"]["Mystery"] = None
    out = write_h5ad(prepare(parse_card(card, "toy.yaml"), {"main": path}), tmp_path / "toy.h5ad")
    assert ad.read_h5ad(out).n_obs == 6


def test_annotation_run_reports_ontology_metrics_with_intervals(pbmc68k_prepared, pbmc68k_split, repo):
    """A real run (the majority-class control) on pbmc68k_reduced: the ontology rows equal the sums
    worked from the ancestor sets, and their bootstrap replicates are of the labels, not of codes."""
    mapping = load_card(repo / "datasets" / "pbmc68k_reduced.yaml").labels.ontology
    rows = run_task("annotation", pbmc68k_prepared, pbmc68k_split, repo / "models" / "majority_class", seed=0,
                    options={"cell_ontology": mapping, "bootstrap_replicates": 20})
    results.validate(rows)
    assert (rows.status == "ok").all()
    overall = rows[rows.subgroup == ""].set_index("metric_id")
    split = read_split(pbmc68k_split)
    labels = ad.read_h5ad(pbmc68k_prepared).obs["cell_type"].astype(str)
    truth = labels.loc[split["test"]].to_numpy()
    majority = labels.loc[split["train"]].value_counts().index[0]  # what the control predicts for every cell
    p = onto.ancestors(mapping[majority])
    inter = sum(len(onto.ancestors(mapping[t]) & p) for t in truth)
    assert overall.loc["hierarchical_precision", "value"] == pytest.approx(inter / (len(p) * truth.size))
    assert overall.loc["hierarchical_recall", "value"] == pytest.approx(
        inter / sum(len(onto.ancestors(mapping[t])) for t in truth))
    assert overall.loc["subclass_accuracy", "value"] >= overall.loc["accuracy", "value"]
    for metric in onto.metric_specs(mapping):
        _, n, values = decode(overall.loc[metric, "bootstrap_json"])
        assert n == truth.size and len(values) == 20 and np.isfinite(values).all()
        assert values.std() > 0  # resamples of the labels: they move
