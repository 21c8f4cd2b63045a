"""Uncertainty on every number of the results table, and model-vs-baseline verdicts.

The reasoning, for a reader: docs/statistics.md.

**One run's number.** Every overall metric of an annotation or perturbation run carries the metric on
resamples of its test units (``bootstrap_json``: cells or queries, :mod:`cellarena.metrics.bootstrap`).
Their variance ``w`` is what the test sample alone makes uncertain. Embedding metrics (integration,
zero-shot) are computed on a neighbour graph or a clustering of all cells, which a resample with
repeated cells would change in kind, so they carry none: their interval comes from the seeds alone.

**Several seeds.** A seed changes the training (initialisation, subsample, folds) *and* the test
cells drawn, so the spread of the per-seed values ``s²`` holds both sources. The mean over ``S``
seeds gets the variance ``max(s², w̄) / S``: the random-effects variance of DerSimonian & Laird with
equal weights (between-seed variance ``τ² = max(0, s² − w̄)`` plus the mean within-split variance
``w̄``). Its 95% interval uses Student's t with ``S − 1`` degrees of freedom when the spread over
seeds decides it (``s² > w̄``: the classical t interval over seeds) and the normal quantile when the
test sample does (``w̄`` is estimated from hundreds of resamples). With one seed only the
within-split part exists; without either, there is no interval. ``interval_from`` says which.

**Paired comparisons.** Two entries (model, variant) run on the same splits and seeds: the per-seed
difference and, replicate by replicate, the difference of their resamples — the same test cells for
both (same split, same resamples), so the pairing removes what the two share. The same combination
gives the difference's interval; the verdict is ``better`` / ``worse`` when the interval excludes 0
(direction of the metric respected), else ``indistinguishable``.

**Ranks.** Rank intervals come from drawing the whole table anew: per dataset and split, seeds with
replacement and one shared resample per seed (so every entry of a draw sees the same test cells),
then ranks as :func:`cellarena.leaderboard.data.rank_models` computes them. **Across datasets**, a
Friedman test over (dataset, split) blocks and Wilcoxon signed-rank tests of each entry against the
best-ranked one, Holm-corrected (Demšar 2006), from scipy and statsmodels.

Pure functions of the long table; deterministic (every draw seeded from ``seed`` and the group).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from cellarena import tasks

LEVEL = 0.95
RANK_DRAWS = 500
ENTRY = ["model_id", "variant"]
CELL = ["task", "dataset_id", "scheme"]  # a (dataset, split scheme): seeds are its repeats
SUMMARY_KEYS = [*CELL, *ENTRY, "metric_id"]
VERDICTS = ("better", "worse", "indistinguishable", "no common seeds")

_SEED_SUFFIX = re.compile(r"_seed\d+$")


def scheme_of(split_id: str) -> str:
    """The split scheme of a split id: ``stratified_seed2`` -> ``stratified``."""
    return _SEED_SUFFIX.sub("", split_id)


def _rng(seed: int, *key) -> np.random.Generator:
    digest = hashlib.sha256("|".join(map(str, (seed, *key))).encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))


def _decoded(text: str) -> tuple[str, int, np.ndarray | None]:
    from cellarena.metrics.bootstrap import decode  # noqa: PLC0415

    unit, n, values = decode(text)
    return unit, n, (values if values.size else None)


def overall(df: pd.DataFrame) -> pd.DataFrame:
    """The ``ok`` overall rows with their split ``scheme`` and decoded replicates (``unit``,
    ``n_units``, ``replicates``: an array, or None). A frame that is already one is returned as it is."""
    if "replicates" in df.columns:
        return df
    rows = df[(df["status"] == "ok") & (df["subgroup"] == "")].copy()
    rows["scheme"] = rows["split_id"].map(scheme_of)
    if "bootstrap_json" not in rows:
        rows["bootstrap_json"] = "{}"
    decoded = [_decoded(t) for t in rows["bootstrap_json"]]
    rows["unit"] = [d[0] for d in decoded]
    rows["n_units"] = [d[1] for d in decoded]
    rows["replicates"] = [d[2] for d in decoded]
    return rows.sort_values([*SUMMARY_KEYS, "seed"], kind="mergesort").reset_index(drop=True)


def combine(values: np.ndarray, within: np.ndarray | None, level: float = LEVEL) -> dict:
    """The mean of per-seed ``values`` with its interval (module docstring). ``within``: the
    within-split bootstrap variance of each seed's value (NaN where a seed has none); None: no seed
    has one. Returns mean, sd, ci_low, ci_high, n_seeds and interval_from."""
    from scipy import stats  # noqa: PLC0415

    values = np.asarray(values, dtype=float)
    s = values.size
    mean = float(values.mean()) if s else float("nan")
    sd = float(values.std(ddof=1)) if s > 1 else float("nan")
    w = None if within is None or np.isnan(within).any() else float(np.mean(within))
    if s == 0:
        var, df, source = float("nan"), np.inf, "none"
    elif s > 1 and (w is None or sd ** 2 > w):
        var, df, source = sd ** 2 / s, s - 1, "seeds"
    elif w is not None:
        var, df, source = w / s, np.inf, "test units"
    else:
        var, df, source = float("nan"), np.inf, "none"
    q = stats.norm.ppf(0.5 + level / 2) if np.isinf(df) else stats.t.ppf(0.5 + level / 2, df)
    half = q * np.sqrt(var) if np.isfinite(var) else float("nan")
    return {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "n_seeds": int(s),
            "interval_from": source}


def _within_var(reps: Iterable[np.ndarray | None]) -> np.ndarray | None:
    out = [np.nanvar(r, ddof=1) if r is not None and np.isfinite(r).sum() > 1 else np.nan for r in reps]
    return None if all(np.isnan(out)) else np.array(out)


def summarize(df: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """One row per (task, dataset, split scheme, model, variant, metric): ``n_seeds``, ``mean``,
    ``sd`` over seeds, the ``level`` interval (``ci_low``, ``ci_high``), ``interval_from`` (seeds /
    test units / none), ``unit`` (what the within-split bootstrap resampled: cells, queries, or ''
    for embedding metrics), and ``model_kind``, ``higher_is_better``."""
    rows = overall(df)
    cols = [*SUMMARY_KEYS, "model_kind", "higher_is_better", "n_seeds", "mean", "sd", "ci_low", "ci_high",
            "interval_from", "unit"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for key, g in rows.groupby(SUMMARY_KEYS, sort=True):
        res = combine(g["value"].to_numpy(), _within_var(g["replicates"]), level)
        units = sorted(set(g["unit"]) - {""})
        out.append({**dict(zip(SUMMARY_KEYS, key)), "model_kind": g["model_kind"].iloc[0],
                    "higher_is_better": bool(g["higher_is_better"].iloc[0]), **res,
                    "unit": ", ".join(units)})
    return pd.DataFrame(out)[cols]


def primary_metric(task_id: str) -> str:
    """The metric that picks a task's best baseline: the tuned test metric, else its first headline."""
    task = tasks.get(task_id)
    return task.tuning.report_metric if task.tuning else task.headline_metrics[0]


