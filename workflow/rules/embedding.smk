# The embedding tasks (integration, zero-shot). Each model embeds a dataset once (labels never reach
# it); the embedding serves every embedding task. One scoring job per (task, dataset, split) then
# scores every model's embedding in a single process, so imports and JAX compilation are paid once
# per dataset.


rule embed_cells:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
    output:
        embedding=f"{RESULTS}/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.npz",
    params:
        cli=CELLARENA,
        model_dir=model_dir,
        job=JOB_ARGS,
        batch_role=lambda wc: PLAN.batch_role(wc.dataset),
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
        "--batch-role '{params.batch_role}' {params.checkpoint} {params.tuning} {params.job} "
        "--out {output.embedding} > {log} 2>&1"


# The tuned variant of an embedding model (tuned on a label-free held-out loss).
use rule embed_cells as embed_cells_tuned with:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
        tuning=lambda wc: targets(rules.tune_model.output.record, [{"task": TUNED_EMBEDDING_TASK, **dict(wc.items())}]),
    output:
        embedding=f"{RESULTS}/embed/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tuned.npz",
    params:
        cli=CELLARENA,
        model_dir=model_dir,
        job=JOB_ARGS,
        batch_role=lambda wc: PLAN.batch_role(wc.dataset),
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
        embeddings=lambda wc: [
            targets(rules.embed_cells_tuned.output.embedding if e["tuned"] else rules.embed_cells.output.embedding,
                    [{"dataset": wc.dataset, "split_name": wc.split_name, "seed": wc.seed, "model": e["model"]}])[0]
            for e in PLAN.scored_embeddings(wc.task, wc.dataset, wc.seed)],
    output:
        scores=f"{RESULTS}/run_{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}.parquet",
    wildcard_constraints:
        task="|".join(EMBEDDING_TASKS),
    params:
        cli=CELLARENA,
        options=task_options,
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
