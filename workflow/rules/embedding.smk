# Integration and zero-shot. Each model embeds a dataset once (labels never reach it); the
# embedding serves both tasks. One scoring job per (task, dataset, split) then scores every
# model's embedding in a single process, so imports and JAX compilation are paid once per dataset.


rule embed_cells:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
    output:
        embedding=f"{RESULTS}/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.npz",
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(Path(config["models_dir"]) / wc.model),
        batch_role=lambda wc: config["batch_roles"].get(wc.dataset) or "",
        checkpoint=checkpoint_arg,
        tuning="",
    log:
        f"{RESULTS}/logs/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tsv"
    conda:
        ENV_FILE
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
    shell:
        "{params.cli} embed --prepared {input.h5ad} --split {input.split} "
        "--model {params.model_dir} --seed {wildcards.seed} --threads {threads} "
        "--batch-role '{params.batch_role}' {params.checkpoint} {params.tuning} --out {output.embedding} > {log} 2>&1"


# The tuned variant of an embedding model (tuned for integration on a label-free held-out loss).
use rule embed_cells as embed_cells_tuned with:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
        tuning=f"{RESULTS}/tuning/integration/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.json",
    output:
        embedding=f"{RESULTS}/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.npz",
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(Path(config["models_dir"]) / wc.model),
        batch_role=lambda wc: config["batch_roles"].get(wc.dataset) or "",
        checkpoint=checkpoint_arg,
        tuning=lambda wc, input: f"--tuning {input.tuning}",
    log:
        f"{RESULTS}/logs/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.tsv"


rule score_embeddings:
    input:
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
        embeddings=task_embeddings,
    output:
        scores=f"{RESULTS}/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}.parquet",
    wildcard_constraints:
        task="|".join(EMBEDDING_TASKS),
    params:
        cli=CELLARENA,
        options=lambda wc: task_options(wc, wc.task),
    log:
        f"{RESULTS}/logs/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}.tsv"
    conda:
        ENV_FILE
    threads: config["scoring_threads"]
    resources:
        mem_mb=config["scoring_mem_mb"],
    shell:
        "{params.cli} score --task {wildcards.task} --prepared {input.h5ad} "
        "--split {input.split} --seed {wildcards.seed} --threads {threads} --options '{params.options}' "
        "--out {output.scores} {input.embeddings} > {log} 2>&1"
