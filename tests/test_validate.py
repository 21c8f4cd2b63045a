"""`cellarena validate`: every model folder passes it; broken plug-ins and cards fail it, saying what to fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cellarena.cards.model import discover
from cellarena.review.validate import TINY_GENES, validate_model

REPO = Path(__file__).resolve().parent.parent
FILLED = {  # what CONTRIBUTING.md tells a new author to replace in the template's card
    "id: my_model": "id: nearest_centroid",
    "name: TODO human-readable name shown on the leaderboard": "name: Nearest centroid on PCA",
    "  TODO one paragraph: what the model is, what it is trained on, and how this plug-in uses it.\n":
        "  Nearest centroid of each cell type in the PCA space of the training cells.\n",
    "citation: TODO authors, title, journal or preprint server, year, DOI":
        "citation: Tibshirani R et al. PNAS 99, 6567-6572 (2002). doi:10.1073/pnas.082099299",
    "licence: TODO SPDX id of the code and weights, e.g. MIT or Apache-2.0": "licence: MIT",
}


def test_tiny_data_is_small_real_and_covers_every_task(tiny):
    import anndata as ad

    from cellarena.data.splits import read_split

    adata = ad.read_h5ad(tiny.prepared)
    assert adata.n_obs == 200 and adata.n_vars == TINY_GENES
    assert adata.uns["cellarena"]["dataset_id"] == "kang2018_ifnb"
    counts = adata.obs.groupby(["cell_type", "condition"], observed=True).size()
    assert len(counts) == 8 and set(counts) == {25}
    assert read_split(tiny.splits["stratified"])["n_test"] == 60
    assert len(read_split(tiny.splits["heldout_context"])["folds"]) == 4  # one held-out cell type per fold


def _new_model(tmp_path: Path, model_py: str | None = None, card_edits: dict | None = None) -> Path:
    """A model folder made from the template the way CONTRIBUTING.md says, then optionally broken."""
    folder = tmp_path / "models" / "nearest_centroid"
    shutil.copytree(REPO / "models" / "_template", folder)
    text = (folder / "model.yaml").read_text()
    for old, new in {**FILLED, **(card_edits or {})}.items():
        assert old in text, old
        text = text.replace(old, new)
    (folder / "model.yaml").write_text(text)
    if model_py is not None:
        (folder / "model.py").write_text(model_py)
    return folder


def _failure(report, name: str):
    hits = [c for c in report.checks if c.name == name and c.status == "fail"]
    assert hits, report.text()
    return hits[0]


@pytest.mark.parametrize("model_id", sorted(discover(REPO / "models")))
def test_every_model_folder_validates(model_id, tiny):
    report = validate_model(REPO / "models" / model_id, data=tiny)
    assert report.ok, report.text()
    assert any(c.status == "pass" and c.name in ("annotation", "integration", "zero_shot", "perturbation")
               for c in report.checks), report.text()


def test_template_filled_in_per_contributing_passes(tmp_path, tiny):
    report = validate_model(_new_model(tmp_path), data=tiny)
    assert report.ok, report.text()
    assert [c.name for c in report.checks if c.status == "pass"][-2:] == ["annotation", "zero_shot"]


def test_template_as_shipped_says_copy_it_first(tiny):
    report = validate_model(REPO / "models" / "_template", data=tiny)
    assert "copy it to models/<your_id>" in _failure(report, "card schema").fix


def test_placeholders_left_in_the_card_fail(tmp_path, tiny):
    folder = tmp_path / "models" / "my_model"
    shutil.copytree(REPO / "models" / "_template", folder)
    report = validate_model(folder, data=tiny)
    for field in ("licence", "citation", "name"):
        check = _failure(report, f"card {field}")
        assert "placeholder" in check.message and check.fix


def test_missing_licence_fails_with_the_field_and_the_fix(tmp_path, tiny):
    folder = _new_model(tmp_path, card_edits={"licence: MIT\n": ""})
    check = _failure(validate_model(folder, data=tiny), "card schema")
    assert "licence: Field required" in check.message
    assert "SPDX" in check.fix


def test_wrong_output_shape_fails(tmp_path, tiny):
    broken = (REPO / "models" / "_template" / "model.py").read_text().replace(
        "return self._classes[distance.argmin(axis=1)]", "return self._classes[distance.argmin(axis=1)][:-1]")
    check = _failure(validate_model(_new_model(tmp_path, broken), data=tiny), "annotation")
    assert "predict returned shape (59,), expected (60,)" in check.message
    assert "one label per row" in check.fix


def test_nan_embedding_fails(tmp_path, tiny):
    broken = (REPO / "models" / "_template" / "model.py").read_text().replace(
        "        return LogPCA(int(self.params[\"n_comps\"]), int(self.params[\"n_hvg\"]), self.context.seed).fit_transform(adata)",
        "        z = LogPCA(int(self.params[\"n_comps\"]), int(self.params[\"n_hvg\"]), self.context.seed).fit_transform(adata)\n"
        "        z[0, 0] = float('nan')\n        return z")
    report = validate_model(_new_model(tmp_path, broken), data=tiny)
    check = _failure(report, "zero_shot")
    assert "1 non-finite values" in check.message and "finite" in check.fix
    assert [c.status for c in report.checks if c.name == "annotation"] == ["pass"]


def test_class_indices_instead_of_labels_fail(tmp_path, tiny):
    broken = (REPO / "models" / "_template" / "model.py").read_text().replace(
        "return self._classes[distance.argmin(axis=1)]", "return distance.argmin(axis=1)")
    check = _failure(validate_model(_new_model(tmp_path, broken), data=tiny), "annotation")
    assert "never received" in check.message and "classes_" in check.fix


def test_unseeded_randomness_fails_the_determinism_check(tmp_path, tiny):
    broken = (REPO / "models" / "_template" / "model.py").read_text().replace(
        "        return LogPCA(int(self.params[\"n_comps\"]), int(self.params[\"n_hvg\"]), self.context.seed).fit_transform(adata)",
        "        import os\n        return np.frombuffer(os.urandom(200 * 4 * 3), dtype=np.uint32).reshape(200, 3) / 2**32")
    check = _failure(validate_model(_new_model(tmp_path, broken), data=tiny), "zero_shot")
    assert "different outputs" in check.message and "self.context.seed" in check.fix


def test_declared_task_without_its_methods_fails(tmp_path, tiny):
    folder = _new_model(tmp_path, card_edits={"tasks: [annotation, zero_shot]": "tasks: [annotation, perturbation]"})
    check = _failure(validate_model(folder, data=tiny), "perturbation: methods")
    assert "fit_perturbation, predict_perturbation" in check.message


def test_import_error_names_the_missing_package(tmp_path, tiny):
    broken = "import not_a_real_package_xyz\n" + (REPO / "models" / "_template" / "model.py").read_text()
    check = _failure(validate_model(_new_model(tmp_path, broken), data=tiny), "plug-in import")
    assert "not_a_real_package_xyz" in check.message and "pyproject.toml" in check.fix


def test_missing_corpus_manifest_fails(tmp_path, tiny):
    folder = _new_model(tmp_path, card_edits={"kind: baseline ": "kind: transformer ",
                                              "# pretraining:\n#   corpus: scgpt_whole_human":
                                                  "pretraining:\n  corpus: no_such_corpus"})
    check = _failure(validate_model(folder, data=tiny), "pretraining corpus")
    assert "no_such_corpus" in check.message


def test_gpu_required_model_is_skipped_on_cpu(tmp_path, tiny):
    folder = _new_model(tmp_path, card_edits={"gpu: none, mem_mb": "gpu: required, mem_mb"})
    report = validate_model(folder, data=tiny)
    assert report.ok and {c.status for c in report.checks if c.name in ("annotation", "zero_shot")} == {"skip"}


def test_cli_exit_status_and_report(tmp_path, tiny):
    broken = (REPO / "models" / "_template" / "model.py").read_text().replace(
        "return self._classes[distance.argmin(axis=1)]", "return self._classes[distance.argmin(axis=1)][:-1]")
    folder = _new_model(tmp_path, broken)
    env = {"CELLARENA_CACHE": str(Path(tiny.prepared).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "cellarena", "validate", str(folder), str(REPO / "models" / "knn")],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, **env})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL annotation" in proc.stdout and "fix: predict must return one label per row" in proc.stdout
    assert "models/knn:" in proc.stdout and "1 of 2 model folder(s) failed" in proc.stderr
