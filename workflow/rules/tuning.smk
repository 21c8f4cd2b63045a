# Hyperparameter tuning: one optuna study per (task, dataset, split, seed, model), with the plan's
# single budget (config: tuning). One job per (task, dataset, split, seed) tunes the task's tuned
# models one after another (a batch: common.smk). Each study lives in a SQLite file next to its record
# (or in the configured storage URL), so a killed job resumes its finished trials when re-run. The
# record holds the best parameters; the tuned run rules read it.


for each_task_id, each_models in PLAN.tuned.items():
    if not each_models:
        continue

    rule:
        name:
            f"tune_{each_task_id}"
        input:
            unpack(batch_inputs(each_models)),
            h5ad=rules.prepare_dataset.output.h5ad,
            split=rules.make_split.output.split,
        output:
            [fill(TUNING_RECORD, task=each_task_id, model=m) for m in each_models],
        params:
            cli=CELLARENA,
            task=each_task_id,
            models=batch_args(each_models),
            job=JOB_ARGS,
            budget=PLAN.tuning_budget(),
            storage=f"--storage '{config['tuning']['storage']}'" if config["tuning"].get("storage") else "",
            heartbeat=config["tuning"]["heartbeat_s"],
            batch_role=tuning_batch_role(each_task_id),
        log:
            f"{RESULTS}/logs/tuning/{each_task_id}/{{dataset}}/{{split_name}}_seed{{seed}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/tuning/{each_task_id}/{{dataset}}/{{split_name}}_seed{{seed}}.tsv"
        conda:
            ENV_FILE
        threads: batch_threads(each_models)
        priority: 5  # before the untuned runs: the tuned runs and embeddings wait for it
        resources:
            mem_mb=batch_mem_mb(each_models),
        shell:
            "{params.cli} tune --task {params.task} --prepared {input.h5ad} --split {input.split} "
            "--seed {wildcards.seed} --threads {threads} --budget '{params.budget}' "
            "{params.storage} --heartbeat {params.heartbeat} --batch-role '{params.batch_role}' "
            "{params.models} {params.job} > {log} 2>&1"
