# Per-run tables -> one validated long table -> static leaderboard.


# Submitted results (models/<id>/submitted/): validated against this plan's splits, not re-run.
rule import_submission:
    input:
        card=lambda wc: str(PLAN.submissions[wc.model] / "model.yaml"),
        files=lambda wc: [str(p) for p in PLAN.submission_files(wc.model)],
        splits=lambda wc: sorted(set(targets(rules.make_split.output.split,
                                             [key for _, key, _ in PLAN.submission_plan(wc.model)]))),
    output:
        scores=f"{RESULTS}/import_submission/{{model}}.parquet",
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(PLAN.submissions[wc.model]),
        datasets_dir=config["datasets_dir"],
        plan=lambda wc: submission_args(wc.model),
    log:
        f"{RESULTS}/logs/import_submission/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/import_submission/{{model}}.tsv"
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.cli} import-submission --model {params.model_dir} --datasets-dir {params.datasets_dir} "
        "{params.plan} --out {output.scores} > {log} 2>&1"


rule aggregate_scores:
    input:
        runs=all_runs(),
    output:
        scores=f"{RESULTS}/scores.parquet",
    params:
        cli=CELLARENA,
    log:
        f"{RESULTS}/logs/aggregate_scores.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate_scores.tsv"
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.cli} aggregate --out {output.scores} {input.runs} > {log} 2>&1"


rule build_leaderboard:
    input:
        scores=rules.aggregate_scores.output.scores,
    output:
        html=f"{RESULTS}/leaderboard/index.html",
    params:
        cli=CELLARENA,
        out_dir=lambda wc, output: str(Path(output.html).parent),
    log:
        f"{RESULTS}/logs/build_leaderboard.log",
    benchmark:
        f"{RESULTS}/benchmarks/build_leaderboard.tsv"
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.cli} leaderboard --scores {input.scores} --out-dir {params.out_dir} > {log} 2>&1"
