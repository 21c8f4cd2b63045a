"""Every shipped dataset card validates; cards that download over the network say so and use https.

No network is touched here: the cards are only parsed. The url fetch path itself (download, size
and sha256 checks) is tested against a loopback https server in tests/test_fetch.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cellarena.cards.dataset import UrlSource, load_card

REPO = Path(__file__).resolve().parent.parent
CARD_PATHS = sorted((REPO / "datasets").glob("*.yaml"))


def _raw(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _has_url_source(path: Path) -> bool:
    """Read from the raw YAML, so a card is classified even when it does not validate."""
    return any(isinstance(s, dict) and (s.get("kind") == "url" or (s.get("kind") == "census" and not s.get("uri")))
               for s in _raw(path).get("sources") or [])


NETWORK_CARD_PATHS = [p for p in CARD_PATHS if _has_url_source(p)]


def test_cards_are_found():
    assert CARD_PATHS, "no dataset cards found under datasets/"


@pytest.mark.parametrize("path", CARD_PATHS, ids=[p.stem for p in CARD_PATHS])
def test_every_card_validates(path):
    card = load_card(path)  # raises CardError (naming the file) on any schema violation
    assert card.id == path.stem
    assert card.version >= 1


@pytest.mark.parametrize("path", NETWORK_CARD_PATHS, ids=[p.stem for p in NETWORK_CARD_PATHS])
def test_network_cards_are_marked_and_use_https(path):
    card = load_card(path)
    assert card.requires_network, f"{path.name}: a card with a url source must set requires_network"
    urls = [s for s in card.sources if isinstance(s, UrlSource)]
    assert urls
    for src in urls:
        assert src.url.startswith("https://"), f"{path.name}: source {src.id} is not https"
        assert re.fullmatch(r"[0-9a-f]{64}", src.sha256)
        assert src.size > 0


def test_cards_without_url_sources_stay_offline():
    """requires_network is for cards that download over https; the offline default plan relies on it."""
    for path in CARD_PATHS:
        if not _has_url_source(path):
            assert not _raw(path).get("requires_network", False), (
                f"{path.name} has no url source but sets requires_network")


@pytest.mark.parametrize("card_id, cell_type, batch", [
    ("scib_human_pancreas", "celltype", "tech"),
    ("scib_human_immune", "final_annotation", "batch"),
])
def test_scib_cards(card_id, cell_type, batch):
    path = REPO / "datasets" / f"{card_id}.yaml"
    assert path in NETWORK_CARD_PATHS, f"{path.name} missing or without a url source"
    card = load_card(path)
    assert card.label_quality == "expert"
    assert card.role_columns() == {"cell_type": cell_type, "batch": batch}
    assert card.organism == "homo_sapiens" and card.gene_id_type == "symbol"
    assert {"type": "doi", "value": "10.1038/s41592-021-01336-8"} in [
        i.model_dump() for i in card.identifiers]
    # one figshare file per card, fetched whole
    (src,) = card.sources
    assert src.url.startswith("https://api.figshare.com/v2/file/download/")
