# Dataset cards -> verified raw files -> canonical AnnData -> seeded splits (one job per dataset and
# split writes the split of every seed: common.smk's SPLIT).


rule fetch_dataset:
    input:
        parents=lambda wc: prepared(PLAN.derived_parents(wc.dataset)),
        card=card_file,
    output:
        manifest=f"{RESULTS}/fetch_dataset/{{dataset}}.json",
    params:
        cli=CELLARENA,
        cache=CACHE_ARG,
        derived=lambda wc, input: " ".join(f"--derived {ds}={path}" for ds, path in
                                           zip(PLAN.derived_parents(wc.dataset), input.parents)),
    log:
        f"{RESULTS}/logs/fetch_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch_dataset/{{dataset}}.tsv"
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=1000,
    # no Snakemake retries: the job retries a download a retry can cure, and records what still
    # fails (a checksum mismatch, a missing file) in a failed manifest (cellarena/data/fetch.py)
    shell:
        "{params.cli} fetch --card {input.card} {params.cache} {params.derived} --out {output.manifest} > {log} 2>&1"


rule prepare_dataset:
    input:
        card=card_file,
        manifest=rules.fetch_dataset.output.manifest,
    output:
        h5ad=f"{RESULTS}/prepare_dataset/{{dataset}}.h5ad",
    params:
        cli=CELLARENA,
    log:
        f"{RESULTS}/logs/prepare_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_dataset/{{dataset}}.tsv"
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 6000 * attempt,
    shell:
        "{params.cli} prepare --card {input.card} --manifest {input.manifest} --out {output.h5ad} > {log} 2>&1"


rule make_split:
    input:
        h5ad=rules.prepare_dataset.output.h5ad,
    output:
        splits=per_seed(SPLIT),
    params:
        cli=CELLARENA,
        out=seed_template_of(SPLIT),
        seeds=SEED_ARGS,
        spec=lambda wc: json.dumps(PLAN.splits[wc.split_name].model_dump(mode="json", exclude_defaults=True)),
    log:
        f"{RESULTS}/logs/make_split/{{dataset}}/{{split_name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/make_split/{{dataset}}/{{split_name}}.tsv"
    conda:
        ENV_FILE
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.cli} split --prepared {input.h5ad} --name {wildcards.split_name} "
        "--spec '{params.spec}' {params.seeds} --out '{params.out}' > {log} 2>&1"
