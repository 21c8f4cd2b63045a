# The tasks whose runs are one per model (cellarena/tasks.py: annotation, perturbation): fit on the
# split's training side, predict what it holds out, score against the held-back truth. One job per
# (task, dataset, split) runs the task's models one after another on every seed (a batch: common.smk),
# one result file per (seed, model); the tuned variants (the best parameters of each model's tuning
# record of that seed) are a second job.


for each_task in PLAN.model_tasks():
    for each_variant, each_models, each_pattern, each_log, each_tuning in (
            ("", PLAN.task_models[each_task.id], MODEL_RUN, MODEL_RUN_LOG, None),
            ("_tuned", PLAN.tuned.get(each_task.id, []), TUNED_RUN, TUNED_RUN_LOG, TUNING_RECORD)):
        if not each_models:
            continue

        rule:
            name:
                f"run_{each_task.id}{each_variant}"
            input:
                unpack(batch_inputs(each_models, fill(each_tuning, task=each_task.id) if each_tuning else None)),
                h5ad=rules.prepare_dataset.output.h5ad,
                split=per_seed(SPLIT),
            output:
                [fill(each_pattern, task=each_task.id, model=m, seed=s) for s in SEEDS for m in each_models],
            params:
                cli=CELLARENA,
                task=each_task.id,
                split=seed_template_of(SPLIT),
                seeds=SEED_ARGS,
                models=batch_args(each_models, fill(each_pattern, task=each_task.id),
                                  fill(each_tuning, task=each_task.id) if each_tuning else None),
                job=JOB_ARGS,
                options=task_options_of(each_task.id),
            log:
                fill(each_log, task=each_task.id),
            benchmark:
                f"{RESULTS}/benchmarks/run_{each_task.id}/{{dataset}}/{{split_name}}{each_variant}.tsv"
            conda:
                ENV_FILE
            threads: batch_threads(each_models)
            resources:
                mem_mb=batch_mem_mb(each_models),
            shell:
                "{params.cli} run --task {params.task} --prepared {input.h5ad} --split '{params.split}' "
                "{params.seeds} --threads {threads} --options {params.options:q} "
                "{params.models} {params.job} > {log} 2>&1"
