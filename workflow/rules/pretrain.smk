# In-suite transformers: pretrain each on its corpus, once per seed, with every evaluation cell of
# the plan that the model can read excluded (and the exclusion verified; a dataset of another
# organism or without gene names gets no run of it); the checkpoint then feeds all of its task runs.


rule pretrain_transformer:
    input:
        card=lambda wc: f"{model_dir(wc)}/model.yaml",
        code=lambda wc: f"{model_dir(wc)}/model.py",
        corpus=lambda wc: str(corpus_path(config["datasets_dir"], PLAN.corpora[wc.model].id)),
        corpus_data=lambda wc: prepared(PLAN.corpora[wc.model].datasets),
        evaluation=lambda wc: prepared(PLAN.readable_datasets(wc.model)),
    output:
        weights=f"{RESULTS}/pretrain/{{model}}/seed{{seed}}/model.safetensors",
        card=f"{RESULTS}/pretrain/{{model}}/seed{{seed}}/model.json",
    params:
        cli=CELLARENA,
        model_dir=model_dir,
        data=lambda wc, input: " ".join(
            [f"--corpus-data {ds}={p}" for ds, p in zip(PLAN.corpora[wc.model].datasets, input.corpus_data)]
            + [f"--evaluation {ds}={p}" for ds, p in zip(PLAN.readable_datasets(wc.model), input.evaluation)]),
        out=lambda wc, output: output.card[: -len(".json")],
        device=PLAN.device,
    log:
        f"{RESULTS}/logs/pretrain/{{model}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{model}}/seed{{seed}}.tsv"
    conda:
        ENV_FILE
    threads: model_threads
    priority: 20  # first: every in-suite transformer's job waits for its checkpoint
    resources:
        mem_mb=model_mem_mb,
    shell:
        "{params.cli} pretrain --model {params.model_dir} --corpus {input.corpus} {params.data} "
        "--seed {wildcards.seed} --threads {threads} --device {params.device} --out {params.out} > {log} 2>&1"
