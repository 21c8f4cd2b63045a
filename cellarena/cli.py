"""Command-line interface. Snakemake rules call these subcommands; users can too.

    cellarena fetch      --card datasets/<id>.yaml --out manifest.json
    cellarena prepare    --card datasets/<id>.yaml --manifest manifest.json --out prepared.h5ad
    cellarena split      --prepared prepared.h5ad --name stratified --spec '{"scheme": ...}' --seed 0 --out split.json
    cellarena run        --task annotation --prepared ... --split ... --model models/<id> --seed 0 --out run.parquet
    cellarena aggregate  --out results/scores.parquet RUN.parquet ...
    cellarena leaderboard --scores results/scores.parquet --out-dir results/leaderboard
    cellarena summary    results/scores.parquet
    cellarena check-card datasets/<id>.yaml ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cellarena.errors import CellarenaError

log = logging.getLogger("cellarena")


def _cmd_fetch(args) -> int:
    from cellarena.cards import load_card
    from cellarena.fetch import fetch_card

    card = load_card(args.card)
    paths = fetch_card(card, args.cache, card_dir=Path(args.card).parent, progress=args.progress)
    manifest = {
        "dataset_id": card.id,
        "dataset_version": card.version,
        "sources": {s.id: {"path": str(paths[s.id]), "sha256": s.sha256} for s in card.sources},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=2))
    print(f"fetched {card.id} v{card.version}: {len(paths)} file(s) verified")
    return 0


def _cmd_prepare(args) -> int:
    from cellarena.cards import load_card
    from cellarena.prepare import failed_placeholder, prepare, write_h5ad

    card = load_card(args.card)
    manifest = json.loads(Path(args.manifest).read_text())
    if manifest.get("dataset_version") != card.version:
        raise CellarenaError("manifest was made for another card version", where=args.manifest,
                             fix="re-run `cellarena fetch` for this card")
    paths = {k: Path(v["path"]) for k, v in manifest["sources"].items()}
    try:
        adata = prepare(card, paths, card_path=args.card)
    except Exception as exc:  # a broken dataset becomes failed rows downstream, not a crashed DAG
        reason = str(exc) if isinstance(exc, CellarenaError) else f"{type(exc).__name__}: {exc}"
        print(f"error: preparing {card.id} failed:\n{reason}", file=sys.stderr)
        write_h5ad(failed_placeholder(card.id, card.version, card.label_quality, reason), args.out)
        return 0
    write_h5ad(adata, args.out)
    labels = ""
    if "cell_type" in adata.obs:
        labels = f", {adata.obs['cell_type'].nunique()} {card.label_quality} cell types"
    print(f"prepared {card.id} v{card.version}: {adata.n_obs} cells x {adata.n_vars} genes{labels}")
    return 0


def _cmd_split(args) -> int:
    import anndata as ad

    from cellarena.prepare import provenance
    from cellarena.splits import SplitSpec, failed_split, make_split, write_split

    spec = SplitSpec.model_validate(json.loads(args.spec))
    adata = ad.read_h5ad(args.prepared, backed="r")
    info = provenance(adata)
    common = dict(dataset_id=info["dataset_id"], dataset_version=info["dataset_version"], name=args.name,
                  spec=spec, seed=args.seed)
    if info.get("status") != "ok":
        split = failed_split(**common, reason=f"dataset preparation failed: {info.get('reason')}")
    else:
        try:
            split = make_split(adata.obs, **common)
        except CellarenaError as exc:
            split = failed_split(**common, reason=str(exc))
    write_split(split, args.out)
    print(f"split {split['split_id']} of {info['dataset_id']}: {split['n_train']} train / "
          f"{split['n_test']} test, hash {split['hash'] or '-'}")
    return 0


def _cmd_run(args) -> int:
    from cellarena import results
    from cellarena.runner import run_task

    params = json.loads(args.params) if args.params else None
    options = json.loads(args.options) if args.options else None
    rows = run_task(args.task, args.prepared, args.split, args.model, seed=args.seed, variant=args.variant,
                    params=params, threads=args.threads, options=options)
    results.write(rows, args.out)
    first = rows.iloc[0]
    extra = f" ({first.status_reason[:200]})" if first.status != "ok" else ""
    print(f"{first.model_id} on {first.dataset_id}/{first.split_id}: {first.status}{extra}")
    return 0


def _cmd_aggregate(args) -> int:
    from cellarena import results

    df = results.aggregate(args.inputs, args.out)
    print(f"wrote {args.out}: {len(df)} rows from {len(args.inputs)} runs")
    return 0


def _cmd_leaderboard(args) -> int:
    from leaderboard.data import load_scores
    from leaderboard.export import export_static

    written = export_static(load_scores(args.scores), args.out_dir)
    print(f"wrote static leaderboard: {', '.join(str(p) for p in written)}")
    return 0


SUMMARY_METRICS = {
    "annotation": ("accuracy", "macro_f1"),
    "integration": ("nmi", "silhouette_label", "ilisi", "graph_connectivity"),
    "zero_shot": ("knn_accuracy", "knn_macro_f1", "nmi"),
}


def _cmd_summary(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from cellarena import results

    df = results.read(args.scores)
    overall = df[df["subgroup"] == ""]
    console = Console()
    for (task, dataset), grp in overall.groupby(["task", "dataset_id"], sort=True):
        preferred = SUMMARY_METRICS.get(task, ())
        metric_ids = [m for m in preferred if m in set(grp["metric_id"])] or sorted(set(grp["metric_id"]))[:2]
        quality = grp["label_quality"].iloc[0]
        table = Table(title=f"{task} · {dataset} ({quality} labels) · mean over splits")
        for col in ("model", "kind", "variant", "status", *metric_ids):
            table.add_column(col)
        keys = ["model_id", "model_kind", "variant"]
        wide = grp.pivot_table(index=keys, columns="metric_id", values="value", aggfunc="mean")
        status = grp.groupby(keys)["status"].agg(lambda s: ", ".join(sorted(set(s))))
        wide = wide.reindex(status.index)
        for key in wide.sort_values(metric_ids[0], ascending=False, na_position="last").index:
            vals = [f"{wide.loc[key, m]:.3f}" if wide.loc[key, m] == wide.loc[key, m] else "—"
                    for m in metric_ids]
            table.add_row(key[0], key[1], key[2], status[key], *vals)
        console.print(table)
    counts = df.drop_duplicates(["task", "dataset_id", "split_id", "model_id", "variant"])["status"]
    console.print(f"runs: {counts.value_counts().to_dict()}")
    console.print(f"results table: [bold]{Path(args.scores).resolve()}[/bold]")
    console.print("static leaderboard: results/leaderboard/index.html")
    console.print("interactive leaderboard: [bold]make leaderboard[/bold] then open http://127.0.0.1:8501")
    return 0


def _cmd_check_card(args) -> int:
    from cellarena.cards import load_card

    for path in args.cards:
        card = load_card(path)
        print(f"ok: {path} ({card.id} v{card.version}, {card.label_quality} labels)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellarena", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("fetch", help="download and verify a dataset card's files")
    s.add_argument("--card", required=True)
    s.add_argument("--cache", default=None, help="cache directory (default $CELLARENA_CACHE or ~/.cache/cellarena)")
    s.add_argument("--out", required=True, help="manifest JSON to write")
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
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_split)

    s = sub.add_parser("run", help="run one model on one split and write its result rows")
    s.add_argument("--task", required=True, choices=["annotation", "integration", "zero_shot"])
    s.add_argument("--prepared", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--model", required=True, help="model folder, e.g. models/knn")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--variant", default="default")
    s.add_argument("--params", default=None, help="JSON overriding the card's default parameters")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--options", default=None, help='task options as JSON, e.g. {"batch_role": "condition"}')
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("aggregate", help="validate per-run tables and write the long scores table")
    s.add_argument("--out", required=True)
    s.add_argument("inputs", nargs="+")
    s.set_defaults(func=_cmd_aggregate)

    s = sub.add_parser("leaderboard", help="export the static leaderboard (HTML + CSV)")
    s.add_argument("--scores", required=True)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=_cmd_leaderboard)

    s = sub.add_parser("summary", help="print a summary of a scores table")
    s.add_argument("scores")
    s.set_defaults(func=_cmd_summary)

    s = sub.add_parser("check-card", help="validate dataset cards")
    s.add_argument("cards", nargs="+")
    s.set_defaults(func=_cmd_check_card)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CellarenaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
