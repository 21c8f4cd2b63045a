# In-suite transformers: pretrain each on its corpus, once per seed, with every evaluation cell of
# the plan excluded (and the exclusion verified); the checkpoint then feeds all of its task runs.


rule pretrain_transformer:
    input:
        unpack(pretrain_inputs),
    output:
        weights=f"{RESULTS}/pretrain/{{model}}/seed{{seed}}/model.safetensors",
        card=f"{RESULTS}/pretrain/{{model}}/seed{{seed}}/model.json",
    params:
        cli=CELLARENA,
        model_dir=lambda wc: str(Path(config["models_dir"]) / wc.model),
        data=pretrain_data_args,
        out=lambda wc, output: output.card[: -len(".json")],
    log:
        f"{RESULTS}/logs/pretrain/{{model}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{model}}/seed{{seed}}.tsv"
    conda:
        ENV_FILE
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
    shell:
        "{params.cli} pretrain --model {params.model_dir} --corpus {input.corpus} {params.data} "
        "--seed {wildcards.seed} --threads {threads} --out {params.out} > {log} 2>&1"
