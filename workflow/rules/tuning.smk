# Hyperparameter tuning: one optuna study per (task, dataset, split, seed, model), with the plan's
# single budget (config: tuning). The study lives in a SQLite file next to the record (or in the
# configured storage URL), so a killed job resumes its finished trials when re-run. The record holds
# the best parameters; the tuned run rules read it.


rule tune_model:
    input:
        unpack(model_files),
        h5ad=rules.prepare_dataset.output.h5ad,
        split=rules.make_split.output.split,
    output:
        record=f"{RESULTS}/tuning/{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.json",
    wildcard_constraints:
        task="|".join(TUNED_TASKS),
    params:
        cli=CELLARENA,
        model_dir=model_dir,
        job=JOB_ARGS,
        budget=PLAN.tuning_budget(),
        storage=f"--storage '{config['tuning']['storage']}'" if config["tuning"].get("storage") else "",
        heartbeat=config["tuning"]["heartbeat_s"],
        batch_role=lambda wc: PLAN.batch_role(wc.dataset) if TASKS[wc.task].scores_embeddings else "",
        checkpoint=checkpoint_arg,
    log:
        f"{RESULTS}/logs/tuning/{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tuning/{{task}}/{{dataset}}/{{split_name}}_seed{{seed}}/{{model}}.tsv"
    conda:
        ENV_FILE
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
    shell:
        "{params.cli} tune --task {wildcards.task} --prepared {input.h5ad} --split {input.split} "
        "--model {params.model_dir} --seed {wildcards.seed} --threads {threads} --budget '{params.budget}' "
        "{params.storage} --heartbeat {params.heartbeat} --batch-role '{params.batch_role}' "
        "{params.checkpoint} {params.job} --out {output.record} > {log} 2>&1"
