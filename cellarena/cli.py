"""Command-line interface. Snakemake rules call these subcommands; users can too.

    cellarena fetch      --card datasets/<id>.yaml --out manifest.json
    cellarena prepare    --card datasets/<id>.yaml --manifest manifest.json --out prepared.h5ad
    cellarena split      --prepared prepared.h5ad --name stratified --spec '{"scheme": ...}' --seed 0 --out split.json
    cellarena run        --task <task> --prepared ... --split ... --model models/<id> --seed 0 --out run.parquet
                         [--datasets-dir datasets] [--checkpoints-dir DIR]   (also on embed and tune)
                         several seeds in one process (also split, embed, tune): --seed 0 --seed 1
                         --split split_seed{seed}.json --out seed{seed}/run.parquet
    cellarena embed      --prepared ... --split ... --model models/<id> --seed 0 [--batch-role condition] --out emb.npz
    cellarena tune       --task annotation|integration --prepared ... --split ... --model models/<id> --seed 0
                         --budget '{"n_trials": 8}' [--storage URL] --out best.json
    cellarena score      --task integration --prepared ... --split ... --seed 0 --out scores.parquet EMB.npz ...
    cellarena pretrain   --model models/<id> --corpus datasets/corpora/<id>.yaml --corpus-data ID=prepared.h5ad
                         --evaluation ID=prepared.h5ad ... --seed 0 --out results/pretrain/<id>/seed0/model
    cellarena aggregate  --out results/scores.parquet RUN.parquet ...
    cellarena leaderboard --scores results/scores.parquet --out-dir results/leaderboard
    cellarena summary    results/scores.parquet
    cellarena claims     --scores results/scores.parquet [--claims-dir claims] [--out-dir results/claims]
    cellarena verdicts   results/scores.parquet [--task annotation] [--metric macro_f1] [--csv verdicts.csv]
    cellarena check-card datasets/<id>.yaml ...
    cellarena census-datasets --corpus datasets/corpora/<id>.yaml [--uri LOCAL_CENSUS]
    cellarena validate   models/<id> ... | --all
    cellarena submit     --model models/<id> RUN.parquet ...
    cellarena regress    --scores results/scores.parquet [--reference results/reference]
    cellarena reference  --scores results/scores.parquet
    cellarena leakage    --corpus CORPUS.h5ad ... --evaluation prepared.h5ad [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cellarena.errors import CellarenaError
from cellarena.tasks import EMBEDDING_TASKS, TASK_IDS, TUNED_TASKS

log = logging.getLogger("cellarena")


def _cmd_fetch(args) -> int:
    from cellarena.cards.dataset import load_card
    from cellarena.data.fetch import failed_manifest, fetch_card, manifest, write_manifest

    card = load_card(args.card)
    derived = {k: Path(v) for k, v in _pairs(args.derived, "--derived").items()}
    try:
        paths = fetch_card(card, args.cache, card_dir=Path(args.card).parent, progress=args.progress, derived=derived)
    except Exception as exc:  # the dataset's runs become failed rows downstream, not a stopped DAG
        reason = str(exc) if isinstance(exc, CellarenaError) else f"{type(exc).__name__}: {exc}"
        print(f"error: fetching {card.id} failed:\n{reason}", file=sys.stderr)
        written = failed_manifest(card, reason)
    else:
        written = manifest(card, paths)
        print(f"fetched {card.id} v{card.version}: {len(paths)} file(s) verified")
    write_manifest(written, args.out)
    return 0


def _cmd_prepare(args) -> int:
    from cellarena.cards.dataset import load_card
    from cellarena.data.prepare import failed_placeholder, prepare_to_file, write_h5ad

    card = load_card(args.card)
    manifest = json.loads(Path(args.manifest).read_text())
    if manifest.get("dataset_version") != card.version:
        raise CellarenaError("manifest was made for another card version", where=args.manifest,
                             fix="re-run `cellarena fetch` for this card")
    if manifest.get("status", "ok") != "ok":  # the fetch failed: so does the dataset, with its reason
        write_h5ad(failed_placeholder(card.id, card.version, card.label_quality, manifest["reason"]), args.out)
        print(f"{card.id}: {manifest['reason']}", file=sys.stderr)
        return 0
    paths = {k: Path(v["path"]) for k, v in manifest["sources"].items()}
    try:  # an h5ad source of any size is prepared block by block (prepare_to_file)
        adata = prepare_to_file(card, paths, args.out, card_path=args.card)
    except Exception as exc:  # a broken dataset becomes failed rows downstream, not a crashed DAG
        reason = str(exc) if isinstance(exc, CellarenaError) else f"{type(exc).__name__}: {exc}"
        print(f"error: preparing {card.id} failed:\n{reason}", file=sys.stderr)
        write_h5ad(failed_placeholder(card.id, card.version, card.label_quality, reason), args.out)
        return 0
    labels = ""
    if "cell_type" in adata.obs:
        labels = f", {adata.obs['cell_type'].nunique()} {card.label_quality} cell types"
    print(f"prepared {card.id} v{card.version}: {adata.n_obs} cells x {adata.n_vars} genes{labels}")
    return 0


def _cmd_split(args) -> int:
    from cellarena.data.perturbation import PerturbationSplitSpec, make_perturbation_split, split_spec
    from cellarena.data.prepare import provenance, read_meta
    from cellarena.data.splits import failed_split, make_split, write_split
    from cellarena.placeholder import at_seed, seeds_of

    spec = split_spec(json.loads(args.spec))
    perturbation = isinstance(spec, PerturbationSplitSpec)
    seeds = seeds_of(args)
    outs = {seed: at_seed(args.out, seed, len(seeds) > 1, "--out", own=True) for seed in seeds}
    adata = read_meta(args.prepared)  # the cells' obs only: a split never reads the counts
    info = provenance(adata)
    for seed in seeds:  # one split file per seed, the data read once
        common = dict(dataset_id=info["dataset_id"], dataset_version=info["dataset_version"], name=args.name,
                      spec=spec, seed=seed)
        if info.get("status") != "ok":
            split = failed_split(**common, reason=f"dataset preparation failed: {info.get('reason')}")
        else:
            try:
                split = (make_perturbation_split if perturbation else make_split)(adata.obs, **common)
            except CellarenaError as exc:
                split = failed_split(**common, reason=str(exc))
        write_split(split, outs[seed])
        folds = f", {len(split['folds'])} fold(s)" if split.get("folds") else ""
        print(f"split {split['split_id']} of {info['dataset_id']}: {split['n_train']} train / "
              f"{split['n_test']} test{folds}, hash {split['hash'] or '-'}", flush=True)
    return 0


def _job(args, **options):
    """The job of one model of a command (``args``: one of :func:`per_model`'s namespaces;
    ``options``: task options from flags)."""
    from cellarena.run.setup import Job

    options = {**(json.loads(args.options) if getattr(args, "options", None) else {}),
               **{k: v for k, v in options.items() if v}}
    extra = {"variant": args.variant, "tuning": _tuning_record(args)} if hasattr(args, "variant") else {}
    extra["params"] = json.loads(args.params) if args.params else None
    if args.time_limit:
        extra["time_limit_s"] = args.time_limit
    return Job.of(args.prepared, args.split, args.model, seed=args.seed, threads=_threads(args), options=options,
                  checkpoint=args.checkpoint, datasets_dir=args.datasets_dir, checkpoints_dir=args.checkpoints_dir,
                  device=args.device, **extra)


def _threads(args) -> int:
    """A model's threads: the job's, or fewer where its card asks for fewer (a job of several models
    has the most any of them asks for)."""
    from cellarena.cards.model import load_model_card

    try:
        return max(1, min(int(args.threads), load_model_card(args.model).resources.threads))
    except CellarenaError:  # the run reports the card's problem
        return int(args.threads)


def _batch(args, **options):
    """(namespace, job) of every model of the command, and the batch they run in
    (cellarena/run/setup.py: one read of the data, one sandbox host)."""
    from cellarena.placeholder import per_model
    from cellarena.run.setup import batch

    runs = [(one, _job(one, **options)) for one in per_model(args)]
    return runs, batch([job for _one, job in runs])


def _cmd_run(args) -> int:
    from cellarena import results
    from cellarena.run import run_job

    runs, together = _batch(args)
    with together:
        for one, job in runs:
            rows = run_job(args.task, job)
            results.write(rows, one.out)
            first = rows.iloc[0]
            extra = f" ({first.status_reason[:200]})" if first.status != "ok" else ""
            print(f"{first.model_id} on {first.dataset_id}/{first.split_id}: {first.status}{extra}", flush=True)
    return 0


def _cmd_embed(args) -> int:
    from cellarena.run.embedding import embed_cells
    from cellarena.run.embedding_file import write_embedding

    runs, together = _batch(args, batch_role=args.batch_role)
    with together:
        for one, job in runs:
            run = embed_cells(job)
            write_embedding(run, one.out)
            c = run.columns
            extra = f" ({c['status_reason'][:200]})" if run.status != "ok" else f" {run.embedding.shape}"
            print(f"{c['model_id']} embedded {c['dataset_id']}/{c['split_id']}: {run.status}{extra}", flush=True)
    return 0


def _tuning_record(args) -> dict | None:
    from cellarena.run.tuning_record import read_record

    return read_record(args.tuning) if args.tuning else None


def _cmd_tune(args) -> int:
    from cellarena.run.tuning import TuningBudget, tune

    budget = TuningBudget.model_validate(json.loads(args.budget))
    runs, together = _batch(args, batch_role=args.batch_role)
    with together:
        for one, job in runs:
            record = tune(args.task, job, budget=budget, out=one.out, storage=args.storage,
                          heartbeat_s=args.heartbeat)
            _print_tuning(record)
    return 0


def _print_tuning(record: dict) -> None:
    if record["status"] != "ok":
        print(f"{record['model_id']} on {record['dataset_id']}/{record['split_id']}: tuning {record['status']} "
              f"({record['reason'][:200]})", flush=True)
        return
    gain = ""
    if record.get("default_value") is not None:
        gain = f", defaults {record['default_value']:.4f}"
    print(f"tuned {record['model_id']} on {record['dataset_id']}/{record['split_id']}: {record['n_trials']} trials, "
          f"best {record['metric']} {record['best_value']:.4f} (trial {record['best_trial']}){gain}; "
          f"best params {json.dumps(record['best_params'], sort_keys=True)}", flush=True)


def _cmd_score(args) -> int:
    from threadpoolctl import threadpool_limits

    from cellarena import results
    from cellarena.placeholder import score_paths
    from cellarena.run.embedding import score_embeddings
    from cellarena.run.embedding_file import read_embedding

    options = json.loads(args.options) if args.options else None
    paths = score_paths(args)  # every path checked before any work
    several = len(paths) > 1
    for seed, (split, out, embeddings) in paths.items():
        runs = [read_embedding(p) for p in embeddings]
        with threadpool_limits(args.threads):  # reads the split's scored cells only
            rows = score_embeddings(args.task, args.prepared, split, runs, seed=seed, options=options)
        results.write(rows, out)
        for (model, status), _ in rows.groupby(["model_id", "status"], sort=True):
            print(f"{args.task}: {model}{'' if not several else f' (seed {seed})'}: {status}", flush=True)
    return 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise CellarenaError(f"{flag} expects ID=PATH, got {item!r}", fix=f"e.g. {flag} pbmc3k=prepared.h5ad")
        out[key] = value
    return out


def _cmd_pretrain(args) -> int:
    from cellarena.run.pretrain import pretrain_model, write_failed_checkpoint
    from cellarena.run.setup import git_commit

    try:
        import torch

        torch.set_num_threads(args.threads)
        card = pretrain_model(args.model, args.corpus, _pairs(args.corpus_data, "--corpus-data"),
                              _pairs(args.evaluation, "--evaluation"), args.out, seed=args.seed,
                              git_commit=git_commit(), device=args.device)
    except Exception as exc:  # the model's runs become failed rows; the rest of the DAG goes on
        reason = str(exc) if isinstance(exc, CellarenaError) else f"{type(exc).__name__}: {exc}"
        log.exception("pretraining failed")
        print(f"error: pretraining {args.model} failed:\n{reason}", file=sys.stderr)
        write_failed_checkpoint(args.out, reason)
        return 0
    ex = card["extra"]
    print(f"pretrained {ex['model_id']} on {ex['exclusion']['n_kept']} cells of {card['corpus_id']} "
          f"({ex['exclusion']['n_excluded']} evaluation cells excluded): {card['steps']} steps, "
          f"{ex['seconds']:.0f} s, final loss {card['final_loss']:.4f}, attention {ex['attention_backend']}")
    return 0


def _cmd_aggregate(args) -> int:
    from cellarena import results

    df = results.aggregate(args.inputs, args.out, logs=args.log or None)
    unread = df.attrs["unread"]
    print(f"wrote {args.out}: {len(df)} rows from {len(args.inputs) - len(unread)} of {len(args.inputs)} runs")
    for line in unread:
        print(f"left out: {line}", file=sys.stderr)
    return 0


def _cmd_guard(args) -> int:
    from cellarena.placeholder import guard

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise CellarenaError("no command to run", fix="e.g. `cellarena guard -- run --task annotation ...`")
    try:
        parsed = build_parser().parse_args(command)
    except SystemExit:  # the command does not parse: run it anyway, and let it say why
        parsed = None
    return guard(command, parsed, retries=args.retries)


def _cmd_model_failed(args) -> int:
    from cellarena import results
    from cellarena.placeholder import model_folder_rows

    options = json.loads(args.options) if args.options else {}
    planned = []
    for item in args.split:
        key, _, path = item.partition("=")
        task, sep, _dataset = key.partition(":")
        if not sep or not path:
            raise CellarenaError(f"--split expects TASK:DATASET=PATH, got {item!r}")
        planned.append((task, path, options.get(key, {})))
    rows = model_folder_rows(args.model, args.reason, planned, datasets_dir=args.datasets_dir)
    results.write(rows, args.out)
    print(f"{Path(args.model).name}: {len(planned)} runs failed: {args.reason}")
    return 0


def _cmd_leaderboard(args) -> int:
    from cellarena.cards.claim import load_claims
    from cellarena.leaderboard.data import load_scores
    from cellarena.leaderboard.export import export_static

    claims = load_claims(args.claims_dir) if args.claims_dir else None
    written = export_static(load_scores(args.scores), args.out_dir, claims=claims)
    print(f"wrote static leaderboard: {', '.join(str(p) for p in written)}")
    return 0


def _cmd_claims(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from cellarena import results
    from cellarena.analysis import claims as claim_verdicts
    from cellarena.cards.claim import load_claims

    cards = load_claims(args.claims_dir)
    summary, checks = claim_verdicts.evaluate(results.read(args.scores), cards)
    console = Console()
    if not cards:  # a plan without claims still ends: empty tables, and the reason
        console.print(f"no claim cards in {args.claims_dir} (claims/<id>.yaml: claims/README.md)")
    table = Table(title=f"published claims re-run on {args.scores}")
    for col in ("claim", "test", "verdict", "paper", "re-run", "why"):
        table.add_column(col)
    for r in summary.itertuples():
        table.add_row(r.claim_id, r.test, r.verdict, r.original_numbers, r.rerun_numbers, r.reason[:200])
    console.print(table)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary.to_csv(out / "verdicts.csv", index=False, lineterminator="\n")
        checks.to_csv(out / "checks.csv", index=False, lineterminator="\n")
        console.print(f"claims: [bold]{out / 'verdicts.csv'}[/bold], every comparison: {out / 'checks.csv'}")
    return 0


def _cmd_verdicts(args) -> int:
    from rich.console import Console
    from rich.table import Table

    import pandas as pd

    from cellarena import results
    from cellarena.analysis import intervals

    df = results.read(args.scores)
    present = [t for t in TASK_IDS if t in set(df["task"])]
    if args.task and args.task not in present:
        raise CellarenaError(f"no results of task {args.task!r}", where=args.scores,
                             fix=f"choose one of {present}")
    if args.metric and args.metric not in set(df["metric_id"]):
        raise CellarenaError(f"no rows of metric {args.metric!r}", where=args.scores,
                             fix="choose a metric_id of the table, e.g. one shown by `cellarena summary`")
    frames = []
    console = Console()
    for task in [args.task] if args.task else present:
        cmp = intervals.compare(df, task, metric_id=args.metric)
        if cmp.empty:
            continue
        frames.append(cmp)
        table = Table(title=f"{task} · {cmp['metric_id'].iloc[0]} · entry − reference, 95% interval")
        for col in ("dataset · scheme", "entry", "reference", "value", "ref.", "Δ [95% interval]", "seeds",
                    "verdict"):
            table.add_column(col)
        for r in cmp.itertuples():
            entry = r.model_id if r.variant == "default" else f"{r.model_id} ({r.variant})"
            # "best tuned baseline" / "best baseline (none tuned)" / "own default"
            against = r.against_model if r.against_variant == "default" else f"{r.against_model} ({r.against_variant})"
            note = {"own default": "own default", "best tuned baseline": "best tuned"}.get(r.against, "best, none tuned")
            table.add_row(f"{r.dataset_id} · {r.scheme}", entry, f"{against}: {note}", f"{r.value:.3f}",
                          f"{r.against_value:.3f}", f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]",
                          str(r.n_seeds), r.verdict)
        console.print(table)
    if args.csv and frames:
        pd.concat(frames, ignore_index=True).to_csv(args.csv, index=False, lineterminator="\n")
        console.print(f"verdicts: [bold]{args.csv}[/bold]")
    return 0


def _cmd_summary(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from cellarena import results
    from cellarena.tasks import TASKS

    df = results.read(args.scores)
    overall = df[df["subgroup"] == ""]
    console = Console()
    for (task, dataset), grp in overall.groupby(["task", "dataset_id"], sort=True):
        preferred = TASKS[task].headline_metrics if task in TASKS else ()
        metric_ids = [m for m in preferred if m in set(grp["metric_id"])] or sorted(set(grp["metric_id"]))[:2]
        quality = grp["label_quality"].iloc[0]
        table = Table(title=f"{task} · {dataset} ({quality} labels) · mean over splits")
        for col in ("model", "kind", "variant", "status", *metric_ids):
            table.add_column(col)
        keys = ["model_id", "model_kind", "variant"]
        wide = grp.pivot_table(index=keys, columns="metric_id", values="value", aggfunc="mean")
        status = grp.groupby(keys)["status"].agg(lambda s: ", ".join(sorted(set(s))))
        wide = wide.reindex(index=status.index, columns=metric_ids)  # a dataset whose runs all failed has no values
        for key in wide.sort_values(metric_ids[0], ascending=False, na_position="last").index:
            vals = [f"{wide.loc[key, m]:.3f}" if wide.loc[key, m] == wide.loc[key, m] else "—"
                    for m in metric_ids]
            table.add_row(key[0], key[1], key[2], status[key], *vals)
        console.print(table)
    runs = df.drop_duplicates(["task", "dataset_id", "split_id", "model_id", "variant"])
    console.print(f"runs: {runs['status'].value_counts().to_dict()}")
    _print_failures(console, runs[runs["status"] == "failed"], results.unread_files(args.scores))
    console.print(f"results table: [bold]{Path(args.scores).resolve()}[/bold]")
    console.print("static leaderboard: results/leaderboard/index.html")
    console.print("interactive leaderboard: [bold]make leaderboard[/bold] then open http://127.0.0.1:8501")
    return 0


def _print_failures(console, failed, unread: list[str]) -> None:
    """The failed runs grouped by reason (a crashed job's reason whole: its exit code and log lines),
    and the result files the aggregate could not read."""
    from rich.markup import escape

    from cellarena.placeholder import CRASHED

    if len(failed):
        console.print(f"[bold red]failed runs: {len(failed)}[/bold red], by reason:")
    for reason, grp in failed.groupby("status_reason", sort=True):
        names = [f"{r.task}/{r.dataset_id}/{r.split_id}/{r.model_id}"
                 + ("" if r.variant == "default" else f" ({r.variant})") for r in grp.itertuples()]
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        lines = reason.splitlines() if CRASHED in reason else [line[:300] for line in reason.splitlines()[:6]]
        text = "\n  ".join(lines)
        console.print(f"- {len(names)} run(s): {', '.join(names[:4])}{more}:\n  {text}", markup=False, highlight=False)
    for line in unread:
        console.print(f"[bold red]left out of the table[/bold red]: {escape(line)}")


def _cmd_check_card(args) -> int:
    from cellarena.cards.dataset import load_card

    for path in args.cards:
        card = load_card(path)
        print(f"ok: {path} ({card.id} v{card.version}, {card.label_quality} labels)")
    return 0


def _cmd_census_datasets(args) -> int:
    """Resolve a corpus card's Census release and value filter to CELLxGENE dataset ids."""
    from cellarena.cards.corpus import load_corpus
    from cellarena.data.census import corpus_dataset_ids

    corpus = load_corpus(args.corpus)
    if corpus.census is None:
        raise CellarenaError("the corpus names no Census release", where=args.corpus,
                             fix="only corpora with a census section (confidence: census_release) resolve")
    ids = corpus_dataset_ids(corpus.census, args.uri, where=args.corpus)
    print(f"# {len(ids)} dataset ids of Census {corpus.census.release} where {corpus.census.value_filter}")
    print("dataset_ids:")
    for dataset_id in ids:
        print(f"  - {dataset_id}")
    return 0


def _cmd_leakage(args) -> int:
    """Cell-level check of a corpus a user provides as files against an evaluation dataset."""
    import anndata as ad

    from cellarena.data.leakage import overlap

    evaluation = ad.read_h5ad(args.evaluation)
    report = {}
    for path in args.corpus:
        corpus = ad.read_h5ad(path)
        ov = overlap(corpus, evaluation, near=True, threshold=args.threshold)
        report[str(path)] = ov.summary()
        print(f"{path}: {ov.n_found} of {ov.n_cells} evaluation cells found exactly ({ov.fraction:.2%}), "
              f"{ov.n_near} more as near-duplicates ({ov.near_fraction:.2%}); {ov.n_undetermined} too "
              f"sparse to tell; {ov.shared_genes} shared genes")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_validate(args) -> int:
    from cellarena.cards.model import discover
    from cellarena.review.validate import tiny_data, validate_model

    folders = [Path(f) for f in args.folders]
    if args.all:
        folders += list(discover(args.models_dir).values())
    if not folders:
        raise CellarenaError("no model folder given", fix="e.g. `cellarena validate models/my_model`, or --all")
    import functools
    import tempfile

    failed = 0
    with tempfile.TemporaryDirectory(prefix="cellarena-validate-") as work:
        datasets = {"datasets_dir": args.datasets_dir} if args.datasets_dir else {}
        # the tiny dataset, made once and only when a folder gets as far as running its tasks
        data = functools.cache(lambda: tiny_data(work, seed=args.seed, **datasets))
        for folder in folders:
            report = validate_model(folder, data=data, datasets_dir=args.datasets_dir, seed=args.seed,
                                    verbose=args.verbose, work_dir=work, device=args.device,
                                    time_limit_s=args.time_limit)
            print(report.text(), flush=True)
            failed += not report.ok
    if failed:
        print(f"{failed} of {len(folders)} model folder(s) failed validation", file=sys.stderr)
    return 1 if failed else 0


def _cmd_submit(args) -> int:
    from cellarena.review.submission import make_submission

    out, df = make_submission(args.model, args.inputs, datasets_dir=args.datasets_dir, out=args.out)
    runs = df.drop_duplicates(["task", "dataset_id", "split_id"])
    print(f"wrote {out}: {len(df)} rows of {len(runs)} runs; next: `cellarena validate {args.model}`, then "
          "commit the folder and open a pull request")
    return 0


def _cmd_import_submission(args) -> int:
    from cellarena import results
    from cellarena.review.submission import import_submission

    from cellarena.data.splits import read_split

    planned = {}
    options = json.loads(args.options) if args.options else {}
    for item in args.split:
        key, _, path = item.partition("=")
        task, sep, dataset = key.partition(":")
        if not sep or not path:
            raise CellarenaError(f"--split expects TASK:DATASET=PATH, got {item!r}")
        planned[task, dataset, read_split(path)["split_id"]] = (path, options.get(key, {}))
    rows, notes = import_submission(args.model, planned, datasets_dir=args.datasets_dir)
    results.write(rows, args.out)
    for note in notes:
        print(note)
    print(f"imported {len(rows)} submitted rows of {Path(args.model).name}")
    return 0


def _cmd_regress(args) -> int:
    from rich.console import Console

    from cellarena import results
    from cellarena.review import reference

    ref_dir = Path(args.reference)
    if args.report_only and not (ref_dir / reference.SCORES_FILE).exists():
        print(f"no reference results in {ref_dir}: nothing to compare (`make reference` makes them)")
        return 0
    comparison = reference.compare(reference.read_reference(ref_dir), results.read(args.scores),
                                   reference.load_tolerances(ref_dir / reference.TOLERANCES_FILE),
                                   reference.read_environment(ref_dir))
    reference.render(comparison, Console(width=200))
    return 0 if comparison.ok or args.report_only else 1


def _cmd_reference(args) -> int:
    from rich.console import Console

    from cellarena import results
    from cellarena.review import reference

    ref_dir = Path(args.reference)
    scores = results.read(args.scores)
    # refuses (before printing or writing anything) a table not made in one run of the clean HEAD
    provenance = reference.check_provenance(scores, reference.repo_of(ref_dir), where=args.scores,
                                            allow_dirty=args.allow_dirty)
    console = Console(width=200)
    if (ref_dir / reference.SCORES_FILE).exists():
        console.print("what this update changes:")
        reference.render(reference.compare(reference.read_reference(ref_dir), scores,
                                           reference.load_tolerances(ref_dir / reference.TOLERANCES_FILE),
                                           reference.read_environment(ref_dir)), console)
    path = reference.write_reference(scores, ref_dir, provenance)
    if provenance.problems:
        for problem in provenance.problems:
            console.print(f"--allow-dirty let through: {problem}", style="yellow", markup=False, highlight=False)
        console.print(f"wrote {path} with --allow-dirty: for tests and development only, do NOT commit it "
                      f"(environment.json lists why under not_for_commit)")
        return 0
    console.print(f"wrote {path} from commit {provenance.commit[:12]}; review `git diff {ref_dir}` and commit it")
    return 0


def _model_run_arguments(s: argparse.ArgumentParser, run: bool = True) -> None:
    """What every command that runs one model on one split takes (``run``: and the run's variant)."""
    s.add_argument("--prepared", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--model", required=True, action="append",
                   help="model folder, e.g. models/knn; repeat it (each with its --out) to run several models "
                        "on the split in one process")
    s.add_argument("--seed", type=int, required=True, action="append",
                   help="repeat it to run every model on several seeds in one process, seed by seed: "
                        "--split, --out (and --tuning or --checkpoint where they differ by seed) then hold "
                        "{seed}, e.g. --split split_seed{seed}.json")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--checkpoint", action="append", default=None,
                   help="pretrained weights (in-suite transformers): PATH, or MODEL_ID=PATH with several models")
    s.add_argument("--datasets-dir", default=None, help="dataset cards and corpus manifests, for the leakage columns "
                                                         "(default: the suite's datasets/)")
    s.add_argument("--checkpoints-dir", default=None, help="published checkpoints (adapters; default: "
                                                            "$CELLARENA_CHECKPOINTS or the data cache)")
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="device of models whose card allows a GPU (default cpu; recorded in every row)")
    s.add_argument("--time-limit", type=float, default=None, dest="time_limit",
                   help="seconds the model may take before it is stopped and recorded as failed (default "
                        "7200; a card's resources.time_limit_s overrides it)")
    s.add_argument("--params", action="append", default=None,
                   help="JSON overriding the card's default parameters (a plan's budget, e.g. "
                        '\'{"max_epochs": 6}\'), or MODEL_ID=JSON with several models')
    if run:
        s.add_argument("--variant", default="default")
        s.add_argument("--tuning", action="append", default=None,
                       help="tuning record from `cellarena tune`: run the tuned variant with its best parameters "
                            "(PATH, or MODEL_ID=PATH with several models)")


