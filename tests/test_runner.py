"""The runner: statuses, output checks, what a model may see, determinism."""

from __future__ import annotations

import json
import platform
import textwrap

import numpy as np
import pytest

from cellarena import results
from cellarena.data.prepare import failed_placeholder, write_h5ad
from cellarena.run import run_task

CARD = """\
id: {id}
version: "0.1"
name: test model
kind: {kind}
tasks: [{tasks}]
citation: test
licence: MIT
"""


def _plugin(models_dir, model_id, body, kind="baseline", tasks="annotation", extra=""):
    folder = models_dir / model_id
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text(CARD.format(id=model_id, kind=kind, tasks=tasks) + extra)
    (folder / "model.py").write_text(
        "import numpy as np\nfrom cellarena.plugin import BaseModel, NotApplicable\n\n"
        "class Model(BaseModel):\n" + textwrap.indent(textwrap.dedent(body), "    "))
    return folder


@pytest.fixture(scope="module")
def split_file(pbmc68k_split):
    return pbmc68k_split


def _run(pbmc68k_prepared, split_file, folder, **kw):
    rows = run_task("annotation", pbmc68k_prepared, split_file, folder, seed=0, **kw)
    results.validate(rows)
    return rows


def _status(rows):
    assert rows["status"].nunique() == 1
    return rows["status"].iloc[0], rows["status_reason"].iloc[0]


def test_ok_run_has_every_metric_and_provenance(pbmc68k_prepared, split_file, repo):
    rows = _run(pbmc68k_prepared, split_file, repo / "models" / "majority_class")
    assert _status(rows) == ("ok", "")
    overall = rows[rows.subgroup == ""].set_index("metric_id")["value"]
    assert set(overall.index) == {"accuracy", "macro_f1", "balanced_accuracy", "weighted_f1"}
    assert 0 < overall["accuracy"] < 0.5
    assert (rows[rows.metric_id == "f1_per_class"].subgroup != "").all()
    first = rows.iloc[0]
    assert first.dataset_version == 1 and first.split_hash and first.model_version == "1.0.0"
    assert first.n_train + first.n_test == 700 and first.wall_s >= 0 and first.peak_rss_mb > 0
    assert first.git_commit and first.label_quality == "expert"
    # the environment, so a score that moved can be traced to a package or a machine
    env = json.loads(first.environment_json)
    assert env["packages"]["numpy"] == np.__version__ and env["packages"]["scikit-learn"]
    assert env["python"] == platform.python_version() and env["n_cpus"] >= 1 and env["cpu"]


def test_raising_model_gives_failed_rows(pbmc68k_prepared, split_file, tmp_path):
    folder = _plugin(tmp_path, "broken", """
        def fit(self, train, labels):
            raise RuntimeError("out of coffee")
    """)
    rows = _run(pbmc68k_prepared, split_file, folder)
    status, reason = _status(rows)
    assert status == "failed" and reason == "RuntimeError: out of coffee"
    assert rows["value"].isna().all()


@pytest.mark.parametrize("body, message", [
    ("def predict(self, test, *, solution=None):\n    return np.array(['x'] * 3)", "shape (3,)"),
    ("def predict(self, test, *, solution=None):\n    return np.full(test.n_obs, np.nan)", "NaN"),
    ("def predict(self, test, *, solution=None):\n    return np.zeros((test.n_obs, 2))", "shape"),
    # class indices instead of the label strings fit() received
    ("def predict(self, test, *, solution=None):\n    return np.zeros(test.n_obs, dtype=int)", "never received"),
])
def test_output_checks(pbmc68k_prepared, split_file, tmp_path, body, message):
    folder = _plugin(tmp_path, "sloppy", "def fit(self, train, labels):\n    pass\n" + body)
    status, reason = _status(_run(pbmc68k_prepared, split_file, folder))
    assert status == "failed" and message in reason


def test_not_applicable_from_plugin_and_from_card(pbmc68k_prepared, split_file, tmp_path):
    folder = _plugin(tmp_path, "picky", """
        def fit(self, train, labels):
            raise NotApplicable("needs mouse genes")
    """)
    assert _status(_run(pbmc68k_prepared, split_file, folder)) == ("not_applicable", "needs mouse genes")
    folder = _plugin(tmp_path, "embedder", "pass", tasks="integration")
    status, reason = _status(_run(pbmc68k_prepared, split_file, folder))
    assert status == "not_applicable" and "does not support annotation" in reason


def test_model_never_sees_test_labels(pbmc68k_prepared, split_file, tmp_path):
    folder = _plugin(tmp_path, "spy", """
        def fit(self, train, labels):
            assert "cell_type" in train.obs and len(labels) == train.n_obs
            self.first = labels[0]
        def predict(self, test, *, solution=None):
            assert "cell_type" not in test.obs, "test labels leaked into the model's view"
            assert solution is None
            return np.repeat(self.first, test.n_obs)
    """)
    assert _status(_run(pbmc68k_prepared, split_file, folder))[0] == "ok"


def test_solution_only_for_controls_that_ask(pbmc68k_prepared, split_file, repo, tmp_path):
    rows = _run(pbmc68k_prepared, split_file, repo / "models" / "positive_control")
    assert (rows[rows.subgroup == ""]["value"] == 1.0).all()
    # a baseline cannot ask for the solution: its card is rejected
    folder = _plugin(tmp_path, "cheater", "pass", extra="uses_solution: true\n")
    with pytest.raises(Exception, match="only a model of kind 'control'"):
        _run(pbmc68k_prepared, split_file, folder)


def test_failed_dataset_gives_failed_rows(tmp_path, split_file, repo):
    bad = write_h5ad(failed_placeholder("pbmc68k_reduced", 1, "expert", "checksum of nothing"),
                     tmp_path / "bad.h5ad")
    status, reason = _status(_run(bad, split_file, repo / "models" / "knn"))
    assert status == "failed" and "dataset preparation failed: checksum of nothing" in reason


def test_same_seed_same_numbers(pbmc68k_prepared, split_file, repo):
    a = _run(pbmc68k_prepared, split_file, repo / "models" / "random_labels")
    b = _run(pbmc68k_prepared, split_file, repo / "models" / "random_labels")
    np.testing.assert_array_equal(a["value"].to_numpy(), b["value"].to_numpy())
    c = run_task("annotation", pbmc68k_prepared, split_file, repo / "models" / "random_labels", seed=1)
    assert not np.array_equal(a["value"].to_numpy(), c["value"].to_numpy())
