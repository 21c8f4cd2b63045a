"""What a run ran on: Python, the packages that compute scores, the CPU and the accelerator.

Stored with every result row (``environment_json``) so that a score that moved can be traced to a
package upgrade or a different machine, and with the committed reference results.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from importlib import metadata

# Distributions whose version can change a score. A name that is not installed is left out; the
# first installed name of a tuple is recorded (xgboost ships as `xgboost-cpu` on CPU machines).
PACKAGES: tuple[str | tuple[str, ...], ...] = (
    "numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", ("xgboost-cpu", "xgboost"),
    "torch", "scvi-tools", "lightning", "jax", "jaxlib", "scib-metrics", "pynndescent", "numba",
    "igraph", "leidenalg", "harmonypy", "optuna", "safetensors", "snakemake", "flash-attn",
)


def package_versions() -> dict[str, str]:
    out = {}
    for entry in PACKAGES:
        for name in (entry if isinstance(entry, tuple) else (entry,)):
            try:
                out[name] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accelerator() -> dict:
    """The first CUDA device and the CUDA version torch was built with; empty without one."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    return {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
            "n_gpus": torch.cuda.device_count()}


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """The environment of this process (computed once)."""
    try:
        n_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n_usable = os.cpu_count() or 1
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "n_cpus": n_usable,
        "packages": package_versions(),
    }
    env.update(accelerator())
    from cellarena.run.sandbox import isolation_mode  # noqa: PLC0415

    env["isolation"] = isolation_mode()  # what kept test labels from the plug-ins (cellarena/run/sandbox.py)
    return env


def environment_json() -> str:
    return json.dumps(environment(), sort_keys=True)


def differences(reference: dict, current: dict) -> list[tuple[str, str, str]]:
    """(what, reference value, current value) for every entry that differs, packages flattened."""
    def flat(env: dict) -> dict:
        out = {k: str(v) for k, v in env.items() if k != "packages"}
        out.update({f"package {k}": str(v) for k, v in env.get("packages", {}).items()})
        return out

    a, b = flat(reference), flat(current)
    return [(k, a.get(k, "—"), b.get(k, "—")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
