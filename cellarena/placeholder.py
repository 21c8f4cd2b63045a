"""What a job that cannot finish leaves behind: the failed placeholder of its output, so that one
crash costs its own rows and the workflow still ends in a results table and a leaderboard.

- :func:`guard` runs one ``cellarena`` command as a child process; the workflow runs every job
  through it (``cellarena guard -- run ...``). Most failures never reach it: a command records a
  broken dataset, split or plug-in in its own output and succeeds. When the command itself ends
  with an error (a killed process, a segfault, an uncaught exception: a bug in the suite or its
  environment), the guard writes the command's output as a failed placeholder — failed result rows,
  a failed manifest, prepared file, split, embedding, tuning record or checkpoint, which the
  downstream jobs turn into failed rows — whose reason carries the exit code and the last lines of
  the job's log, so that ``cellarena summary`` shows the crash. A job killed from outside (SIGKILL
  or SIGTERM: the OOM killer, a preempted node) is first left to Snakemake's retries, as many as
  the workflow allows (``$CELLARENA_RETRIES``; a retry may get more memory); a crash no retry cures
  gets its placeholder at once. A guard that is itself interrupted or stopped (Ctrl-C, a cancelled
  job, a cluster's time limit, which signals the whole job) writes nothing: the job fails as usual.
- :func:`model_folder_rows`: the failed rows of a model folder that cannot run (a model.yaml that
  does not load, no model.py), for every run the plan would have given it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas is imported where it is used: a guard that starts a job needs none of it
    import pandas as pd

CRASHED = "job crashed"
TAIL_LINES = 20  # of the job's log, in the reason
MAX_REASON = 2000
RETRYABLE_SIGNALS = (signal.SIGKILL, signal.SIGTERM)  # sent from outside: memory, preemption, time


def guard(command: list[str], parsed=None, *, retries: int | None = None) -> int:
    """Run ``cellarena <command>``; if it fails, write the failed placeholder of its output.

    ``parsed``: the command's arguments as ``cellarena``'s parser reads them (None when they do not
    parse: the child then says why, and nothing is written). ``retries``: how many times the
    workflow retries a failed job (default ``$CELLARENA_RETRIES``, which the workflow sets, else 0); a
    job killed from outside fails that many times before its placeholder is written. Returns the
    exit status for the job: 0 once a placeholder is written.
    """
    if retries is None:
        retries = int(os.environ.get("CELLARENA_RETRIES") or 0)
    from cellarena.timing import T0_ENV, process_start  # noqa: PLC0415

    proc = subprocess.Popen([sys.executable, "-m", "cellarena", *command],
                            env=dict(os.environ, **{T0_ENV: repr(process_start())}))
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    writer = WRITERS.get(getattr(parsed, "command", None))
    counter = _crash_counter(parsed) if writer else None
    if rc == 0:
        if counter is not None:
            counter.unlink(missing_ok=True)
        return 0
    status = rc if rc > 0 else 128 - rc
    if received:  # interrupted: not a crash, and not a result
        return 128 + received[0]
    if writer is None:
        return status
    crashes = int(counter.read_text() or 0) + 1 if counter.exists() else 1
    if _retryable(rc) and crashes <= retries:
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(crashes))
        print(f"cellarena guard: `cellarena {parsed.command}` ended with exit code {rc}; Snakemake retries it "
              f"({crashes} of {retries} retries)", file=sys.stderr, flush=True)
        return status
    log_path, tail = _log_tail()
    reason = crash_reason(parsed.command, rc, log_path, tail, attempts=crashes)
    try:
        writer(parsed, reason)
    except Exception as exc:  # noqa: BLE001  the job then fails as it would without the guard
        print(f"cellarena guard: `cellarena {parsed.command}` ended with exit code {rc}, and no failed "
              f"placeholder could be written: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return status
    counter.unlink(missing_ok=True)
    print(f"cellarena guard: wrote a failed placeholder for the crashed job: {reason}", file=sys.stderr, flush=True)
    return 0


def crash_reason(command: str, rc: int, log_path: str | None, tail: list[str], attempts: int = 1) -> str:
    """The status_reason of a crashed job: what ended it, its exit code and the last lines of its log."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        how = f"was killed by {name} (exit code {rc}"
        how += ": out of memory, or stopped from outside)" if -rc in RETRYABLE_SIGNALS else ")"
    else:
        how = f"exited with code {rc}"
        if rc == 1:
            how += " (an uncaught error in the suite or its environment: please report it)"
    text = f"{CRASHED}: `cellarena {command}` {how}"
    if attempts > 1:
        text += f", {attempts} times"
    if log_path is None:
        return text + "; its log could not be read"
    head = f"{text}; the last lines of its log {log_path}:"
    lines = [line[:300] for line in tail]
    while lines and len(head) + sum(len(line) + 3 for line in lines) > MAX_REASON:
        lines.pop(0)  # keep the last lines: the error is at the end
    return head + "".join(f"\n | {line}" for line in lines) if lines else head + " (empty)"


def _retryable(rc: int) -> bool:
    """A process killed from outside (a retry may get more memory or a healthy node)."""
    return -rc in RETRYABLE_SIGNALS or rc - 128 in RETRYABLE_SIGNALS


def _crash_counter(parsed) -> Path | None:
    """Where a job's crashes are counted between Snakemake's attempts: next to its output."""
    out = getattr(parsed, "out", None)
    out = out[0] if isinstance(out, list) else out  # a command of several models: its first output
    if out and SEED in out:  # ... of its first seed
        out = out.replace(SEED, str(seeds_of(parsed)[0]))
    return Path(out).with_name(f".{Path(out).name}.crashes") if out else None


def _log_tail() -> tuple[str | None, list[str]]:
    """The job's log (the file this process's stdout goes to) and its last lines."""
    try:
        if not stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode):
            return None, []
        path = os.readlink(f"/proc/self/fd/{sys.stdout.fileno()}")
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 65536))
            text = fh.read().decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return None, []
    cwd = os.getcwd() + os.sep
    return path.removeprefix(cwd), [line.rstrip() for line in text.splitlines() if line.strip()][-TAIL_LINES:]


