"""The plug-in's side of a sandboxed run (:mod:`cellarena.run.sandbox`): ``python -m
cellarena.run.child``, started by the runner with the plug-ins' folders and nothing else of the job.

It starts as the **host**: it imports the libraries the job's plug-ins import (numpy, anndata, torch,
...; never a plug-in's own code), then waits. For each model run the runner asks it to fork, and the
forked process — a fresh copy of the host, with none of another run's state — serves that run
alone: it reads requests from its own socket, answers there, and keeps the plug-in instances the
runner asks for. Forking costs milliseconds where starting a Python with those imports costs
seconds, and a crash, an exit or a time-out ends one run's process, never the host or the runner.
The host also ends a run's process on request (at the time limit) and reports how it ended and its
peak memory.

The host moves its standard input and output off file descriptors 0 and 1 at start, so a plug-in's
``print`` goes to the job's log and cannot garble the protocol. What a run's process receives is the
model's view only: the runner sends the data the plug-in may see, never a path to the prepared file.

Requests are pickled tuples from the runner (trusted). Answers are a JSON header, then, for an array
result, the array in NumPy's ``.npy`` format without pickled objects; an array of Python objects
(labels with a ``None`` among them) travels as JSON. The runner never unpickles what comes back.
"""

from __future__ import annotations

import ctypes
import importlib
import io
import json
import os
import pickle
import shutil
import signal
import socket
import sys
import time
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


def serve(requests: Connection, answers: Connection) -> int:
    """One run's process: answer the runner's requests until it says ``exit`` or goes away."""
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


def preload(modules: list[str]) -> list[str]:
    """Import the installed libraries the job's plug-ins name, so that each run's process starts with
    them; returns those that imported. A library that fails to import is the plug-in's to report."""
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001  (a library's SystemExit at import included)
            continue
        loaded.append(name)
    return loaded


def _die_with_parent() -> None:
    """A run's process is killed when the host ends, however it ends (Linux ``PR_SET_PDEATHSIG``)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fork(channel: socket.socket, conn: Connection) -> tuple[int, socket.socket]:
    """Fork a run's process, connected to a new socket pair. Returns (its process id, the end of the
    pair the runner gets); the child never returns from here, and holds nothing of the host's channel."""
    ours, theirs = socket.socketpair()
    host_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the run's process: its own session (killed as a group), dies with the host
        code = 1
        try:
            os.setsid()
            _die_with_parent()
            if os.getppid() != host_pid:
                os._exit(1)
            channel.close()
            conn.close()
            theirs.close()
            conn = Connection(ours.detach())
            code = serve(conn, conn)
        except BaseException:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
        finally:
            os._exit(code)
    ours.close()
    return pid, theirs


def _ended(pid: int, grace: float = 0.0) -> dict:
    """End a run's process: wait up to ``grace`` seconds for it to end by itself, else kill it; then
    kill whatever it started (its session's process group). How it ended and its peak memory."""
    deadline = time.monotonic() + grace
    done, status, usage = 0, 0, None
    try:
        while not done and time.monotonic() < deadline:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if not done:
                time.sleep(0.01)
        for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                target()
                break
            except (ProcessLookupError, PermissionError):
                continue
        if not done:
            _pid, status, usage = os.wait4(pid, 0)
    except ChildProcessError:
        return {"returncode": None, "maxrss_kb": 0}
    return {"returncode": os.waitstatus_to_exitcode(status), "maxrss_kb": int(usage.ru_maxrss)}


def host(channel: socket.socket, setup: dict) -> int:
    """The host's loop: ``fork`` a run's process, ``end`` one (killed or awaited), ``exit``."""
    conn = Connection(os.dup(channel.fileno()))
    loaded = preload(list(setup.get("preload", ())))
    conn.send_bytes(json.dumps({"ok": True, "pid": os.getpid(), "preloaded": loaded}).encode())
    running: set[int] = set()
    try:
        while True:
            try:
                op, payload = pickle.loads(conn.recv_bytes())
            except EOFError:  # the runner went away
                return 0
            if op == "fork":
                pid, theirs = _fork(channel, conn)
                running.add(pid)
                conn.send_bytes(json.dumps({"ok": True, "pid": pid}).encode())
                socket.send_fds(channel, [b"\0"], [theirs.fileno()])
                theirs.close()
            elif op == "end":
                running.discard(payload["pid"])
                conn.send_bytes(json.dumps(dict(_ended(payload["pid"], payload["grace"]), ok=True)).encode())
            elif op == "exit":
                conn.send_bytes(json.dumps({"ok": True}).encode())
                return 0
            else:
                conn.send_bytes(json.dumps({"ok": False, "text": f"unknown request {op!r}"}).encode())
    finally:
        for pid in running:
            _ended(pid)


def main() -> int:
    channel = socket.socket(fileno=os.dup(0))  # the runner's socket, on stdin and stdout
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # the plug-in's prints go to the job's log
    first = Connection(os.dup(channel.fileno()))
    try:
        op, setup = pickle.loads(first.recv_bytes())
    except EOFError:
        return 0
    if op != "host":
        first.send_bytes(json.dumps({"ok": False, "text": f"expected a host request, got {op!r}"}).encode())
        return 2
    return host(channel, setup)


if __name__ == "__main__":
    sys.exit(main())
