"""Running one job: a model on one split of one dataset for one task.

- :mod:`.setup`: what every run shares (the job, seeding, threads, device, timing, memory,
  provenance, the plug-in's construction);
- :mod:`.checks`: the checks of a plug-in's output, each error carrying its fix;
- one driver per task, named by the task's declaration (cellarena/tasks.py): :mod:`.annotation`,
  :mod:`.embedding` (both embedding tasks; its file format in :mod:`.embedding_file`),
  :mod:`.perturbation`; each exposes ``run(task, job)`` and ``probe(task, job)``;
- :mod:`.tuning` (and the record it writes, :mod:`.tuning_record`), :mod:`.pretrain`, and
  :mod:`.environment` (what a run ran on).
"""

from __future__ import annotations


def run_job(task_id: str, job):
    """Run ``job`` (a :class:`cellarena.run.setup.Job`) for the task ``task_id`` through the task's
    driver and return its long result rows."""
    from cellarena.errors import CellarenaError  # noqa: PLC0415
    from cellarena.tasks import get  # noqa: PLC0415

    task = get(task_id)
    if job.tuning is not None and task.tuning is None:
        raise CellarenaError(f"{task_id} models are not tuned (yet): run them without a tuning record")
    return task.driver_module().run(task, job)


def run_task(task_id: str, prepared, split, model_dir, *, seed: int, **job):
    """:func:`run_job` with the job given as paths and keywords: ``job`` holds the other fields of
    :class:`cellarena.run.setup.Job` (``variant``, ``params``, ``threads``, ``options``,
    ``checkpoint``, ``tuning``, ``datasets_dir``, ``checkpoints_dir``)."""
    from cellarena.run.setup import Job  # noqa: PLC0415

    return run_job(task_id, Job.of(prepared, split, model_dir, seed=seed, **job))
