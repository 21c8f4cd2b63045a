"""Verdicts of published claims (``claims/<id>.yaml``) from the results table.

Each test of a claim (:class:`cellarena.cards.claim.Test`: the original, and the offline proxy) is
a list of comparisons ``A <relation> B``; each comparison is judged on every dataset and split
scheme of the test from the paired difference ``A − B`` (the metric's direction respected: positive
= A better) and its 95 % interval (:func:`cellarena.analysis.intervals.paired_difference`):

=============  ==================================  ===============================  ==============
relation       reproduced when the interval is     not reproduced when it is        else
=============  ==================================  ===============================  ==============
greater        above +margin                       below +margin                    inconclusive
less           below −margin                       above −margin                    inconclusive
equivalent     inside [−margin, +margin]           entirely outside it              inconclusive
at_least       above −margin                       below −margin                    inconclusive
at_most        below +margin                       above +margin                    inconclusive
=============  ==================================  ===============================  ==============

A test's ``metric`` is a metric id of the results table or one of the composite scores papers
report (:data:`DERIVED`), computed here per run (dataset, split, seed, model, variant) from the
table's own values:

- ``avg_bio``: the mean of ``nmi``, ``ari`` and ``silhouette_label`` (AvgBIO, as in the scGPT paper
  and Kedzierska et al. 2025), for a run that has all three;
- ``mean_scaled``: the mean over the task's metrics of each value scaled between the controls run on
  the same dataset, split and seed (0 = worst control, 1 = best;
  :func:`cellarena.leaderboard.data.scale_by_controls`), the shape of OpenProblems' mean score, for
  a run with a scaled value for every metric that its (dataset, split, seed) scales. Not clipped.

A composite has no resampled replicates (its parts are embedding metrics, which have none), so its
interval comes from the seeds.

A test is ``reproduced`` when every check is, ``not reproduced`` when any check is, else
``inconclusive``. It is ``not run`` — with the reason — when a dataset is not in the table (it needs
the network or another plan), when a model has no ``ok`` result there (its checkpoint is absent, it
failed: the rows' own reason is given), or when fewer seeds than the test's ``min_seeds`` ran.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellarena.analysis import intervals
from cellarena.cards.claim import AVG_BIO_PARTS, DERIVED, Claim, Comparison, Test

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")
CHECK_COLUMNS = ["claim_id", "test", "dataset_id", "scheme", "a", "relation", "b", "margin", "metric_id",
                 "a_value", "b_value", "difference", "ci_low", "ci_high", "n_seeds", "verdict", "reason"]
SUMMARY_COLUMNS = ["claim_id", "claim", "source", "test", "verdict", "reason", "original_numbers", "rerun_numbers"]


RUN_KEYS = ["task", "dataset_id", "split_id", "seed", "model_id", "variant"]


def _composite(parts: pd.DataFrame, values: pd.Series, metric: str) -> pd.DataFrame:
    """One ``ok`` overall row per run key of ``values`` (a Series indexed by :data:`RUN_KEYS`),
    carrying the run's other columns from ``parts`` (its first metric's row)."""
    first = parts.drop_duplicates(RUN_KEYS).set_index(RUN_KEYS)
    out = first.loc[values.index].reset_index()
    out["metric_id"], out["value"], out["higher_is_better"] = metric, values.to_numpy(), True
    out["metric_group"], out["bootstrap_json"] = "", "{}"
    return out


def metric_rows(table: pd.DataFrame, task: str, metric: str) -> pd.DataFrame:
    """The rows of ``metric`` on ``task``: the table's own, or a composite of :data:`DERIVED`
    computed per run (module docstring)."""
    rows = table[table["task"] == task]
    if metric not in DERIVED:
        return rows[rows["metric_id"] == metric]
    ok = rows[(rows["status"] == "ok") & (rows["subgroup"] == "")]
    if metric == "avg_bio":
        parts = ok[ok["metric_id"].isin(AVG_BIO_PARTS)]
        per_run = parts.groupby(RUN_KEYS, sort=True)["value"]
        values = per_run.mean()[per_run.count() == len(AVG_BIO_PARTS)]
        return _composite(parts, values, metric)
    from cellarena.leaderboard.data import SCALED, scale_by_controls  # noqa: PLC0415

    scaled = scale_by_controls(rows)
    scaled = scaled[(scaled["subgroup"] == "") & (scaled["scale_status"] == SCALED)]
    per_run = scaled.groupby(RUN_KEYS, sort=True)["scaled"]
    # every metric its (dataset, split, seed) scales: a run missing one has no mean score
    expected = scaled.groupby(["task", "dataset_id", "split_id", "seed"])["metric_id"].nunique()
    have = per_run.count()
    full = have.to_numpy() == expected.reindex(have.index.droplevel(["model_id", "variant"])).to_numpy()
    return _composite(scaled, per_run.mean()[full], metric)


def judge(relation: str, low: float, high: float, margin: float) -> str:
    """The verdict of one comparison from the interval [low, high] of A − B (positive = A better)."""
    if relation == "greater":
        return "reproduced" if low > margin else "not reproduced" if high < margin else "inconclusive"
    if relation == "less":
        return "reproduced" if high < -margin else "not reproduced" if low > -margin else "inconclusive"
    if relation == "equivalent":
        if low >= -margin and high <= margin:
            return "reproduced"
        return "not reproduced" if high < -margin or low > margin else "inconclusive"
    if relation == "at_least":
        return "reproduced" if low >= -margin else "not reproduced" if high < -margin else "inconclusive"
    if relation == "at_most":
        return "reproduced" if high <= margin else "not reproduced" if low > margin else "inconclusive"
    raise ValueError(f"unknown relation {relation!r}")


def _entry_rows(rows: pd.DataFrame, model: str, variant: str) -> pd.DataFrame:
    return rows[(rows["model_id"] == model) & (rows["variant"] == variant)]


def _missing_reason(table: pd.DataFrame, test: Test, dataset: str, model: str, variant: str) -> str:
    """Why an entry has no ok value on a dataset: its rows' status and reason, or that it did not run."""
    runs = table[(table["task"] == test.task) & (table["dataset_id"] == dataset) & (table["model_id"] == model)
                 & (table["variant"] == variant)]
    if runs.empty:
        return f"{model} ({variant}) was not run on {dataset} in this table"
    if (runs["status"] == "ok").all():  # a composite whose parts are incomplete
        return f"{model} ({variant}) on {dataset} has no {test.metric} value (not every part it needs is there)"
    status = runs[runs["status"] != "ok"].drop_duplicates("status_reason")
    first = status.iloc[0]
    return f"{model} ({variant}) on {dataset}: {first['status']}: {str(first['status_reason'])[:300]}"


