# Cell-type annotation: fit on the split's train cells, predict its test cells.


rule run_annotation:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
    output:
        scores=f"{RESULTS}/run_annotation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.parquet",
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(Path(config["models_dir"]) / wc.model),
        checkpoint=checkpoint_arg,
        tuning="",
    log:
        f"{RESULTS}/logs/run_annotation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_annotation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tsv"
    conda:
        ENV_FILE
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
    shell:
        "{params.cli} run --task annotation --prepared {input.h5ad} --split {input.split} "
        "--model {params.model_dir} --seed {wildcards.seed} --threads {threads} "
        "{params.checkpoint} {params.tuning} --out {output.scores} > {log} 2>&1"


# The tuned variant: the same run with the best parameters of the model's tuning record.
use rule run_annotation as run_annotation_tuned with:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
        tuning=f"{RESULTS}/tuning/annotation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.json",
    output:
        scores=f"{RESULTS}/run_annotation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.parquet",
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(Path(config["models_dir"]) / wc.model),
        checkpoint=checkpoint_arg,
        tuning=lambda wc, input: f"--tuning {input.tuning}",
    log:
        f"{RESULTS}/logs/run_annotation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_annotation/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.tsv"
