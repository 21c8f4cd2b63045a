"""The plug-in's side of a sandboxed run (:mod:`cellarena.run.sandbox`): ``python -m
cellarena.run.child``, started by the runner with the plug-in's folder and nothing else of the job.

It reads requests from its standard input, answers on its standard output (both moved off file
descriptors 0 and 1 at start, so a plug-in's ``print`` goes to the job's log and cannot garble the
protocol) and keeps the plug-in instances the runner asks for. What it receives is the model's view
only: the runner sends the data the plug-in may see, never a path to the prepared file.

Requests are pickled tuples from the runner (trusted). Answers are a JSON header, then, for an array
result, the array in NumPy's ``.npy`` format without pickled objects; an array of Python objects
(labels with a ``None`` among them) travels as JSON. The runner never unpickles what comes back.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path


def _json_safe(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def encode_result(value) -> tuple[dict, bytes | None]:
    """A plug-in's return value as (header fields, npy bytes or None)."""
    import numpy as np  # noqa: PLC0415

    if value is None:
        return {"kind": "none"}, None
    arr = np.asarray(value)
    if arr.dtype.kind == "O":
        return {"kind": "json", "value": _json_safe(arr.tolist()), "shape": list(arr.shape)}, None
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return {"kind": "npy"}, buf.getvalue()


def _error(exc: BaseException, model_dir: Path) -> dict:
    from cellarena.errors import CellarenaError, NotApplicable  # noqa: PLC0415

    if isinstance(exc, SystemExit):
        text = f"the plug-in called sys.exit({exc.code!r}); a plug-in must return or raise, never exit"
    else:
        text = str(exc)
    where = ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve().is_relative_to(model_dir.resolve())]
    if frames:
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}"
    return {"ok": False, "type": type(exc).__name__, "text": text,
            "message": exc.message if isinstance(exc, CellarenaError) else text,
            "fix": exc.fix if isinstance(exc, CellarenaError) else None,
            "not_applicable": isinstance(exc, NotApplicable), "where": where,
            "traceback": "".join(traceback.format_exception(exc))}


class Worker:
    """The plug-in instances of one sandboxed run, by handle."""

    def __init__(self, setup: dict):
        from threadpoolctl import threadpool_limits  # noqa: PLC0415

        self.setup = setup
        self.model_dir = Path(setup["model_dir"])
        self.work_dir = Path(setup["work_dir"])
        self.instances: dict[int, tuple[object, Path]] = {}
        self._limits = threadpool_limits(int(setup["threads"]))  # held for the child's whole life
        self.device = self._device(setup["device"])

    @staticmethod
    def _device(requested: str) -> str:
        """The device as the row records it: ``cpu`` or ``cuda:<GPU name>``."""
        if requested != "cuda":
            return "cpu"
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for, but torch sees no GPU on this machine")
        return f"cuda:{torch.cuda.get_device_name(0)}"

    def new(self, handle: int, params: dict) -> dict:
        from cellarena.cards.model import load_plugin  # noqa: PLC0415
        from cellarena.plugin import BaseModel, RunContext, seed_everything  # noqa: PLC0415
        from cellarena.run.sandbox import METHODS  # noqa: PLC0415

        s = self.setup
        work = self.work_dir / f"instance-{handle}"
        work.mkdir(parents=True, exist_ok=True)
        seed_everything(int(s["seed"]))
        cls = load_plugin(self.model_dir)
        ctx = RunContext(seed=int(s["seed"]), threads=int(s["threads"]),
                         device="cuda" if self.device.startswith("cuda") else "cpu", work_dir=work,
                         checkpoint=Path(s["checkpoint"]) if s.get("checkpoint") else None,
                         checkpoints_dir=Path(s["checkpoints_dir"]) if s.get("checkpoints_dir") else None)
        self.instances[handle] = (cls(params, ctx), work)
        implements = [m for m in METHODS if getattr(cls, m) is not getattr(BaseModel, m)]
        return {"implements": implements}

    def call(self, handle: int, method: str, args: tuple, kwargs: dict) -> tuple[dict, bytes | None]:
        model, _work = self.instances[handle]
        header, payload = encode_result(getattr(model, method)(*args, **kwargs))
        return dict(header, runtime=_json_safe(model.context.runtime)), payload

    def drop(self, handle: int) -> dict:
        model, work = self.instances.pop(handle)
        runtime = _json_safe(model.context.runtime)
        del model
        shutil.rmtree(work, ignore_errors=True)
        return {"runtime": runtime}


def main() -> int:
    requests = Connection(os.dup(0), writable=False)
    answers = Connection(os.dup(1), readable=False)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # the plug-in's prints go to the job's log
    worker = None
    model_dir = Path(".")
    while True:
        try:
            op, payload = pickle.loads(requests.recv_bytes())
        except EOFError:  # the runner went away
            return 0
        extra = None
        try:
            if op == "start":
                model_dir = Path(payload["model_dir"])
                worker = Worker(payload)
                header = {"device": worker.device, "pid": os.getpid()}
            elif op == "new":
                header = worker.new(*payload)
            elif op == "call":
                header, extra = worker.call(*payload)
            elif op == "drop":
                header = worker.drop(payload)
            elif op == "exit":
                answers.send_bytes(json.dumps({"ok": True}).encode())
                return 0
            else:
                raise ValueError(f"unknown request {op!r}")
            header = dict(header, ok=True, npy=extra is not None)
        except BaseException as exc:  # noqa: BLE001  (sys.exit included: it becomes the run's failure)
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exc(file=sys.stderr)
            header, extra = dict(_error(exc, model_dir), npy=False), None
        answers.send_bytes(json.dumps(header).encode())
        if extra is not None:
            answers.send_bytes(extra)


if __name__ == "__main__":
    sys.exit(main())
