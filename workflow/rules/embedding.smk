# The embedding tasks (integration, zero-shot). Each model embeds a dataset once (labels never reach
# it); the embedding serves every embedding task. One job per (dataset, split) has the dataset's
# embedding models embed it one after another on every seed (a batch: common.smk), one file per
# (seed, model);
# the tuned variants (tuned on a label-free held-out loss) are a second job. One scoring job per
# (task, dataset, split) then scores every model's embedding of every seed in a single process, one
# file per seed, so imports and JAX compilation are paid once per dataset.


for each_dataset in PLAN.embedded_datasets():
    each_tuned_models = list(dict.fromkeys(k["model"] for k in PLAN.embed_jobs(tuned=True) if k["dataset"] == each_dataset))
    for each_variant, each_models, each_pattern, each_tuning in (
            ("", PLAN.embedding_models(each_dataset), EMBEDDING, None),
            ("_tuned", each_tuned_models, TUNED_EMBEDDING, TUNING_RECORD)):
        if not each_models:
            continue

        rule:
            name:
                f"embed_{each_dataset}{each_variant}"
            input:
                unpack(batch_inputs(each_models, fill(each_tuning, task=TUNED_EMBEDDING_TASK, dataset=each_dataset)
                                    if each_tuning else None, dataset=each_dataset)),
                h5ad=fill(rules.prepare_dataset.output.h5ad, dataset=each_dataset),
                split=per_seed(SPLIT, dataset=each_dataset),
            output:
                [fill(each_pattern, dataset=each_dataset, model=m, seed=s) for s in SEEDS for m in each_models],
            params:
                cli=CELLARENA,
                split=seed_template_of(SPLIT, dataset=each_dataset),
                seeds=SEED_ARGS,
                models=batch_args(each_models, fill(each_pattern, dataset=each_dataset),
                                  fill(each_tuning, task=TUNED_EMBEDDING_TASK, dataset=each_dataset)
                                  if each_tuning else None, dataset=each_dataset),
                job=JOB_ARGS,
                batch_role=batch_role_of(each_dataset),
            log:
                f"{RESULTS}/logs/embed/{each_dataset}/{{split_name}}{each_variant}.log",
            benchmark:
                f"{RESULTS}/benchmarks/embed/{each_dataset}/{{split_name}}{each_variant}.tsv"
            conda:
                ENV_FILE
            threads: batch_threads(each_models)
            priority: 10  # before the model runs: a scoring job waits for the embeddings
            resources:
                mem_mb=batch_mem_mb(each_models),
            shell:
                "{params.cli} embed --prepared {input.h5ad} --split '{params.split}' "
                "{params.seeds} --threads {threads} --batch-role '{params.batch_role}' "
                "{params.models} {params.job} > {log} 2>&1"


rule score_embeddings:
    input:
        h5ad=rules.prepare_dataset.output.h5ad,
        split=per_seed(SPLIT),
        embeddings=scored_embedding_files,
    output:
        scores=per_seed(EMBEDDING_SCORES),
    wildcard_constraints:
        task="|".join(EMBEDDING_TASKS),
    priority: 10
    params:
        cli=CELLARENA,
        options=task_options,
        split=seed_template_of(SPLIT),
        out=seed_template_of(EMBEDDING_SCORES),
        seeds=SEED_ARGS,
        embeddings=scored_embedding_args,
    log:
        EMBEDDING_SCORES_LOG,
    benchmark:
        f"{RESULTS}/benchmarks/run_{{task}}/{{dataset}}/{{split_name}}.tsv"
    conda:
        ENV_FILE
    threads: config["scoring_threads"]
    resources:
        mem_mb=config["scoring_mem_mb"],
    shell:
        "{params.cli} score --task {wildcards.task} --prepared {input.h5ad} --split '{params.split}' "
        "{params.seeds} --threads {threads} --options {params.options:q} "
        "--out '{params.out}' {params.embeddings} > {log} 2>&1"
