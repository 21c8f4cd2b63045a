"""The tuning record (JSON) that ``cellarena tune`` writes and a tuned run reads."""

from __future__ import annotations

import json
from pathlib import Path

from cellarena.errors import DataError

# what a tuned result row carries in tuning_json: the record without its per-trial list
SUMMARY_KEYS = ("metric", "direction", "objective", "budget", "n_trials", "n_failed_trials", "stopped_by",
                "best_trial", "best_value", "best_params", "default_value", "study", "storage", "tuning_s")


def read_record(path: str | Path) -> dict:
    """A tuning record written by :func:`cellarena.run.tuning.tune`."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read tuning record: {exc}", where=path,
                        fix="re-run `cellarena tune` (or the workflow's tune job) to write it") from None
    for key in ("status", "model_id", "model_version", "dataset_id", "split_id"):
        if key not in record:
            raise DataError(f"tuning record lacks {key!r}", where=path, fix="re-run `cellarena tune`")
    return record


def write_record(record: dict, out: Path) -> None:
    """Write ``record`` to ``out`` atomically."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    tmp.replace(out)


def summary_of(record: dict) -> dict:
    """What a tuned result row carries in ``tuning_json``."""
    return {k: record.get(k) for k in SUMMARY_KEYS if k in record}


def check_record(record: dict, card, info, split) -> None:
    """A tuning record must have been made for this model version, dataset version and split."""
    made = (record.get("model_id"), record.get("model_version"), record.get("dataset_id"),
            record.get("dataset_version"), record.get("split_id"), record.get("split_hash"))
    want = (card.id, card.version, info["dataset_id"], int(info["dataset_version"]), split["split_id"],
            split.get("hash", ""))
    if made != want:
        raise DataError(f"the tuning record was made for {made}, this run is {want}",
                        fix="re-run `cellarena tune` for this model, dataset and split")
