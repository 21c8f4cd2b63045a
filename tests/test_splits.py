"""Splits: seeded, stratified, deterministic, hashed; held-out roles."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellarena.errors import DataError
from cellarena.data.splits import SplitSpec, make_split, read_split, write_split

STRAT = SplitSpec(scheme="stratified", test_fraction=0.3)


def _obs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"cell_type": rng.choice(["a", "b", "c", "rare"], size=n, p=[.5, .3, .197, .003]),
                         "condition": np.where(np.arange(n) % 3 == 0, "stim", "ctrl")},
                        index=[f"c{i}" for i in range(n)])


def _split(obs, spec=STRAT, seed=0, version=1):
    return make_split(obs, dataset_id="toy", dataset_version=version, name="strat", spec=spec, seed=seed)


def test_same_seed_same_split_and_hash():
    obs = _obs()
    a, b = _split(obs), _split(obs)
    assert a["hash"] == b["hash"] and a["test"] == b["test"]
    assert a["split_id"] == "strat_seed0"


def test_other_seed_or_version_other_hash():
    obs = _obs()
    assert _split(obs, seed=1)["hash"] != _split(obs)["hash"]
    assert _split(obs, version=2)["hash"] != _split(obs)["hash"]


def test_stratified_proportions_and_disjoint():
    obs = _obs()
    s = _split(obs)
    assert not set(s["train"]) & set(s["test"])
    assert len(s["train"]) + len(s["test"]) == len(obs)
    test = obs.loc[s["test"], "cell_type"].value_counts()
    full = obs["cell_type"].value_counts()
    for ct in ("a", "b", "c"):
        assert abs(test[ct] / full[ct] - 0.3) < 0.02
    # a class with a single cell stays in train
    singles = full[full < 2].index
    assert not set(obs.loc[s["test"], "cell_type"]) & set(singles)


def test_real_data_split_is_deterministic(pbmc68k_prepared):
    obs = ad.read_h5ad(pbmc68k_prepared).obs
    hashes = {make_split(obs, dataset_id="pbmc68k_reduced", dataset_version=1, name="stratified",
                         spec=STRAT, seed=0)["hash"] for _ in range(3)}
    assert len(hashes) == 1


def test_heldout_role():
    obs = _obs()
    spec = SplitSpec(scheme="heldout", role="condition", test_values=["stim"])
    s = _split(obs, spec)
    assert set(obs.loc[s["test"], "condition"]) == {"stim"}
    assert set(obs.loc[s["train"], "condition"]) == {"ctrl"}
    with pytest.raises(DataError, match="role 'condition'"):
        _split(obs.drop(columns=["condition"]), spec)


def test_roundtrip_and_overlap_check(tmp_path):
    s = _split(_obs())
    path = write_split(s, tmp_path / "s.json")
    assert read_split(path) == s
    s["test"].append(s["train"][0])
    write_split(s, path)
    with pytest.raises(DataError, match="both train and test"):
        read_split(path)


def test_spec_rejects_unknown_keys():
    with pytest.raises(Exception, match="extra"):
        SplitSpec.model_validate({"scheme": "stratified", "fold": 3})


def test_max_cells_draws_a_stratified_subsample_per_seed_shared_by_the_splits_of_a_seed():
    obs = _obs(n=3000)
    capped = SplitSpec(scheme="stratified", test_fraction=0.3, max_cells=500)
    s = _split(obs, capped)
    used = obs.loc[s["train"] + s["test"]]
    assert len(used) == 500 and not set(s["train"]) & set(s["test"])
    # each cell type keeps its share; the rarest (a handful of cells) keeps at least one
    share = used["cell_type"].value_counts() / len(used)
    full = obs["cell_type"].value_counts() / len(obs)
    for ct in ("a", "b", "c"):
        assert abs(share[ct] - full[ct]) < 0.01
    assert share.get("rare", 0) > 0
    # the scheme runs on the drawn cells: 30% of them are test
    assert abs(len(s["test"]) / 500 - 0.3) < 0.02
    # same seed: same cells and hash; every split of that seed and cap uses the same cells
    assert _split(obs, capped) == s
    everything = _split(obs, SplitSpec(scheme="all", max_cells=500))
    assert set(everything["test"]) == set(used.index) and everything["train"] == []
    held = _split(obs, SplitSpec(scheme="heldout", role="condition", test_values=["stim"], max_cells=500))
    assert set(held["train"] + held["test"]) == set(used.index)
    # another seed draws other cells; the hash tells capped and uncapped splits apart
    other = _split(obs, capped, seed=1)
    assert set(other["train"] + other["test"]) != set(used.index)
    assert _split(obs)["hash"] != s["hash"]
    # a cap above the dataset's size changes nothing
    assert _split(obs, SplitSpec(scheme="stratified", test_fraction=0.3, max_cells=5000))["hash"] == _split(obs)["hash"]
