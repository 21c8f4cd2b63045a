"""Dataset cards: the shipped cards validate; malformed cards are rejected with the file named."""

import copy

import pytest
import yaml

from cellarena.cards.dataset import card_path, list_cards, load_card
from cellarena.errors import CardError

GOOD = {
    "id": "toy_set",
    "version": 1,
    "title": "toy",
    "organism": "homo_sapiens",
    "gene_id_type": "symbol",
    "licence": "CC0",
    "citation": "nobody",
    "sources": [{"id": "main", "kind": "local", "path": "toy.h5ad", "sha256": "a" * 64}],
    "roles": {"cell_type": "label"},
    "labels": {"quality": "expert"},
}


def _write(tmp_path, data, name=None):
    path = tmp_path / f"{name or data['id']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_cards_validate(repo):
    cards = list_cards(repo / "datasets")
    assert {"pbmc68k_reduced", "kang2018_ifnb"} <= set(cards)
    assert cards["pbmc68k_reduced"].label_quality == "expert"
    assert cards["kang2018_ifnb"].label_quality == "silver"
    assert cards["kang2018_ifnb"].labels.derive.procedure == "marker_clusters"
    assert [s.obs["condition"] for s in cards["kang2018_ifnb"].sources] == ["ctrl", "stim"]


def test_good_card_loads(tmp_path):
    card = load_card(_write(tmp_path, GOOD))
    assert card.id == "toy_set" and card.version == 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(colour="blue"), "colour: unknown key"),
        (lambda d: d["sources"][0].update(mirror="x"), "unknown key"),
        (lambda d: d.update(id="../etc"), "id: String should match pattern"),
        (lambda d: d.update(id="Toy"), "id: String should match pattern"),
        (lambda d: d.update(version="one"), "version"),
        (lambda d: d.update(version=0), "version"),
        (lambda d: d["sources"][0].update(sha256="abc"), "sha256"),
        (lambda d: d.update(sources=[{"id": "main", "kind": "url", "url": "http://x.org/a.h5ad",
                                      "sha256": "a" * 64, "size": 10}], requires_network=True), "url"),
        (lambda d: d.update(sources=[{"id": "main", "kind": "url", "url": "https://x.org/a.h5ad",
                                      "sha256": "a" * 64, "size": 10}]), "requires_network"),
        (lambda d: d.update(sources=[{"id": "m", "kind": "pypi_wheel", "package": "p", "version": "1",
                                      "member": "../../etc/passwd", "sha256": "a" * 64}]), "member"),
        (lambda d: d.update(labels={"quality": "silver"}), "procedure"),
        (lambda d: d.update(labels={"quality": "gold"}), "labels.quality"),
        (lambda d: d.update(roles={"celltype": "x"}), "roles"),
        (lambda d: d.update(roles={}), "expert labels need roles.cell_type"),
        (lambda d: d["sources"].append(dict(d["sources"][0])), "source ids must be unique"),
        (lambda d: d.update(counts={"matrix": "raw", "transform": "log1p_normalized"}), "size_column"),
    ],
)
def test_bad_cards_are_rejected(tmp_path, mutate, message):
    data = copy.deepcopy(GOOD)
    mutate(data)
    path = _write(tmp_path, data, name="toy_set")
    with pytest.raises(CardError) as err:
        load_card(path)
    text = str(err.value)
    assert str(path) in text, "the error must name the card file"
    assert message in text
    assert "fix:" in text


def test_file_name_must_match_id(tmp_path):
    path = _write(tmp_path, GOOD, name="other_name")
    with pytest.raises(CardError, match="does not match its file name"):
        load_card(path)


def test_not_a_mapping_and_missing_file(tmp_path):
    bad = tmp_path / "toy_set.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(CardError, match="mapping"):
        load_card(bad)
    with pytest.raises(CardError, match="not found"):
        load_card(tmp_path / "absent.yaml")


def test_card_path_rejects_traversal(tmp_path):
    with pytest.raises(CardError, match="invalid dataset id"):
        card_path(tmp_path, "../secrets")
