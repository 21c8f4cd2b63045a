"""Run one real Snakemake DAG full of hostile inputs and print what a user sees for each.

    .venv/bin/python benchmarks/hostile_cases.py [--keep DIR]

The plan (a temporary folder; the suite's datasets/ and models/ are not touched): pbmc68k_reduced
with the majority-class control as the honest run, plus
- hostile plug-ins: the folders of tests/hostile_models/ (label reader, sleeper with a 5 s limit,
  os._exit, sys.exit, NaN labels);
- hostile data: local-source cards whose file has NaN counts, cells without a label, Ensembl IDs
  under a card that declares symbols, a truncated h5ad, and a card whose sha256 does not match;
- hostile model folders: a model.yaml that does not validate, a folder without model.py.

Then, as a model author whose model cannot run here would, it turns the honest control's run into
submissions (`cellarena submit`), plants one lie in each (accuracy = inf, balanced accuracy = 1e9, a
flipped higher_is_better, an invented metric, a pickle renamed .parquet) and runs the DAG again,
which imports them.

For each case it prints the first line of the reason the rows carry, how many rows were written
with which status, and whether the DAG still ended in scores.parquet and a leaderboard. It exits 1
if any hostile case scored (status ok) or the DAG did not end in a leaderboard.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from machine import describe  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
HOSTILE = REPO / "tests" / "hostile_models"
sys.path.insert(0, str(REPO))

from cellarena import results  # noqa: E402
from cellarena.data.fetch import sha256_file  # noqa: E402
from cellarena.tasks import TASKS  # noqa: E402


def _counts(seed: int, n_cells: int = 120, n_genes: int = 60, ensembl: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    genes = [f"ENSG{i:011d}" for i in range(n_genes)] if ensembl else [f"GENE{i}" for i in range(n_genes)]
    obs = pd.DataFrame({"label": rng.choice(["B", "T", "NK"], n_cells)},
                       index=[f"c{seed}_{i}" for i in range(n_cells)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))


def _card(datasets: Path, dataset_id: str, source: Path, sha256: str | None = None) -> None:
    (datasets / f"{dataset_id}.yaml").write_text(yaml.safe_dump({
        "id": dataset_id, "version": 1, "title": f"hostile case {dataset_id}", "organism": "homo_sapiens",
        "gene_id_type": "symbol", "licence": "CC0", "citation": "cellarena benchmarks",
        "roles": {"cell_type": "label"}, "labels": {"quality": "expert"},
        "sources": [{"id": "main", "kind": "local", "path": str(source), "sha256": sha256 or sha256_file(source)}]}))


def build(tmp: Path) -> dict:
    """The folders and config of the hostile plan; returns {case: (kind, dataset, model)}."""
    datasets, models, raw = tmp / "datasets", tmp / "models", tmp / "raw"
    for d in (datasets, models, raw):
        d.mkdir(parents=True)
    shutil.copy(REPO / "datasets" / "pbmc68k_reduced.yaml", datasets)
    cases = {}

    nan = _counts(1)
    nan.X = nan.X.toarray()
    nan.X[3, 5] = np.nan
    nan.write_h5ad(raw / "nan_counts.h5ad")
    unlabelled = _counts(2)
    unlabelled.obs["label"] = unlabelled.obs["label"].astype(object)
    unlabelled.obs.iloc[:7, 0] = np.nan
    unlabelled.write_h5ad(raw / "missing_labels.h5ad")
    _counts(3, ensembl=True).write_h5ad(raw / "ensembl_ids.h5ad")
    _counts(4).write_h5ad(raw / "whole.h5ad")
    data = (raw / "whole.h5ad").read_bytes()
    (raw / "truncated.h5ad").write_bytes(data[: len(data) // 2])
    _counts(5).write_h5ad(raw / "bad_sha.h5ad")
    for name, what in (("nan_counts", "a NaN in the counts"), ("missing_labels", "7 cells without a label"),
                       ("ensembl_ids", "Ensembl IDs, card says symbol"), ("truncated", "truncated h5ad")):
        _card(datasets, f"hostile_{name}", raw / f"{name}.h5ad")
        cases[f"data: {what}"] = ("data", f"hostile_{name}", "majority_class")
    _card(datasets, "hostile_bad_sha", raw / "bad_sha.h5ad", sha256="0" * 64)
    cases["data: sha256 does not match the card"] = ("data", "hostile_bad_sha", "majority_class")

    shutil.copytree(REPO / "models" / "majority_class", models / "majority_class")
    for folder in sorted(HOSTILE.iterdir()):
        shutil.copytree(folder, models / folder.name)
    cases.update({
        "plug-in: reads the test labels from disk": ("model", "pbmc68k_reduced", "label_reader"),
        "plug-in: never returns (card limit 5 s)": ("model", "pbmc68k_reduced", "sleeper"),
        "plug-in: os._exit(3)": ("model", "pbmc68k_reduced", "os_exit"),
        "plug-in: sys.exit(0)": ("model", "pbmc68k_reduced", "sys_exit"),
        "plug-in: predicts NaN": ("model", "pbmc68k_reduced", "nan_labels"),
    })
    card = (models / "majority_class" / "model.yaml").read_text()
    (models / "bad_card").mkdir()
    (models / "bad_card" / "model.yaml").write_text(card.replace("id: majority_class", "id: bad_card")
                                                    .replace("kind: control", "kind: wizard"))
    (models / "bad_card" / "model.py").write_text((models / "majority_class" / "model.py").read_text())
    (models / "no_code").mkdir()
    (models / "no_code" / "model.yaml").write_text(card.replace("id: majority_class", "id: no_code"))
    cases["model folder: model.yaml does not validate"] = ("model", "pbmc68k_reduced", "bad_card")
    cases["model folder: no model.py"] = ("model", "pbmc68k_reduced", "no_code")
    cases["honest control (majority class)"] = ("model", "pbmc68k_reduced", "majority_class")

    names = ["pbmc68k_reduced", *sorted({d for _, d, _ in cases.values()} - {"pbmc68k_reduced"})]
    config = {  # every task empty but annotation, nothing tuned (the task list is cellarena.tasks')
        "plan": "hostile", "datasets": names, "datasets_dir": str(datasets), "models_dir": str(models),
        "results_dir": str(tmp / "results"), "seeds": [0], "auto_models": True,
        **{task: {"models": [], "datasets": []} for task in TASKS},
        "tuning": {task.id: {"models": []} for task in TASKS.values() if task.tuning},
    }
    config["annotation"] = {"datasets": names, "models": ["majority_class"],
                            "splits": {"stratified": {"scheme": "stratified", "test_fraction": 0.3}}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return cases


def _edit(path: Path, metric: str, column: str, text: str) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[(df["metric_id"] == metric) & (df["subgroup"] == ""), column] = text
    df.to_csv(path, index=False)


def _invent(path: Path) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    row = df[(df["metric_id"] == "accuracy") & (df["subgroup"] == "")].assign(metric_id="win_rate", value="1.0")
    pd.concat([df, row]).to_csv(path, index=False)


def _pickle(path: Path) -> None:
    import pickle  # noqa: PLC0415

    path.with_suffix(".parquet").write_bytes(pickle.dumps(pd.read_csv(path)))
    path.unlink()


SUBMISSIONS = {  # case -> (model id, the lie planted in submitted/results.csv)
    "submission: accuracy = inf": ("sub_inf", lambda p: _edit(p, "accuracy", "value", "inf")),
    "submission: balanced_accuracy = 1e9": ("sub_huge", lambda p: _edit(p, "balanced_accuracy", "value", "1e9")),
    "submission: higher_is_better flipped": ("sub_flipped", lambda p: _edit(p, "macro_f1", "higher_is_better",
                                                                           "False")),
    "submission: invented metric win_rate": ("sub_invented", _invent),
    "submission: a pickle renamed .parquet": ("sub_pickle", _pickle),
}


def add_submissions(tmp: Path, cases: dict) -> None:
    """Submitted folders made from the honest control's run, each with one lie (SUBMISSIONS)."""
    models = tmp / "models"
    run = next((tmp / "results" / "run_annotation" / "pbmc68k_reduced").glob("*/majority_class.parquet"))
    card = (models / "majority_class" / "model.yaml").read_text()
    for case, (mid, lie) in SUBMISSIONS.items():
        (models / mid).mkdir()
        (models / mid / "model.yaml").write_text(card.replace("id: majority_class", f"id: {mid}"))
        rows = results.read(run).assign(model_id=mid)
        results.write(rows, tmp / f"{mid}.parquet")
        subprocess.run([sys.executable, "-m", "cellarena", "submit", "--model", str(models / mid), "--datasets-dir",
                        str(tmp / "datasets"), str(tmp / f"{mid}.parquet")], check=True, capture_output=True)
        lie(models / mid / "submitted" / "results.csv")
        cases[case] = ("submission", "pbmc68k_reduced", mid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default=None, help="work in this folder and keep it")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="cellarena-hostile-"))
    if args.keep and tmp.exists():
        shutil.rmtree(tmp)
    cases = build(tmp)
    snakemake = [str(Path(sys.executable).parent / "snakemake"), "--profile", "workflow/profiles/default",
                 "--cores", str(args.cores), "--configfile", str(tmp / "config.yaml")]
    t0 = time.monotonic()
    proc = subprocess.run(snakemake, cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode == 0:  # the second pass: submissions made from the honest run, with lies planted
        add_submissions(tmp, cases)
        t0 = time.monotonic()
        proc = subprocess.run(snakemake, cwd=REPO, capture_output=True, text=True)
        seconds += time.monotonic() - t0
    out = tmp / "results"
    built = (out / "scores.parquet").exists() and (out / "leaderboard" / "index.html").exists()
    scores = results.read(out / "scores.parquet") if (out / "scores.parquet").exists() else None
    rows, bad = [], []
    for case, (_kind, dataset, model) in cases.items():
        got = (scores[(scores.dataset_id == dataset) & (scores.model_id == model)] if scores is not None
               else pd.DataFrame(columns=["status", "status_reason"]))
        statuses = ", ".join(f"{n} {s}" for s, n in got["status"].value_counts().sort_index().items()) or "none"
        reason = next(iter(set(got["status_reason"])), "") if len(got) else ""
        shown = re.sub(r" \(source main: [^)]*\)", "", reason.splitlines()[0]) if reason else "—"
        shown = shown.replace(str(tmp) + "/", "")
        rows.append((case, shown[:240], statuses))
        honest = case.startswith("honest")
        if (honest and set(got["status"]) != {"ok"}) or (not honest and (got.empty or "ok" in set(got["status"]))):
            bad.append(case)
    print(f"# hostile inputs, one Snakemake DAG run twice (then with the submissions): exit code {proc.returncode}, "
          f"{seconds:.0f} s; "
          f"scores.parquet and leaderboard built: {'yes' if built else 'NO'}")
    print(f"# {describe()}")
    print("| input | what the rows say (first line of status_reason) | rows |")
    print("|---|---|---|")
    for case, shown, statuses in rows:
        print(f"| {case} | {shown.replace('|', '/')} | {statuses} |")
    if proc.returncode != 0 or not built:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
    if bad:
        print(f"cases that scored or have no rows: {bad}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad or not built or proc.returncode != 0 else 0


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "200")
    sys.exit(main())