# --------------------------------------------------------------------------------------------------
# the failed placeholder of each command's output


SEED = "{seed}"  # where a path given for several seeds (--seed 0 --seed 1) holds each one's seed


def seeds_of(args) -> list[int]:
    """The seeds of a command: ``--seed`` once, or repeated to run several seeds in one process."""
    seeds = args.seed if isinstance(args.seed, list) else [args.seed]
    return [int(s) for s in seeds]


def at_seed(value: str | None, seed: int, several: bool, flag: str, *, own: bool) -> str | None:
    """``value`` for ``seed``: its ``{seed}`` filled in. ``own``: each seed needs its own file (a split,
    an output), so with several seeds a value without ``{seed}`` is an error."""
    from cellarena.errors import CellarenaError  # noqa: PLC0415

    if value is None or SEED not in value:
        if several and own and value is not None:
            raise CellarenaError(f"{flag} {value!r} has no {SEED} though several --seed are given: every seed would "
                                 f"use the same file", where="the command line",
                                 fix=f"write the seed's place in the path as {SEED}, e.g. split_seed{SEED}.json")
        return value
    return value.replace(SEED, str(seed))


def score_paths(args) -> dict[int, tuple[str, str, list[str]]]:
    """A ``score`` command's files seed by seed: ``{seed: (split, out, embeddings)}`` with ``{seed}``
    filled in (with several seeds each path must hold it: :func:`at_seed`)."""
    seeds = seeds_of(args)
    several = len(seeds) > 1
    return {seed: (at_seed(args.split, seed, several, "--split", own=True),
                   at_seed(args.out, seed, several, "--out", own=True),
                   [at_seed(p, seed, several, "embedding", own=True) for p in args.embeddings])
            for seed in seeds}


def per_model(args) -> list[argparse.Namespace]:
    """A command that runs several models (``--model A --out A.parquet --model B --out B.parquet``) as
    one namespace per model, each with its own ``model``, ``out``, ``checkpoint``, ``tuning`` and
    ``params``. ``--checkpoint``/``--tuning``/``--params`` are ``MODEL_ID=VALUE`` (or, with one
    model, the bare value).

    With several seeds (``--seed 0 --seed 1``), one namespace per (seed, model), seed by seed, each
    with one ``seed``: ``--split``, ``--out`` and, where they differ by seed, ``--checkpoint`` and
    ``--tuning`` hold ``{seed}`` (``--split s_seed{seed}.json``), which is filled in for each."""
    from cellarena.errors import CellarenaError  # noqa: PLC0415

    models, outs = list(args.model), list(args.out)
    if len(models) != len(outs):
        raise CellarenaError(f"{len(models)} --model and {len(outs)} --out given", where="the command line",
                             fix="give one --out per --model, in the same order")
    ids = [Path(m).name for m in models]
    if len(set(ids)) != len(ids):
        raise CellarenaError(f"a model is given twice: {ids}", where="the command line", fix="give each once")
    seeds = seeds_of(args)
    if len(set(seeds)) != len(seeds):
        raise CellarenaError(f"a seed is given twice: {seeds}", where="the command line", fix="give each once")
    several = len(seeds) > 1

    def by_model(values, flag) -> dict[str, str]:
        found = {}
        for value in values or []:
            key, sep, path = value.partition("=")
            if sep and key in ids:
                found[key] = path
            elif len(ids) == 1:
                found[ids[0]] = value
            else:
                raise CellarenaError(f"{flag} {value!r} names none of the models {ids}", where="the command line",
                                     fix=f"with several models, write {flag} MODEL_ID=VALUE")
        return found

    checkpoints = by_model(args.checkpoint, "--checkpoint")
    tunings = by_model(getattr(args, "tuning", None), "--tuning")
    params = by_model(getattr(args, "params", None), "--params")
    out = []
    for seed in seeds:
        split = at_seed(args.split, seed, several, "--split", own=True)
        for m, o, i in zip(models, outs, ids):
            extra = {"tuning": at_seed(tunings.get(i), seed, several, "--tuning", own=False)} \
                if hasattr(args, "tuning") else {}
            out.append(argparse.Namespace(**{
                **vars(args), "seed": seed, "split": split, "model": m,
                "out": at_seed(o, seed, several, "--out", own=True),
                "checkpoint": at_seed(checkpoints.get(i), seed, several, "--checkpoint", own=False),
                "params": params.get(i), **extra}))
    return out