def _check(base: dict, test: Test, comp: Comparison, a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """One comparison on one dataset and split scheme (``base``: the row's keys) from its rows."""
    res = intervals.paired_difference(a, b)
    hib = bool(a["higher_is_better"].iloc[0])
    sign = 1.0 if hib else -1.0  # positive = A better, whatever the metric's direction
    low, high = sorted((sign * res["ci_low"], sign * res["ci_high"]))
    row = {**base, "a_value": float(a["value"].mean()), "b_value": float(b["value"].mean()),
           "difference": sign * res["mean"], "ci_low": low, "ci_high": high, "n_seeds": res["n_seeds"]}
    if res["n_seeds"] < test.min_seeds:
        return {**row, "verdict": "not run",
                "reason": f"{res['n_seeds']} paired seed(s) on {base['dataset_id']} · {base['scheme']}; the test "
                          f"needs {test.min_seeds}"}
    if not (np.isfinite(low) and np.isfinite(high)):
        return {**row, "verdict": "inconclusive", "reason": "no interval (one seed and no resampled test units)"}
    return {**row, "verdict": judge(comp.relation, low, high, comp.margin), "reason": ""}


def check_test(table: pd.DataFrame, claim_id: str, which: str, test: Test) -> pd.DataFrame:
    """One row per (comparison, dataset, split scheme) of ``test``: the numbers and the verdict; a
    dataset or an entry without ok results gives one ``not run`` row with the reason."""
    rows = intervals.overall(metric_rows(table, test.task, test.metric))
    out = []
    for comp in test.comparisons:
        for dataset in test.datasets:
            base = {"claim_id": claim_id, "test": which, "dataset_id": dataset, "scheme": "", "a": comp.a.label,
                    "relation": comp.relation, "b": comp.b.label, "margin": comp.margin, "metric_id": test.metric}
            if not ((table["task"] == test.task) & (table["dataset_id"] == dataset)).any():
                out.append({**base, "verdict": "not run", "reason": f"dataset {dataset} is not in this results "
                                                                    f"table{': ' + test.needs if test.needs else ''}"})
                continue
            on = rows[rows["dataset_id"] == dataset]
            if test.schemes:
                on = on[on["scheme"].isin(test.schemes)]
            a, b = _entry_rows(on, comp.a.model, comp.a.variant), _entry_rows(on, comp.b.model, comp.b.variant)
            missing = [e for e, r in ((comp.a, a), (comp.b, b)) if r.empty]
            if missing:
                reason = "; ".join(_missing_reason(table, test, dataset, e.model, e.variant) for e in missing)
                out.append({**base, "verdict": "not run", "reason": reason})
                continue
            for scheme in sorted(set(a["scheme"]) & set(b["scheme"])):
                out.append(_check({**base, "scheme": scheme}, test, comp, a[a["scheme"] == scheme],
                                  b[b["scheme"] == scheme]))
    out = pd.DataFrame(out, columns=CHECK_COLUMNS)
    return out.astype({"n_seeds": "Int64"})  # no seeds where the test did not run


def combine(checks: pd.DataFrame) -> tuple[str, str]:
    """A test's verdict from its checks, and the reason when it is not reproduced / not run."""
    if checks.empty:
        return "not run", "no comparison could be made"
    verdicts = set(checks["verdict"])
    if "not run" in verdicts:
        return "not run", "; ".join(dict.fromkeys(checks.loc[checks["verdict"] == "not run", "reason"]))
    if "not reproduced" in verdicts:
        bad = checks[checks["verdict"] == "not reproduced"]
        return "not reproduced", "; ".join(f"{r.a} vs {r.b} on {r.dataset_id} · {r.scheme}: "
                                           f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
                                           for r in bad.itertuples())
    if "inconclusive" in verdicts:
        return "inconclusive", "the interval of at least one comparison straddles its margin"
    return "reproduced", ""


def _rerun_numbers(checks: pd.DataFrame) -> str:
    ok = checks.dropna(subset=["a_value"]) if "a_value" in checks else checks.iloc[:0]
    if ok.empty:
        return ""
    means = {}
    for r in ok.itertuples():
        means.setdefault(r.a, []).append(r.a_value)
        means.setdefault(r.b, []).append(r.b_value)
    return ", ".join(f"{k} {np.mean(v):.3f}" for k, v in means.items()) + f" ({ok['metric_id'].iloc[0]})"


def evaluate(table: pd.DataFrame, claims: list[Claim]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary, checks)``: one summary row per (claim, test: original / proxy) with the verdict,
    its reason, the paper's numbers and the re-run's means; every check behind it."""
    summary, checks = [], []
    for claim in claims:
        original = (", ".join(f"{k} {v:g}" for k, v in claim.original_numbers.items())
                    or "no number quoted (a figure)")
        for which, test in (("original", claim.original), ("proxy", claim.proxy)):
            if test is None:
                continue
            rows = check_test(table, claim.id, which, test)
            verdict, reason = combine(rows)
            checks.append(rows)
            summary.append({"claim_id": claim.id, "claim": claim.claim, "source": f"{claim.source.citation} "
                            f"doi:{claim.source.doi} ({claim.source.where})", "test": which, "verdict": verdict,
                            "reason": reason, "original_numbers": f"{original} ({claim.original_metric})",
                            "rerun_numbers": _rerun_numbers(rows)})
    checks = pd.concat(checks, ignore_index=True) if checks else pd.DataFrame(columns=CHECK_COLUMNS)
    return pd.DataFrame(summary, columns=SUMMARY_COLUMNS), checks
