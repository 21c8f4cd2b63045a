# Hyperparameter tuning: one optuna study per (task, dataset, split, seed, model), with the plan's
# single budget (config: tuning). One job per (task, dataset, split) tunes the task's tuned models
# one after another on every seed (a batch: common.smk; each seed's split has its own study). Each study lives in a SQLite file next to its record
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
            split=per_seed(SPLIT),
        output:
            [fill(TUNING_RECORD, task=each_task_id, model=m, seed=s) for s in SEEDS for m in each_models],
        params:
            cli=CELLARENA,
            task=each_task_id,
            split=seed_template_of(SPLIT),
            seeds=SEED_ARGS,
            models=batch_args(each_models, fill(TUNING_RECORD, task=each_task_id)),
            job=JOB_ARGS,
            budget=PLAN.tuning_budget(),
            storage=f"--storage '{config['tuning']['storage']}'" if config["tuning"].get("storage") else "",
            heartbeat=config["tuning"]["heartbeat_s"],
            batch_role=tuning_batch_role(each_task_id),
        log:
            f"{RESULTS}/logs/tuning/{each_task_id}/{{dataset}}/{{split_name}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/tuning/{each_task_id}/{{dataset}}/{{split_name}}.tsv"
        conda:
            ENV_FILE
        threads: batch_threads(each_models)
        priority: 5  # before the untuned runs: the tuned runs and embeddings wait for it
        resources:
            mem_mb=batch_mem_mb(each_models),
        shell:
            "{params.cli} tune --task {params.task} --prepared {input.h5ad} --split '{params.split}' "
            "{params.seeds} --threads {threads} --budget '{params.budget}' "
            "{params.storage} --heartbeat {params.heartbeat} --batch-role '{params.batch_role}' "
            "{params.models} {params.job} > {log} 2>&1"
