# Perturbation response: each model predicts the held-out profiles of every fold of a split
# (one job per dataset x split x model); metrics compare them with the held-out cells.


rule run_perturbation:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
    output:
        scores=f"{RESULTS}/run_perturbation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.parquet",
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(Path(config["models_dir"]) / wc.model),
        options=perturbation_options(),
        checkpoint=checkpoint_arg,
    log:
        f"{RESULTS}/logs/run_perturbation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_perturbation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tsv"
    conda:
        ENV_FILE
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
    shell:
        "{params.cli} run --task perturbation --prepared {input.h5ad} --split {input.split} "
        "--model {params.model_dir} --seed {wildcards.seed} --threads {threads} "
        "{params.checkpoint} --options '{params.options}' --out {output.scores} > {log} 2>&1"