def _provenance(prepared: str | Path) -> dict:
    """A prepared file's provenance, read without loading its cells (the crash may have been memory)."""
    from cellarena.data.prepare import read_provenance  # noqa: PLC0415

    return read_provenance(prepared)


def _fetch(a, reason: str) -> None:
    from cellarena.cards.dataset import load_card  # noqa: PLC0415
    from cellarena.data.fetch import failed_manifest, write_manifest  # noqa: PLC0415

    write_manifest(failed_manifest(load_card(a.card), reason), a.out)


def _prepare(a, reason: str) -> None:
    from cellarena.cards.dataset import load_card  # noqa: PLC0415
    from cellarena.data.prepare import failed_placeholder, write_h5ad  # noqa: PLC0415

    card = load_card(a.card)
    write_h5ad(failed_placeholder(card.id, card.version, card.label_quality, reason), a.out)


def _split(a, reason: str) -> None:
    from cellarena.data.perturbation import split_spec  # noqa: PLC0415
    from cellarena.data.splits import failed_split, write_split  # noqa: PLC0415

    info = _provenance(a.prepared)
    seeds = seeds_of(a)
    for seed in seeds:  # the seeds whose split the crashed job had not yet written
        out = at_seed(a.out, seed, len(seeds) > 1, "--out", own=True)
        if not Path(out).exists():
            write_split(failed_split(dataset_id=info["dataset_id"], dataset_version=info["dataset_version"],
                                     name=a.name, spec=split_spec(json.loads(a.spec)), seed=seed, reason=reason), out)


def _run_of(a, task: str):
    """The columns of the run the command would have made (cellarena/run/setup.py's ``start``,
    without loading the cells) and the model card."""
    from cellarena.cards.model import load_model_card  # noqa: PLC0415
    from cellarena.data.splits import read_split  # noqa: PLC0415
    from cellarena.run.setup import REPO, Run  # noqa: PLC0415
    from cellarena.run.tuning_record import read_record, summary_of  # noqa: PLC0415

    card = load_model_card(a.model)
    params = {**card.params, **json.loads(getattr(a, "params", None) or "{}")}
    variant, summary = getattr(a, "variant", "default"), None
    tuning = getattr(a, "tuning", None)
    if tuning:
        record = read_record(tuning)
        params.update(record.get("best_params") or {})
        variant, summary = "tuned", summary_of(record)
    run = Run.new(task, card, _provenance(a.prepared), read_split(a.split), variant, params, seed=a.seed,
                  datasets_dir=Path(a.datasets_dir) if a.datasets_dir else REPO / "datasets",
                  checkpoint=Path(a.checkpoint) if a.checkpoint else None, tuning=summary)
    return run, card


def _unfinished(write):
    """The writer of a command that runs several models (``--model A --out A ...``): it writes the
    placeholder of each model whose output the crashed job had not yet written."""

    def each(a, reason: str) -> None:
        for one in per_model(a):
            if not Path(one.out).exists():
                write(one, reason)

    return each


@_unfinished
def _run(a, reason: str) -> None:
    from cellarena import results  # noqa: PLC0415
    from cellarena.tasks import get  # noqa: PLC0415

    run, _card = _run_of(a, a.task)
    specs = get(a.task).metric_specs(json.loads(a.options) if a.options else {})
    results.write(run.status_rows(specs, "failed", reason), a.out)


@_unfinished
def _embed(a, reason: str) -> None:
    from cellarena.run.embedding_file import EmbeddingRun, write_embedding  # noqa: PLC0415

    run, card = _run_of(a, "")
    run.finish("failed", reason)
    write_embedding(EmbeddingRun(columns=run.columns, tasks=list(card.tasks), kind=card.kind,
                                 has_corpus=card.pretraining is not None), a.out)