def best_baselines(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (task, dataset, scheme): the baseline with the best mean :func:`primary_metric` among the
    tuned baselines, or among all baselines where none was tuned (``reference_variant`` says which)."""
    cols = [*CELL, "reference_model", "reference_variant", "reference_tuned"]
    out = []
    for key, g in summary.groupby(CELL, sort=True):
        g = g[(g["model_kind"] == "baseline") & (g["metric_id"] == primary_metric(key[0]))]
        if g.empty:
            continue
        tuned = g[g["variant"] == "tuned"]
        pool = tuned if not tuned.empty else g
        best = pool.sort_values(["mean", "model_id", "variant"], ascending=[not pool["higher_is_better"].iloc[0],
                                                                            True, True]).iloc[0]
        out.append({**dict(zip(CELL, key)), "reference_model": best["model_id"],
                    "reference_variant": best["variant"], "reference_tuned": not tuned.empty})
    return pd.DataFrame(out, columns=cols)


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, level: float = LEVEL) -> dict:
    """``a`` − ``b`` for two entries' rows of one metric on one (dataset, scheme), paired by seed
    (the rows of :func:`overall`): mean, sd, interval, n_seeds, interval_from."""
    a, b = a.set_index("seed"), b.set_index("seed")
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        return combine(np.empty(0), None, level)
    diffs, within = [], []
    for s in seeds:
        ra, rb = a.at[s, "replicates"], b.at[s, "replicates"]
        diffs.append(a.at[s, "value"] - b.at[s, "value"])
        if ra is None or rb is None:
            within.append(np.nan)
        elif ra.size == rb.size and a.at[s, "n_units"] == b.at[s, "n_units"] and a.at[s, "unit"] == b.at[s, "unit"]:
            within.append(np.nanvar(ra - rb, ddof=1))  # same resamples: paired
        else:
            within.append(np.nanvar(ra, ddof=1) + np.nanvar(rb, ddof=1))
    within = np.array(within)
    return combine(np.array(diffs), None if np.isnan(within).all() else within, level)


def verdict(low: float, high: float, higher_is_better: bool, margin: float = 0.0) -> str:
    """better / worse / indistinguishable for a difference interval [low, high] of A − B."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "indistinguishable"
    if higher_is_better:
        return "better" if low > margin else "worse" if high < -margin else "indistinguishable"
    return "better" if high < -margin else "worse" if low > margin else "indistinguishable"


def compare(df: pd.DataFrame, task_id: str, level: float = LEVEL, metric_id: str | None = None) -> pd.DataFrame:
    """Every entry of a task against the best tuned baseline of each (dataset, scheme)
    (:func:`best_baselines`) and against its own default variant, on ``metric_id`` (default the
    task's :func:`primary_metric`): one row per (dataset, scheme, entry, against) with the two
    means, the paired difference (A − B) and its interval, and the verdict."""
    metric_id = metric_id or primary_metric(task_id)
    cols = [*CELL, *ENTRY, "model_kind", "metric_id", "against", "against_model", "against_variant", "value",
            "against_value", "difference", "ci_low", "ci_high", "n_seeds", "interval_from", "verdict"]
    every = overall(df[df["task"] == task_id])
    rows = every[every["metric_id"] == metric_id]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    # the reference is the best baseline on the task's primary metric, whichever metric is compared
    refs = best_baselines(summarize(every[every["metric_id"] == primary_metric(task_id)], level))
    refs = refs.set_index(CELL)
    out = []
    for key, g in rows.groupby(CELL, sort=True):
        by_entry = {e: r for e, r in g.groupby(ENTRY, sort=True)}
        for (model, variant), r in by_entry.items():
            targets = []
            if key in refs.index:
                ref = refs.loc[key]
                label = "best tuned baseline" if ref["reference_tuned"] else "best baseline (none tuned)"
                targets.append((label, ref["reference_model"], ref["reference_variant"]))
            if variant == "tuned":
                targets.append(("own default", model, "default"))
            for label, ref_model, ref_variant in targets:
                other = by_entry.get((ref_model, ref_variant))
                if other is None or (ref_model, ref_variant) == (model, variant):
                    continue
                res = paired_difference(r, other, level)
                hib = bool(r["higher_is_better"].iloc[0])
                common = res["n_seeds"] > 0
                out.append({**dict(zip(CELL, key)), "model_id": model, "variant": variant,
                            "model_kind": r["model_kind"].iloc[0], "metric_id": metric_id, "against": label,
                            "against_model": ref_model, "against_variant": ref_variant,
                            "value": float(r["value"].mean()), "against_value": float(other["value"].mean()),
                            "difference": res["mean"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
                            "n_seeds": res["n_seeds"], "interval_from": res["interval_from"],
                            "verdict": verdict(res["ci_low"], res["ci_high"], hib) if common else "no common seeds"})
    return pd.DataFrame(out, columns=cols)


# --- ranks ------------------------------------------------------------------------------------


def coverage(df: pd.DataFrame, task_id: str) -> pd.Series:
    """Each entry's cells: the frozenset of (dataset, scheme, seed) where it has an ``ok`` overall
    value (indexed by model_id, variant)."""
    rows = overall(df[df["task"] == task_id])
    return rows.groupby(ENTRY, sort=True).apply(
        lambda g: frozenset(zip(g["dataset_id"], g["scheme"], g["seed"])), include_groups=False)


def comparable_groups(df: pd.DataFrame, task_id: str) -> list[tuple[frozenset, list[tuple[str, str]]]]:
    """Groups of entries ranked like with like: one per distinct coverage (:func:`coverage`), with
    every entry that covers at least those cells, the widest coverage first. The first one is the
    main ranking; an entry with fewer cells (a tuned variant run on fewer datasets, a model that
    failed on one) is ranked, with everyone who covers its cells, only on those."""
    cov = coverage(df, task_id)
    groups = []
    for cells in sorted(set(cov), key=lambda c: (-len(c), -sum(c2 >= c for c2 in cov), sorted(c))):
        members = [e for e, c in cov.items() if c >= cells]
        groups.append((cells, members))
    return groups


def rank_draws(df: pd.DataFrame, task_id: str, entries: list[tuple[str, str]], cells: frozenset,
               draws: int = RANK_DRAWS, seed: int = 0) -> tuple[pd.Series, np.ndarray]:
    """The mean rank of each entry on ``cells`` (ranked per dataset, split and seed on every metric,
    averaged over metrics and then over cells, as the ranking table does), and ``draws`` redrawn
    mean ranks (entries x draws): per (dataset, scheme), seeds with replacement and one resample
    per seed shared by every entry."""
    from scipy.stats import rankdata  # noqa: PLC0415

    rows = overall(df[df["task"] == task_id])
    keys = list(zip(rows["model_id"], rows["variant"]))
    rows = rows[[k in set(entries) for k in keys]]
    rows = rows[[c in cells for c in zip(rows["dataset_id"], rows["scheme"], rows["seed"])]]
    index = {e: i for i, e in enumerate(entries)}
    blocks = sorted({(d, s) for d, s, _ in cells})
    point, drawn = [], []
    for block in blocks:
        seeds = sorted(s for d, sc, s in cells if (d, sc) == block)
        b_rows = rows[(rows["dataset_id"] == block[0]) & (rows["scheme"] == block[1])]
        metrics = sorted(b_rows["metric_id"].unique())
        # values[metric, entry, seed] and replicates[metric, entry, seed, r]
        n_rep = max([r.size for r in b_rows["replicates"] if r is not None] or [1])
        vals = np.full((len(metrics), len(entries), len(seeds)), np.nan)
        reps = np.full((len(metrics), len(entries), len(seeds), n_rep), np.nan)
        sign = np.ones(len(metrics))
        for (m, e0, e1, s), r in b_rows.set_index(["metric_id", "model_id", "variant", "seed"]).iterrows():
            i, j, k = metrics.index(m), index[(e0, e1)], seeds.index(s)
            vals[i, j, k] = r["value"]
            reps[i, j, k] = r["replicates"] if r["replicates"] is not None and r["replicates"].size == n_rep \
                else r["value"]
            sign[i] = 1.0 if r["higher_is_better"] else -1.0
        # rank per seed (1 = best) on every metric, mean over metrics, then over seeds
        point.append(_mean_rank(-sign[:, None, None] * vals, rankdata).mean(axis=1))
        rng = _rng(seed, task_id, *block)
        pick_seed = rng.integers(0, len(seeds), size=(draws, len(seeds)))
        pick_rep = rng.integers(0, n_rep, size=(draws, len(seeds)))
        sample = reps[:, :, pick_seed, pick_rep]  # metric, entry, draw, seed
        sample = np.where(np.isnan(sample), vals[:, :, pick_seed], sample)
        drawn.append(_mean_rank(-sign[:, None, None, None] * sample, rankdata).mean(axis=2))
    mean_rank = pd.Series(np.mean(point, axis=0), index=pd.MultiIndex.from_tuples(entries, names=ENTRY))
    return mean_rank, np.mean(drawn, axis=0)


def _mean_rank(scores: np.ndarray, rankdata) -> np.ndarray:
    """Ranks over entries (axis 1; smaller score = better = rank 1; NaN unranked), averaged over
    metrics (axis 0) where present."""
    ranks = rankdata(scores, axis=1, nan_policy="omit")
    with np.errstate(invalid="ignore"):
        return np.nanmean(ranks, axis=0)


def rank_intervals(df: pd.DataFrame, task_id: str, level: float = LEVEL, draws: int = RANK_DRAWS,
                   seed: int = 0) -> pd.DataFrame:
    """Every comparable group's ranks (:func:`comparable_groups`): ``group`` (1 = the main ranking),
    its ``n_cells`` (dataset, split, seed), each entry's ``mean_rank`` and its ``rank_low`` /
    ``rank_high`` interval over redrawn tables (:func:`rank_draws`)."""
    cols = ["group", "n_cells", "datasets", *ENTRY, "mean_rank", "rank_low", "rank_high"]
    out = []
    for g, (cells, members) in enumerate(comparable_groups(df, task_id), start=1):
        if len(members) < 2:
            continue
        mean_rank, drawn = rank_draws(df, task_id, members, cells, draws, seed)
        lo, hi = np.nanpercentile(drawn, [50 * (1 - level), 50 * (1 + level)], axis=1)
        datasets = ", ".join(sorted({d for d, _, _ in cells}))
        for i, e in enumerate(members):
            out.append({"group": g, "n_cells": len(cells), "datasets": datasets, "model_id": e[0],
                        "variant": e[1], "mean_rank": float(mean_rank[e]), "rank_low": float(lo[i]),
                        "rank_high": float(hi[i])})
    return pd.DataFrame(out, columns=cols)


def multi_dataset_tests(df: pd.DataFrame, task_id: str) -> dict:
    """Across the (dataset, scheme) blocks of the main comparable group, controls left out (they
    are there to bracket the others, not to be tested): the Friedman test of the entries' per-block
    mean ranks (``friedman_stat``, ``friedman_p``), and each entry against the
    best-ranked one by a Wilcoxon signed-rank test over blocks, Holm-corrected (``posthoc``: a
    frame). With fewer than 2 blocks or 3 entries there is no test (``reason`` says why)."""
    from scipy import stats  # noqa: PLC0415
    from statsmodels.stats.multitest import multipletests  # noqa: PLC0415

    controls = set(map(tuple, df.loc[df["model_kind"] == "control", ENTRY].drop_duplicates().to_numpy()))
    groups = [(cells, [e for e in members if e not in controls])
              for cells, members in comparable_groups(df, task_id)]
    empty = pd.DataFrame(columns=[*ENTRY, "against", "n_blocks", "statistic", "p", "p_holm", "significant"])
    if not groups:
        return {"reason": "no results", "posthoc": empty}
    cells, members = groups[0]
    blocks = sorted({(d, s) for d, s, _ in cells})
    if len(blocks) < 2 or len(members) < 3:
        return {"reason": f"{len(blocks)} dataset/split blocks and {len(members)} entries: a test needs at "
                          "least 2 blocks and 3 entries", "posthoc": empty}
    per_block = np.array([rank_draws(df, task_id, members, frozenset(c for c in cells if c[:2] == b),
                                     draws=1)[0].to_numpy() for b in blocks])  # blocks x entries
    stat, p = stats.friedmanchisquare(*per_block.T)
    best = int(np.argmin(per_block.mean(axis=0)))
    rows = []
    for i, e in enumerate(members):
        if i == best:
            continue
        diff = per_block[:, i] - per_block[:, best]
        res = stats.wilcoxon(diff, zero_method="zsplit") if np.any(diff != 0) else None
        rows.append({"model_id": e[0], "variant": e[1], "against": "/".join(members[best]),
                     "n_blocks": len(blocks), "statistic": float(res.statistic) if res else float("nan"),
                     "p": float(res.pvalue) if res else 1.0})
    post = pd.DataFrame(rows)
    if not post.empty:
        reject, p_holm, _, _ = multipletests(post["p"].to_numpy(), alpha=1 - LEVEL, method="holm")
        post["p_holm"], post["significant"] = p_holm, reject
    return {"friedman_stat": float(stat), "friedman_p": float(p), "n_blocks": len(blocks),
            "n_entries": len(members), "best": "/".join(members[best]), "posthoc": post, "reason": ""}
