# Per-run tables -> one validated long table -> static leaderboard.


# Submitted results (models/<id>/submitted/): validated against this plan's splits, not re-run.
rule import_submission:
    input:
        card=lambda wc: str(PLAN.submissions[wc.model] / "model.yaml"),
        files=lambda wc: [str(p) for p in PLAN.submission_files(wc.model)],
        splits=lambda wc: sorted(set(targets(SPLIT,
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


# Model folders that cannot run (a model.yaml that does not load, no model.py): no job runs their
# code; this one writes failed rows, with the reason and its fix, for every run the plan would have
# given the model (cellarena/plan.py), and the other models run as usual.
rule report_broken_model:
    input:
        card=lambda wc: f"{model_dir(wc)}/model.yaml",
        splits=lambda wc: sorted(set(targets(SPLIT,
                                             [key for _, key, _ in PLAN.broken_plan(wc.model)]))),
    output:
        scores=f"{RESULTS}/report_broken_model/{{model}}.parquet",
    params:
        cli=CELLARENA,
        model_dir=model_dir,
        datasets_dir=config["datasets_dir"],
        reason=lambda wc: shlex.quote(PLAN.broken[wc.model][0]),
        plan=lambda wc: split_args(PLAN.broken_plan(wc.model)),
    log:
        f"{RESULTS}/logs/report_broken_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_broken_model/{{model}}.tsv"
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=1000,
    shell:
        "{params.cli} model-failed --model {params.model_dir} --datasets-dir {params.datasets_dir} "
        "--reason {params.reason} {params.plan} --out {output.scores} > {log} 2>&1"


# Every run's table; a run file that is missing or unreadable is left out and listed (with its job's
# log), which `cellarena summary` prints.
rule aggregate_scores:
    input:
        runs=all_runs(),
    output:
        scores=f"{RESULTS}/scores.parquet",
    params:
        cli=CELLARENA,
        logs=" ".join(f"--log {path}" for path in all_runs(logs=True)),
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
        "{params.cli} aggregate --out {output.scores} {params.logs} {input.runs} > {log} 2>&1"


# Every published claim of claims/ re-judged from this run's results (cellarena/analysis/claims.py).
rule check_claims:
    input:
        scores=rules.aggregate_scores.output.scores,
        claims=sorted(glob.glob(f"{config['claims_dir']}/*.yaml")),
    output:
        verdicts=f"{RESULTS}/claims/verdicts.csv",
        checks=f"{RESULTS}/claims/checks.csv",
    params:
        cli=CELLARENA,
        claims_dir=lambda wc, input: claims_folder(input.claims),
        out_dir=lambda wc, output: str(Path(output.verdicts).parent),
    log:
        f"{RESULTS}/logs/check_claims.log",
    benchmark:
        f"{RESULTS}/benchmarks/check_claims.tsv"
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.cli} claims --scores {input.scores} --claims-dir {params.claims_dir} --out-dir {params.out_dir} "
        "> {log} 2>&1"


rule build_leaderboard:
    input:
        scores=rules.aggregate_scores.output.scores,
        claims=rules.check_claims.input.claims,
    output:
        html=f"{RESULTS}/leaderboard/index.html",
    params:
        cli=CELLARENA,
        out_dir=lambda wc, output: str(Path(output.html).parent),
        claims_dir=lambda wc, input: claims_folder(input.claims),
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
        "{params.cli} leaderboard --scores {input.scores} --claims-dir {params.claims_dir} "
        "--out-dir {params.out_dir} > {log} 2>&1"
