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
        task="annotation|integration",
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(Path(config["models_dir"]) / wc.model),
        budget=tuning_budget(),
        storage=tuning_storage_arg,
        heartbeat=TUNING["heartbeat_s"],
        batch_role=lambda wc: (config["batch_roles"].get(wc.dataset) or "") if wc.task == "integration" else "",
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
        "{params.checkpoint} --out {output.record} > {log} 2>&1"
