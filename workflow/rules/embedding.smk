# Integration and zero-shot: a model embeds every cell; labels go to the metrics only.
# One rule serves both tasks; the {task} wildcard is limited to the embedding tasks.


rule run_embedding_task:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
    output:
        scores=f"{RESULTS}/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.parquet",
    wildcard_constraints:
        task="|".join(EMBEDDING_TASKS),
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(Path(config["models_dir"]) / wc.model),
        options=lambda wc: task_options(wc, wc.task),
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
        "--model {params.model_dir} --seed {wildcards.seed} --threads {threads} "
        "--options '{params.options}' --out {output.scores} > {log} 2>&1"