@_unfinished
def _tune(a, reason: str) -> None:
    from cellarena.cards.model import load_model_card  # noqa: PLC0415
    from cellarena.data.splits import read_split  # noqa: PLC0415
    from cellarena.run.tuning_record import write_record  # noqa: PLC0415

    card, info, split = load_model_card(a.model), _provenance(a.prepared), read_split(a.split)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_record({"status": "failed", "reason": reason, "task": a.task, "dataset_id": info["dataset_id"],
                  "dataset_version": int(info["dataset_version"]), "split_id": split["split_id"],
                  "split_hash": split.get("hash", ""), "seed": int(a.seed), "model_id": card.id,
                  "model_version": card.version}, out)


def _score(a, reason: str) -> None:
    import pandas as pd  # noqa: PLC0415

    from cellarena import results  # noqa: PLC0415
    from cellarena.run.embedding_file import read_embedding  # noqa: PLC0415
    from cellarena.run.setup import Run  # noqa: PLC0415
    from cellarena.tasks import get  # noqa: PLC0415

    specs = get(a.task).metric_specs(json.loads(a.options) if a.options else {})
    for _split, out, embeddings in score_paths(a).values():
        if Path(out).exists():  # written before the crash
            continue
        frames = []
        for path in embeddings:
            emb = read_embedding(path)
            run = Run(dict(emb.columns, task=a.task), json.loads(emb.columns["params_json"]))
            # a model that failed upstream keeps its own reason
            status = ("failed", reason) if emb.status == "ok" else (emb.status, emb.columns["status_reason"])
            frames.append(run.status_rows(specs, *status, stamp=False))
        results.write(pd.concat(frames, ignore_index=True), out)


def _pretrain(a, reason: str) -> None:
    from cellarena.run.pretrain import write_failed_checkpoint  # noqa: PLC0415

    write_failed_checkpoint(a.out, reason)


# command -> the writer of its failed placeholder; the other commands (aggregate, leaderboard, ...)
# end the workflow or are not jobs, and fail as they are
WRITERS = {"fetch": _fetch, "prepare": _prepare, "split": _split, "run": _run, "embed": _embed, "tune": _tune,
           "score": _score, "pretrain": _pretrain}


# --------------------------------------------------------------------------------------------------
# model folders that cannot run


def model_folder_rows(model_dir: str | Path, reason: str, planned: list[tuple[str, str | Path, dict]], *,
                      datasets_dir: str | Path) -> pd.DataFrame:
    """``failed`` rows with ``reason`` for every run of a model folder that cannot run.

    ``planned``: (task, split file, task options) of each run the plan would have given it. The
    model's version and kind come from its model.yaml where it says them ('unknown' and 'baseline'
    otherwise: the card is what is broken).
    """
    import yaml  # noqa: PLC0415

    import pandas as pd  # noqa: PLC0415

    from cellarena import SUITE_VERSION, results  # noqa: PLC0415
    from cellarena.cards.dataset import card_path, load_card  # noqa: PLC0415
    from cellarena.data.splits import read_split  # noqa: PLC0415
    from cellarena.run.setup import Run, git_commit  # noqa: PLC0415
    from cellarena.tasks import get  # noqa: PLC0415

    model_dir = Path(model_dir)
    try:
        raw = yaml.safe_load((model_dir / "model.yaml").read_text())
    except (OSError, yaml.YAMLError):
        raw = None
    raw = raw if isinstance(raw, dict) else {}
    kind = raw.get("kind") if raw.get("kind") in results.MODEL_KINDS else "baseline"
    commit = git_commit()
    frames = []
    for task, split_path, options in planned:
        split = read_split(split_path)
        dataset = load_card(card_path(datasets_dir, split["dataset_id"]))
        run = {"task": task, "dataset_id": dataset.id, "dataset_version": dataset.version,
               "label_quality": dataset.label_quality, "split_id": split["split_id"],
               "split_hash": split.get("hash", ""), "seed": int(split["seed"]), "model_id": model_dir.name,
               "model_version": str(raw.get("version", "unknown")), "model_kind": kind, "variant": "default",
               "leakage": "unknown", "leaked_fraction": float("nan"), "params_json": "{}", "runtime_json": "{}",
               "n_train": int(split.get("n_train", 0)), "n_test": int(split.get("n_test", 0)),
               "suite_version": SUITE_VERSION, "git_commit": commit, "wall_s": float("nan"), "device": "cpu"}
        frames.append(Run(run, {}).status_rows(get(task).metric_specs(options), "failed", reason))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(results.COLUMNS))
