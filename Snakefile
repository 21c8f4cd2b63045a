# cellarena: orchestration only. Rules live in workflow/rules, the plan (which jobs) in
# cellarena/plan.py, everything else in the cellarena package.
from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/tuning.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/embedding.smk"
include: "workflow/rules/results.smk"


# Every intermediate file is a target too, so that deleting any one of them re-creates it and
# re-runs exactly what depends on it (Snakemake otherwise ignores missing intermediates).
rule all:
    input:
        intermediate_targets(),
        rules.aggregate_scores.output.scores,
        rules.build_leaderboard.output.html,
        rules.check_claims.output.verdicts,
    default_target: True