def _data_commands(sub) -> None:
    """The subcommands of dataset cards -> verified files -> prepared data -> splits."""
    s = sub.add_parser("fetch", help="download and verify a dataset card's files")
    s.add_argument("--card", required=True)
    s.add_argument("--cache", default=None, help="cache directory (default $CELLARENA_CACHE or ~/.cache/cellarena)")
    s.add_argument("--out", required=True, help="manifest JSON to write")
    s.add_argument("--derived", action="append", default=[], metavar="ID=PATH",
                   help="prepared file of a parent dataset, for cards with derived sources")
    s.add_argument("--progress", action="store_true")
    s.set_defaults(func=_cmd_fetch)

    s = sub.add_parser("prepare", help="write the canonical AnnData of a dataset version")
    s.add_argument("--card", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("split", help="write a seeded train/test split")
    s.add_argument("--prepared", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--spec", required=True, help="JSON of the split scheme")
    s.add_argument("--seed", type=int, required=True, action="append",
                   help="repeat it for several seeds, one file each: --out then holds {seed}")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_split)


def _run_commands(sub) -> None:
    """The subcommands of one model on one split: run, embed, tune, score, pretrain."""
    s = sub.add_parser("run", help="run a model (or several, one after another) on one split and write its result rows")
    s.add_argument("--task", required=True, choices=TASK_IDS)
    _model_run_arguments(s)
    s.add_argument("--options", default=None, help='task options as JSON, e.g. {"batch_role": "condition"}')
    s.add_argument("--out", required=True, action="append", help="result rows (parquet) to write, one per --model")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("embed", help="have one model embed the test cells of a split (embedding tasks)")
    _model_run_arguments(s)
    s.add_argument("--batch-role", default=None, help="obs role the model sees as obs['batch']")
    s.add_argument("--out", required=True, action="append", help=".npz file to write, one per --model")
    s.set_defaults(func=_cmd_embed)

    s = sub.add_parser("tune", help="tune a model's search space on the split's training cells (optuna; "
                                    "resumable)")
    s.add_argument("--task", required=True, choices=TUNED_TASKS)
    _model_run_arguments(s, run=False)
    s.add_argument("--budget", required=True,
                   help='JSON, e.g. {"n_trials": 8, "timeout_s": null, "inner_folds": 3, "max_cells": 1500}')
    s.add_argument("--storage", default=None,
                   help="optuna storage URL (default: a SQLite file next to --out); e.g. postgresql://... "
                        "to share trials between cluster jobs")
    s.add_argument("--batch-role", default=None, help="integration: obs role the model sees as obs['batch']")
    s.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between trial heartbeats; a trial silent for twice that is failed on resume")
    s.add_argument("--out", required=True, action="append", help="tuning record (JSON) to write, one per --model")
    s.set_defaults(func=_cmd_tune)

    s = sub.add_parser("score", help="score the embeddings of one dataset split for a task, in one process")
    s.add_argument("--task", required=True, choices=EMBEDDING_TASKS)
    s.add_argument("--prepared", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--seed", type=int, action="append", required=True,
                   help="repeat it to score several seeds in one process, seed by seed: --split, --out and "
                        "the embeddings then hold {seed}, e.g. embed/ds/all_seed{seed}/pca.npz")
    s.add_argument("--threads", type=int, default=1, help="threads of the metric libraries")
    s.add_argument("--options", default=None, help='task options as JSON, e.g. {"batch_role": "condition"}')
    s.add_argument("--out", required=True)
    s.add_argument("embeddings", nargs="+", help=".npz files written by `cellarena embed`")
    s.set_defaults(func=_cmd_score)

    s = sub.add_parser("pretrain", help="pretrain an in-suite transformer on its corpus (evaluation cells excluded)")
    s.add_argument("--model", required=True, help="model folder whose card has pretraining.recipe")
    s.add_argument("--corpus", required=True, help="corpus card, datasets/corpora/<id>.yaml")
    s.add_argument("--corpus-data", action="append", required=True, help="ID=prepared.h5ad, per corpus dataset")
    s.add_argument("--evaluation", action="append", default=[],
                   help="ID=prepared.h5ad of each evaluation dataset; their cells are excluded")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where to pretrain (default cpu; cuda must be available when asked for)")
    s.add_argument("--out", required=True, help="checkpoint path without suffix (.safetensors + .json)")
    s.set_defaults(func=_cmd_pretrain)


def _results_commands(sub) -> None:
    """The subcommands of the results table and what is made from it."""
    s = sub.add_parser("aggregate", help="validate per-run tables and write the long scores table (a missing or "
                                         "unreadable one is left out and listed)")
    s.add_argument("--out", required=True)
    s.add_argument("--log", action="append", default=[], help="the log of each input's job, in their order "
                                                                "(named when an input is missing)")
    s.add_argument("inputs", nargs="+")
    s.set_defaults(func=_cmd_aggregate)

    s = sub.add_parser("guard", help="(workflow) run a command; if it crashes, write the failed placeholder of "
                                     "its output, with the exit code and the end of its log")
    s.add_argument("--retries", type=int, default=None,
                   help="Snakemake's retries: a job killed from outside fails this often before its placeholder "
                        "(default $CELLARENA_RETRIES, else 0)")
    s.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    s.set_defaults(func=_cmd_guard)

    s = sub.add_parser("model-failed", help="(workflow) failed rows for every planned run of a model folder "
                                            "that cannot run")
    s.add_argument("--model", required=True)
    s.add_argument("--reason", required=True)
    s.add_argument("--datasets-dir", default="datasets")
    s.add_argument("--split", action="append", default=[], metavar="TASK:DATASET=PATH")
    s.add_argument("--options", default=None, help='JSON {"TASK:DATASET": task options}')
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_model_failed)

    s = sub.add_parser("leaderboard", help="export the static leaderboard (HTML + CSV)")
    s.add_argument("--scores", required=True)
    s.add_argument("--claims-dir", default=None, help="published claims to judge in a tab of their own (claims/)")
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=_cmd_leaderboard)

    s = sub.add_parser("summary", help="print a summary of a scores table")
    s.add_argument("scores")
    s.set_defaults(func=_cmd_summary)

    s = sub.add_parser("claims", help="re-judge the published claims of claims/*.yaml on a scores table: "
                                      "reproduced / not reproduced / inconclusive / not run, original and proxy")
    s.add_argument("--scores", required=True)
    s.add_argument("--claims-dir", default="claims")
    s.add_argument("--out-dir", default=None, help="write verdicts.csv (one row per claim and test) and checks.csv "
                                                   "(every comparison behind them)")
    s.set_defaults(func=_cmd_claims)

    s = sub.add_parser("verdicts", help="every entry against the best tuned baseline and its own default: paired "
                                        "differences with 95%% intervals and a verdict (docs/statistics.md)")
    s.add_argument("scores")
    s.add_argument("--task", default=None, help="one task (default: every task in the table)")
    s.add_argument("--metric", default=None, help="the metric compared (default: the task's primary metric)")
    s.add_argument("--csv", default=None, help="also write the verdicts as CSV")
    s.set_defaults(func=_cmd_verdicts)


