# The tasks whose runs are one job per model (cellarena/tasks.py: annotation, perturbation): fit on
# the split's training side, predict what it holds out, score against the held-back truth.


rule run_model:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
    output:
        scores=f"{RESULTS}/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.parquet",
    wildcard_constraints:
        task=MODEL_TASKS,
    params:
        cli=CELLARENA,
        model_dir=model_dir,
        job=JOB_ARGS,
        options=task_options,
        checkpoint=checkpoint_arg,
        tuning="",
    log:
        f"{RESULTS}/logs/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tsv"
    conda:
        ENV_FILE
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
    shell:
        "{params.cli} run --task {wildcards.task} --prepared {input.h5ad} --split {input.split} "
        "--model {params.model_dir} --seed {wildcards.seed} --threads {threads} --options '{params.options}' "
        "{params.checkpoint} {params.tuning} {params.job} --out {output.scores} > {log} 2>&1"


# The tuned variant: the same run with the best parameters of the model's tuning record.
use rule run_model as run_model_tuned with:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
        tuning=rules.tune_model.output.record,
    output:
        scores=f"{RESULTS}/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.parquet",
    params:
        cli=CELLARENA,
        model_dir=model_dir,
        job=JOB_ARGS,
        options=task_options,
        checkpoint=checkpoint_arg,
        tuning=lambda wc, input: f"--tuning {input.tuning}",
    log:
        f"{RESULTS}/logs/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.tsv"
