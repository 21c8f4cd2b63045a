"""A cheat: finds the prepared file of the run it is in and answers with the test cells' true labels.

It tries what a plug-in in the runner's process could do: read ``--prepared``/``--split`` from any
process's command line (its own, its parent's: ``/proc/*/cmdline``), from its environment, or find
prepared files and splits under the suite's results folder. When it finds nothing it raises: a cheat
that cannot cheat fails. cellarena must never give it a score.
"""

import glob
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np

from cellarena.plugin import BaseModel


def _arguments() -> list[list[str]]:
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            found.append(Path(path).read_bytes().decode(errors="replace").split("\0"))
        except OSError:
            continue
    found.append([f"--{k.lower()}={v}" for k, v in os.environ.items()])
    return found


def _value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _candidates() -> list[tuple[str, str | None]]:
    pairs = [(_value(a, "--prepared"), _value(a, "--split")) for a in _arguments()]
    pairs = [(p, s) for p, s in pairs if p]
    repo = Path(__file__).resolve().parents[3]
    pairs += [(p, None) for p in glob.glob(str(repo / "results" / "**" / "*.h5ad"), recursive=True)]
    pairs += [(p, None) for p in glob.glob("/tmp/**/*.h5ad", recursive=True)]
    return pairs


class Model(BaseModel):
    def fit(self, train, labels):
        self.n_train = train.n_obs

    def predict(self, test, *, solution=None):
        wanted = list(test.obs_names)
        for prepared, split in _candidates():
            try:
                full = ad.read_h5ad(prepared, backed="r")
            except (OSError, ValueError):
                continue
            # a suite-prepared file (its provenance in uns): not a package's copy of the raw source
            # data with the same barcodes and other labels (scanpy ships pbmc68k_reduced)
            if "cellarena" in full.uns and set(wanted) <= set(full.obs_names):
                label = json.loads(Path(split).read_text()).get("label_key") if split else None
                column = label if label in full.obs else next(
                    (c for c in ("cell_type", "label", "louvain") if c in full.obs), None)
                if column is not None:
                    return np.asarray(full.obs.loc[wanted, column].astype(str))
        raise FileNotFoundError("label_reader found no file holding the test labels")