def _review_commands(sub) -> None:
    """The subcommands of leakage, model folders, submissions, reference scores, cards."""
    s = sub.add_parser("leakage", help="find evaluation cells in corpus files (exact counts and "
                                          "near-duplicate gene sets)")
    s.add_argument("--corpus", nargs="+", required=True, help="corpus h5ad files (raw counts)")
    s.add_argument("--evaluation", required=True, help="a prepared dataset (or any h5ad with raw counts)")
    s.add_argument("--threshold", type=float, default=0.8, help="estimated Jaccard of a near-duplicate")
    s.add_argument("--json", default=None, help="also write the report as JSON")
    s.set_defaults(func=_cmd_leakage)

    s = sub.add_parser("validate", help="check model folders: card, plug-in, and every declared task on tiny "
                                        "seeded data (what a pull request must pass)")
    s.add_argument("folders", nargs="*", help="model folders, e.g. models/my_model")
    s.add_argument("--all", action="store_true", help="every model folder in --models-dir")
    s.add_argument("--models-dir", default="models")
    s.add_argument("--datasets-dir", default=None, help="dataset cards and corpus manifests (default: the "
                                                         "suite's datasets/)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-V", "--verbose-errors", dest="verbose", action="store_true",
                   help="print the whole traceback of a failing task")
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device of models that allow a GPU")
    s.add_argument("--time-limit", type=float, default=None, dest="time_limit",
                   help="seconds each task run on the tiny data may take (default 600)")
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser("submit", help="turn this model's result files into a submission "
                                      "(models/<id>/submitted/results.csv), for models that cannot run in CI")
    s.add_argument("--model", required=True, help="model folder")
    s.add_argument("--datasets-dir", default="datasets")
    s.add_argument("--out", default=None, help="default: <model>/submitted/results.csv")
    s.add_argument("inputs", nargs="+", help="per-run parquet files or a whole scores.parquet")
    s.set_defaults(func=_cmd_submit)

    s = sub.add_parser("import-submission", help="(workflow) check a model's submitted rows against the "
                                                 "plan's splits and write them as a results file")
    s.add_argument("--model", required=True)
    s.add_argument("--datasets-dir", default="datasets")
    s.add_argument("--split", action="append", default=[], metavar="TASK:DATASET=PATH",
                   help="the plan's split of a dataset for a task")
    s.add_argument("--options", default=None, help='JSON {"TASK:DATASET": task options}')
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_import_submission)

    for name, func, text in (
            ("regress", _cmd_regress, "compare a scores table with the committed reference results; exit 1 "
                                      "when a score moved beyond its tolerance"),
            ("reference", _cmd_reference, "update the committed reference results from a scores table "
                                          "(prints what changes)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--scores", required=True)
        s.add_argument("--reference", default="results/reference", help="folder of the reference results")
        if name == "regress":
            s.add_argument("--report-only", action="store_true", help="print the comparison, exit 0 either way")
        else:
            s.add_argument("--allow-dirty", action="store_true",
                           help="tests and development only, never for a committed reference: write it even "
                                "when the table is not one run of the clean HEAD (several or dirty commits, "
                                "another commit, changed tracked files); environment.json records why")
        s.set_defaults(func=func)

    s = sub.add_parser("census-datasets", help="resolve a corpus card's Census release and value filter to "
                                               "the CELLxGENE dataset ids of its cells (for census.dataset_ids)")
    s.add_argument("--corpus", required=True, help="datasets/corpora/<id>.yaml")
    s.add_argument("--uri", default=None, help="a local copy or mirror of the release (default: its published "
                                                "location, which needs the network)")
    s.set_defaults(func=_cmd_census_datasets)

    s = sub.add_parser("check-card", help="validate dataset cards")
    s.add_argument("cards", nargs="+")
    s.set_defaults(func=_cmd_check_card)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellarena", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    _data_commands(sub)
    _run_commands(sub)
    _results_commands(sub)
    _review_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from cellarena.timing import CLOCK

    CLOCK.command_start = time.time()
    try:
        return args.func(args)
    except CellarenaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.command != "guard":
            CLOCK.report()


if __name__ == "__main__":
    sys.exit(main())
