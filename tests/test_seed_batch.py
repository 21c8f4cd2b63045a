"""Several seeds in one process (`--seed 0 --seed 1`, paths with {seed}): the workflow's model,
embedding, tuning and split jobs each run every seed of the plan, so imports, the sandbox host and
the read of the data are paid once. Each seed must give exactly what a job of that seed alone gives,
and a crash must cost only the files not yet written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cellarena import results
from cellarena.cli import build_parser
from cellarena.errors import CellarenaError
from cellarena.placeholder import WRITERS, per_model

MODELS = ("majority_class", "random_labels", "knn")
SPEC = json.dumps({"scheme": "stratified", "test_fraction": 0.3})


def _cellarena(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cellarena", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def splits(pbmc68k_prepared, tmp_path_factory) -> Path:
    """Seeds 0 and 1 of a stratified split, written by one `cellarena split` process."""
    folder = tmp_path_factory.mktemp("seed_splits")
    _cellarena("split", "--prepared", str(pbmc68k_prepared), "--name", "stratified", "--spec", SPEC,
               "--seed", "0", "--seed", "1", "--out", str(folder / "stratified_seed{seed}.json"))
    return folder


def test_one_split_process_writes_each_seed_as_a_process_of_its_own_would(splits, pbmc68k_prepared, tmp_path):
    _cellarena("split", "--prepared", str(pbmc68k_prepared), "--name", "stratified", "--spec", SPEC,
               "--seed", "1", "--out", str(tmp_path / "alone.json"))
    zero, one = (json.loads((splits / f"stratified_seed{s}.json").read_text()) for s in (0, 1))
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert one == alone
    assert zero["split_id"] == "stratified_seed0" and one["split_id"] == "stratified_seed1"
    assert zero["hash"] != one["hash"]  # each seed redraws the split


def test_a_run_of_two_seeds_gives_each_seed_what_it_gives_alone(splits, pbmc68k_prepared, repo, tmp_path):
    args = ["run", "--task", "annotation", "--prepared", str(pbmc68k_prepared),
            "--split", str(splits / "stratified_seed{seed}.json"), "--seed", "0", "--seed", "1", "--threads", "1"]
    for m in MODELS:
        args += ["--model", str(repo / "models" / m), "--out", str(tmp_path / "both" / f"seed{{seed}}_{m}.parquet")]
    printed = _cellarena(*args).stdout
    # seed by seed, every model of the job
    order = [line.split(" on ")[0] + "@" + line.split("/")[1].split(":")[0] for line in printed.splitlines()
             if " on pbmc68k_reduced/" in line]
    assert order == [f"{m}@stratified_seed{s}" for s in (0, 1) for m in MODELS], printed
    for seed in (0, 1):
        alone = ["run", "--task", "annotation", "--prepared", str(pbmc68k_prepared),
                 "--split", str(splits / f"stratified_seed{seed}.json"), "--seed", str(seed), "--threads", "1"]
        for m in MODELS:
            alone += ["--model", str(repo / "models" / m), "--out", str(tmp_path / "alone" / f"seed{seed}_{m}.parquet")]
        _cellarena(*alone)
        for m in MODELS:
            a = results.read(tmp_path / "both" / f"seed{seed}_{m}.parquet")
            b = results.read(tmp_path / "alone" / f"seed{seed}_{m}.parquet")
            assert set(a.status) == {"ok"} and (a.seed == seed).all() and (a.split_id == f"stratified_seed{seed}").all()
            cols = ["metric_id", "subgroup", "value", "split_hash", "seed", "model_id", "variant"]
            assert a[cols].equals(b[cols]), (seed, m)
    # the seeds differ: random labels score differently on another split and seed
    r0, r1 = (results.read(tmp_path / "both" / f"seed{s}_random_labels.parquet") for s in (0, 1))
    assert r0["value"].tolist() != r1["value"].tolist()


def _parsed(*argv: str):
    return build_parser().parse_args(list(argv))


def test_several_seeds_need_a_seed_in_each_path_of_their_own(pbmc68k_prepared, splits, tmp_path):
    base = ["run", "--task", "annotation", "--prepared", str(pbmc68k_prepared), "--seed", "0", "--seed", "1",
            "--model", "models/knn"]
    with pytest.raises(CellarenaError, match=r"--out .* has no \{seed\} though several --seed"):
        per_model(_parsed(*base, "--split", str(splits / "stratified_seed{seed}.json"), "--out", str(tmp_path / "x.parquet")))
    with pytest.raises(CellarenaError, match=r"--split .* has no \{seed\}"):
        per_model(_parsed(*base, "--split", str(splits / "stratified_seed0.json"), "--out", str(tmp_path / "{seed}.parquet")))
    with pytest.raises(CellarenaError, match="a seed is given twice"):
        per_model(_parsed("run", "--task", "annotation", "--prepared", "p.h5ad", "--split", "s{seed}.json",
                          "--seed", "0", "--seed", "0", "--model", "models/knn", "--out", "{seed}.parquet"))
    # a path shared by the seeds (one checkpoint for all) stays as it is; one seed needs no {seed}
    ones = per_model(_parsed(*base, "--split", "s{seed}.json", "--out", "o{seed}.parquet", "--checkpoint", "ck/model",
                             "--tuning", "t{seed}.json"))
    assert [(o.seed, o.split, o.out, o.checkpoint, o.tuning) for o in ones] == [
        (0, "s0.json", "o0.parquet", "ck/model", "t0.json"), (1, "s1.json", "o1.parquet", "ck/model", "t1.json")]
    one = per_model(_parsed("run", "--task", "annotation", "--prepared", "p.h5ad", "--split", "s.json", "--seed", "3",
                            "--model", "models/knn", "--out", "o.parquet"))
    assert [(o.seed, o.split, o.out) for o in one] == [(3, "s.json", "o.parquet")]


def test_the_command_line_refuses_a_shared_output_with_a_clear_error(pbmc68k_prepared, splits, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cellarena", "run", "--task", "annotation", "--prepared",
                           str(pbmc68k_prepared), "--split", str(splits / "stratified_seed{seed}.json"), "--seed", "0",
                           "--seed", "1", "--model", "models/knn", "--out", str(tmp_path / "knn.parquet")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "has no {seed} though several --seed are given" in proc.stdout + proc.stderr
    assert "write the seed's place in the path as {seed}" in proc.stdout + proc.stderr
    assert not (tmp_path / "knn.parquet").exists()


def test_a_crashed_job_of_several_seeds_leaves_placeholders_only_for_what_it_had_not_written(
        pbmc68k_prepared, splits, repo, tmp_path):
    head = ["run", "--task", "annotation", "--prepared", str(pbmc68k_prepared),
            "--split", str(splits / "stratified_seed{seed}.json"), "--threads", "1"]
    models = []
    for m in ("majority_class", "knn"):
        models += ["--model", str(repo / "models" / m), "--out", str(tmp_path / f"seed{{seed}}_{m}.parquet")]
    argv = head + ["--seed", "0", "--seed", "1"] + models
    # the job had written seed 0's files when it crashed
    _cellarena(*head, "--seed", "0", *[a.replace("{seed}", "0") for a in models])
    for m in ("majority_class", "knn"):
        assert (tmp_path / f"seed0_{m}.parquet").exists() and not (tmp_path / f"seed1_{m}.parquet").exists()
    WRITERS["run"](_parsed(*argv), "job crashed: a test")
    for m in ("majority_class", "knn"):
        kept, placeholder = (results.read(tmp_path / f"seed{s}_{m}.parquet") for s in (0, 1))
        assert set(kept.status) == {"ok"}
        assert set(placeholder.status) == {"failed"} and set(placeholder.status_reason) == {"job crashed: a test"}
        assert (placeholder.seed == 1).all() and (placeholder.split_id == "stratified_seed1").all()
    # the split command's placeholder likewise writes only the missing seeds
    (tmp_path / "s_seed0.json").write_text((splits / "stratified_seed0.json").read_text())
    WRITERS["split"](_parsed("split", "--prepared", str(pbmc68k_prepared), "--name", "stratified", "--spec", SPEC,
                             "--seed", "0", "--seed", "1", "--out", str(tmp_path / "s_seed{seed}.json")), "crashed")
    assert json.loads((tmp_path / "s_seed0.json").read_text())["hash"]
    failed = json.loads((tmp_path / "s_seed1.json").read_text())
    assert failed["seed"] == 1 and "crashed" in json.dumps(failed)


def test_one_scoring_process_of_two_seeds_scores_each_as_a_process_of_its_own(pbmc68k_prepared, repo, tmp_path):
    """`cellarena score` of two seeds (split, embeddings and output with {seed}) writes, per seed,
    what scoring that seed alone writes; a crash leaves placeholders for the missing seed only."""
    all_spec = json.dumps({"scheme": "all"})
    _cellarena("split", "--prepared", str(pbmc68k_prepared), "--name", "all", "--spec", all_spec,
               "--seed", "0", "--seed", "1", "--out", str(tmp_path / "all_seed{seed}.json"))
    embed = ["embed", "--prepared", str(pbmc68k_prepared), "--split", str(tmp_path / "all_seed{seed}.json"),
             "--seed", "0", "--seed", "1", "--threads", "1"]
    for m in ("pca", "random_embedding"):
        embed += ["--model", str(repo / "models" / m), "--out", str(tmp_path / "emb_seed{seed}" / f"{m}.npz")]
    _cellarena(*embed)
    embeddings = [str(tmp_path / "emb_seed{seed}" / f"{m}.npz") for m in ("pca", "random_embedding")]
    head = ["score", "--task", "zero_shot", "--prepared", str(pbmc68k_prepared), "--threads", "1"]
    both = head + ["--split", str(tmp_path / "all_seed{seed}.json"), "--seed", "0", "--seed", "1",
                   "--out", str(tmp_path / "both_seed{seed}.parquet"), *embeddings]
    printed = _cellarena(*both).stdout
    assert "zero_shot: pca (seed 0): ok" in printed and "zero_shot: random_embedding (seed 1): ok" in printed
    _cellarena(*head, "--split", str(tmp_path / "all_seed1.json"), "--seed", "1",
               "--out", str(tmp_path / "alone.parquet"), *[e.replace("{seed}", "1") for e in embeddings])
    cols = ["model_id", "metric_id", "subgroup", "value", "status", "seed", "split_hash"]
    one, alone, zero = (results.read(tmp_path / f) for f in ("both_seed1.parquet", "alone.parquet", "both_seed0.parquet"))
    assert set(one.status) == {"ok"} and (one.seed == 1).all() and (zero.seed == 0).all()
    assert one[cols].reset_index(drop=True).equals(alone[cols].reset_index(drop=True))
    assert zero["value"].tolist() != one["value"].tolist()  # another seed draws another embedding
    # an embedding path without {seed} among several seeds: refused before anything is scored
    with pytest.raises(CellarenaError, match=r"embedding .* has no \{seed\}"):
        WRITERS["score"](_parsed(*head, "--split", "s{seed}.json", "--seed", "0", "--seed", "1",
                                 "--out", str(tmp_path / "p{seed}.parquet"), str(tmp_path / "emb_seed0" / "pca.npz")), "x")
    # a crash after seed 0's file: the placeholder is seed 1's only
    (tmp_path / "c_seed0.parquet").write_bytes((tmp_path / "both_seed0.parquet").read_bytes())
    WRITERS["score"](_parsed(*head, "--split", str(tmp_path / "all_seed{seed}.json"), "--seed", "0", "--seed", "1",
                             "--out", str(tmp_path / "c_seed{seed}.parquet"), *embeddings), "job crashed: a test")
    kept, placeholder = (results.read(tmp_path / f"c_seed{s}.parquet") for s in (0, 1))
    assert set(kept.status) == {"ok"}
    assert set(placeholder.status) == {"failed"} and set(placeholder.status_reason) == {"job crashed: a test"}
    assert (placeholder.seed == 1).all() and set(placeholder.model_id) == {"pca", "random_embedding"}
