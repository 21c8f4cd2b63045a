"""Plug-ins run in a child process (:mod:`cellarena.run.child`), with a time limit, on the model's view
of the data only.

The runner keeps the prepared file, the split and the solution; the child gets the plug-in's folder,
its parameters and, call by call, the data the plug-in may see (training cells with their labels,
test cells without). It never receives a path to a file that holds test labels. What this gives:

- **a time limit**: a run that exceeds ``time_limit_s`` is killed (with everything it started) and
  becomes ``failed: timed out after N s``;
- **exits are failures**: ``sys.exit`` inside a plug-in, ``os._exit``, a segfault or the OOM killer
  end the child, not the runner; the run becomes ``failed`` with what happened;
- **no answers on disk** where Debian's ``bubblewrap`` works (user namespaces): the child runs with
  no network, its own process table (it cannot read the runner's command line), a fresh ``/tmp``,
  and the suite's results folder, the data cache, the job's prepared and split files and every
  dataset card's source files hidden. Without bubblewrap the child is a plain process: it is not
  given the labels, but a plug-in that goes looking for the prepared file on disk could read it.
  Each run records which of the two it had (``environment_json``'s ``isolation``), and the runner
  logs a warning when it is only a process.

The data travels pickled from runner to child; answers travel back as JSON and ``.npy`` without
pickled objects, so nothing the plug-in returns can run code in the runner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from cellarena import REPO
from cellarena.errors import NotApplicable
from cellarena.timing import CLOCK

log = logging.getLogger(__name__)

DEFAULT_TIME_LIMIT_S = 7200.0
HOST_START_S = 600.0  # the host imports the plug-ins' libraries before it answers
METHODS = ("fit", "predict", "embed", "held_out_loss", "fit_perturbation", "predict_perturbation")


class PluginError(Exception):
    """What a plug-in raised in the child, as the runner sees it: ``type_name`` and text as the plug-in
    raised them, the suite error's ``fix`` if it carried one, ``where`` (file:line in the plug-in) and
    the child's traceback."""

    def __init__(self, type_name: str, text: str, *, message: str | None = None, fix: str | None = None,
                 where: str = "", remote_traceback: str = ""):
        super().__init__(text)
        self.type_name = type_name
        self.message = message if message is not None else text
        self.fix = fix
        self.where = where
        self.remote_traceback = remote_traceback


class PluginExited(PluginError):
    """The child ended without answering (``os._exit``, a crash, a signal)."""


class PluginTimedOut(PluginError):
    """The run went past its time limit; the child was killed."""


@functools.lru_cache(maxsize=1)
def bubblewrap() -> str | None:
    """Path of a ``bwrap`` that can make the sandbox on this machine, else None."""
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    try:
        ok = subprocess.run([exe, "--ro-bind", "/", "/", "--unshare-all", "--dev", "/dev", "--proc", "/proc",
                             "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return exe if ok else None


def isolation_mode() -> str:
    """``bubblewrap`` or ``process``: what protects the labels in this environment."""
    if os.environ.get("CELLARENA_SANDBOX") == "process":
        return "process"
    return "bubblewrap" if bubblewrap() else "process"


@dataclasses.dataclass(frozen=True)
class Visibility:
    """What the child may see (``readable``: read-only, ``writable``) and what is hidden from it
    (``hidden``: folders or files)."""

    readable: tuple[Path, ...]
    writable: tuple[Path, ...]
    hidden: tuple[Path, ...]


def _under(path: Path, folders) -> bool:
    return any(path == f or path.is_relative_to(f) for f in folders)


def bwrap_args(exe: str, vis: Visibility, *, gpu: bool) -> list[str]:
    """The bubblewrap command line: the root read-only, a fresh /tmp, no network, its own process
    table; then what the child needs, then the hidden places, then what it needs inside those."""
    args = [exe, "--die-with-parent", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc"]
    args += ["--dev-bind", "/dev", "/dev"] if gpu else ["--dev", "/dev"]
    args += ["--tmpfs", "/tmp"]
    hidden = [p for p in vis.hidden if p.exists()]
    hidden_dirs = [p for p in hidden if p.is_dir()]

    def binds(paths_ok) -> list[str]:
        out = []
        for flag, paths in (("--ro-bind", vis.readable), ("--bind", vis.writable)):
            out += [a for p in paths if p.exists() and paths_ok(p) for a in (flag, str(p), str(p))]
        return out

    def masks(paths) -> list[str]:
        return [a for p in paths for a in (("--tmpfs", str(p)) if p.is_dir() else ("--ro-bind", "/dev/null", str(p)))]

    args += binds(lambda p: True)
    args += masks(hidden)
    # what the child needs inside a hidden folder, with what is hidden inside that again
    inside = [p for p in (*vis.readable, *vis.writable) if p.exists() and _under(p, hidden_dirs)]
    args += binds(lambda p: p in inside)
    args += masks([h for h in hidden if any(h != p and h.is_relative_to(p) for p in inside)])
    # a needed folder that holds a hidden file (e.g. the current folder) was bound over its mask
    args += masks([h for h in hidden if h.is_file()])
    return args


def plugin_imports(model_dir: Path) -> list[str]:
    """The installed libraries a plug-in's ``model.py`` imports, read from its source without running
    it (the host imports them before forking: cellarena/run/child.py). The plug-in's own modules and
    anything that is not installed are left out."""
    import ast  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415

    try:
        tree = ast.parse((Path(model_dir) / "model.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    out = []
    for name in dict.fromkeys(names):
        try:
            spec = importlib.util.find_spec(name.split(".")[0])
        except (ImportError, ValueError):
            continue
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or origin.is_relative_to(Path(model_dir).resolve()):
            continue
        out.append(name)
    return out


# What every plug-in's process needs, imported once by the host (torch, where installed, because every
# plug-in instance is made after seeding torch's generator: cellarena/plugin.py's seed_everything).
BASE_IMPORTS = ("numpy", "scipy.sparse", "pandas", "anndata", "threadpoolctl", "torch", "cellarena.plugin",
                "cellarena.cards.model")


class Host:
    """One sandboxed process per job that forks a fresh process for each model run
    (cellarena/run/child.py).

    ``readable``: what the runs may read besides the Python installation and the suite (their
    plug-in folders, checkpoints); ``hidden``: what none of them may see (:func:`answers_on_disk`);
    ``gpu``: the device files are visible; ``preload``: libraries to import before forking. A run
    that kills the host costs itself only: the next run starts a new one.
    """

    def __init__(self, *, readable: tuple[Path, ...] = (), hidden: tuple[Path, ...] = (), gpu: bool = False,
                 preload: tuple[str, ...] = ()):
        self.readable = tuple(dict.fromkeys(Path(p).expanduser().resolve() for p in readable))
        self.hidden = tuple(Path(p).resolve() for p in hidden)
        self.gpu = gpu
        self.preload = tuple(dict.fromkeys((*BASE_IMPORTS, *preload)))
        self.mode = isolation_mode()
        self._proc: subprocess.Popen | None = None
        self._scratch: Path | None = None

    def __enter__(self) -> Host:
        self._scratch = Path(tempfile.mkdtemp(prefix="cellarena-sandbox-"))
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def covers(self, paths) -> bool:
        """Whether every path in ``paths`` is readable in this host's runs."""
        return all(_under(Path(p).resolve(), self.readable) for p in paths if p)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        with CLOCK.span("host"):
            self._start()
        CLOCK.count("hosts")

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "cellarena.run.child"]
        if self.mode == "bubblewrap":
            exe = bubblewrap()
            if exe is None:
                raise RuntimeError("bubblewrap isolation was asked for, but bwrap cannot run here")
            cmd = bwrap_args(exe, self._visibility(), gpu=self.gpu) + ["--"] + cmd
        else:
            log.warning("the plug-in runs in a plain child process: it is not given the test labels, but "
                        "nothing stops it reading files on disk (install bubblewrap for a sandbox)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(cmd, stdin=theirs.fileno(), stdout=theirs.fileno(), env=env,
                                      start_new_session=True)
        theirs.close()
        self._sock = ours
        self._conn = Connection(os.dup(ours.fileno()))
        self._conn.send_bytes(pickle.dumps(("host", {"preload": list(self.preload)})))
        if not self._conn.poll(HOST_START_S):
            self.stop()
            raise RuntimeError(f"the plug-ins' host process did not start within {HOST_START_S:g} s")
        try:
            json.loads(self._conn.recv_bytes())
        except (EOFError, OSError, ValueError):
            rc = self._proc.wait()
            self.stop()
            raise RuntimeError(f"the plug-ins' host process ended at start (exit code {rc}); see the log") from None

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                self._conn.send_bytes(pickle.dumps(("exit", None)))
                if self._conn.poll(30):
                    self._conn.recv_bytes()
                self._proc.wait(timeout=30)
            except (OSError, EOFError, ValueError, subprocess.TimeoutExpired):
                pass
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()  # reaped: its peak memory counts in the runner's RUSAGE_CHILDREN
        self._conn.close()
        self._sock.close()
        self._proc = None

    def fork(self) -> tuple[int, Connection, Path]:
        """A new run's process: (its id in the host, a connection to it, its own scratch folder)."""
        if not self.alive():
            if self._proc is not None:
                self.stop()
            self.start()
        self._conn.send_bytes(pickle.dumps(("fork", None)))
        header = json.loads(self._conn.recv_bytes())
        _msg, fds, _flags, _addr = socket.recv_fds(self._sock, 1, 1)
        CLOCK.count("forks")
        work = Path(tempfile.mkdtemp(prefix=f"run-{header['pid']}-", dir=self._scratch))
        return int(header["pid"]), Connection(fds[0]), work

    def end(self, pid: int, *, grace: float = 0.0) -> dict:
        """End a run's process, killed (with all it started) unless it ends by itself within ``grace``
        seconds: ``returncode`` (negative: the signal) and ``maxrss_kb``. A host that does not answer
        is stopped, with every run in it."""
        try:
            self._conn.send_bytes(pickle.dumps(("end", {"pid": pid, "grace": float(grace)})))
            if self._conn.poll(grace + 60):
                return json.loads(self._conn.recv_bytes())
        except (OSError, EOFError, ValueError):
            pass
        self.stop()
        return {"returncode": None, "maxrss_kb": 0}

    def _visibility(self) -> Visibility:
        readable = [Path(sys.prefix), Path(sys.base_prefix), REPO, *self.readable]
        readable += [Path(p) for p in sys.path if p and Path(p).is_dir()]
        # folders a plug-in may also write to: for tests and debugging, set by whoever starts the run
        extra = [Path(p) for p in os.environ.get("CELLARENA_SANDBOX_WRITABLE", "").split(os.pathsep) if p]
        return Visibility(tuple(dict.fromkeys(p.resolve() for p in readable)),
                          tuple(dict.fromkeys(p.resolve() for p in (self._scratch, *extra))), self.hidden)


def readable_of(model_dir: Path, checkpoint: Path | None, checkpoints_dir: Path | None) -> list[Path]:
    """What one model's runs read: its folder, its checkpoint (with the card beside the weights) and
    the published checkpoints' folder."""
    out = [Path(model_dir).resolve()]
    out += [Path(p).expanduser().resolve() for p in (checkpoint, checkpoints_dir) if p]
    if checkpoint is not None:
        checkpoint = Path(checkpoint).resolve()
        out += sorted(checkpoint.parent.glob(checkpoint.name + "*"))
    return out


class Sandbox:
    """One process holding a model's plug-in instances for one run (or one tuning study), forked by
    a :class:`Host` (the job's, or one of its own).

    ``with Sandbox(...) as box:`` starts the process; :meth:`instance` makes a plug-in instance in
    it. Every answer is awaited until the run's deadline (``time_limit_s`` from the start); past it,
    the process and everything it started are killed and :class:`PluginTimedOut` is raised.
    """

    def __init__(self, model_dir: Path, *, seed: int, threads: int, device: str = "cpu",
                 checkpoint: Path | None = None, checkpoints_dir: Path | None = None,
                 time_limit_s: float = DEFAULT_TIME_LIMIT_S, hidden: tuple[Path, ...] = (),
                 host: Host | None = None):
        self.model_dir = Path(model_dir).resolve()
        self.seed, self.threads, self.requested_device = int(seed), int(threads), device
        self.checkpoint = Path(checkpoint).resolve() if checkpoint else None
        self.checkpoints_dir = Path(checkpoints_dir).expanduser().resolve() if checkpoints_dir else None
        self.time_limit_s = float(time_limit_s)
        self.hidden = tuple(Path(p).resolve() for p in hidden)
        readable = readable_of(self.model_dir, self.checkpoint, self.checkpoints_dir)
        fits = (host is not None and host.covers(readable) and set(self.hidden) <= set(host.hidden)
                and (host.gpu or device != "cuda"))
        self._host = host if fits else None
        self._own_host = None if fits else Host(readable=tuple(readable), hidden=self.hidden, gpu=device == "cuda",
                                                preload=tuple(plugin_imports(self.model_dir)))
        self.mode = (self._host or self._own_host).mode
        self.device = "cpu"
        self.peak_rss_mb = 0.0
        self._pid: int | None = None
        self._next = 0

    # ---------------------------------------------------------------------------------------- life
    def __enter__(self) -> Sandbox:
        if self._own_host is not None:
            self._host = self._own_host.__enter__()
        self._deadline = time.monotonic() + self.time_limit_s
        self._pid, conn, self._scratch = self._host.fork()
        self._send = self._recv = conn
        header = self._request("start", {
            "model_dir": str(self.model_dir), "seed": self.seed, "threads": self.threads,
            "device": self.requested_device, "work_dir": str(self._scratch),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "checkpoints_dir": str(self.checkpoints_dir) if self.checkpoints_dir else None})
        self.device = header["device"]
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self._pid is not None:
                try:
                    self._send.send_bytes(pickle.dumps(("exit", None)))
                    if self._recv.poll(min(30.0, max(1.0, self._deadline - time.monotonic()))):
                        self._recv.recv_bytes()  # the process's goodbye
                except (OSError, EOFError, ValueError):
                    pass
            self._kill(grace=30.0)
            if getattr(self, "_send", None) is not None:
                self._send.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
        finally:
            if self._own_host is not None:
                self._own_host.__exit__(*exc_info)

    def alive(self) -> bool:
        return self._pid is not None

    def _kill(self, grace: float = 0.0) -> None:
        """End the run's process (after ``grace`` seconds to end by itself) and note how it ended."""
        if self._pid is None:
            return
        ended = self._host.end(self._pid, grace=grace)
        self._pid = None
        self.returncode = ended.get("returncode")
        self.peak_rss_mb = max(self.peak_rss_mb, ended.get("maxrss_kb", 0) / 1024.0)

    # ---------------------------------------------------------------------------------- protocol
    def _request(self, op: str, payload) -> dict:
        """Send one request; return the answer's header (its array, if any, in ``header['array']``)."""
        try:
            self._send.send_bytes(pickle.dumps((op, payload), protocol=pickle.HIGHEST_PROTOCOL))
            header = self._answer()
        except (BrokenPipeError, EOFError, ConnectionResetError):
            raise self._exited() from None
        if not header.get("ok"):
            if header.get("not_applicable"):
                raise NotApplicable(header.get("text", ""))
            raise PluginError(header.get("type", "Error"), header.get("text", ""), message=header.get("message"),
                              fix=header.get("fix"), where=header.get("where", ""),
                              remote_traceback=header.get("traceback", ""))
        if header.get("npy"):
            header["array"] = np.load(io.BytesIO(self._wait_bytes()), allow_pickle=False)
        elif header.get("kind") == "json":
            header["array"] = _object_array(header["value"], header.get("shape"))
        return header

    def _wait_bytes(self) -> bytes:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0 or not self._recv.poll(remaining):
            self._kill()
            raise PluginTimedOut("TimeoutError", f"timed out after {self.time_limit_s:g} s "
                                                 "(the run's time limit; the plug-in was stopped)")
        return self._recv.recv_bytes()

    def _answer(self) -> dict:
        raw = self._wait_bytes()
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except ValueError:
            self._kill()
            raise PluginError("ProtocolError", f"the plug-in's process sent {len(raw)} bytes that are not an "
                                               "answer (did it write to file descriptor 1 directly?)") from None
        return header

    def _exited(self) -> PluginExited:
        self._kill(grace=10.0)
        rc = self.returncode
        if rc is not None and rc < 0:
            try:
                how = f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"was killed by signal {-rc}"
            if -rc == signal.SIGKILL:
                how += " (the out-of-memory killer, or a kill from outside)"
        elif rc is None:  # the host that forked it is gone too (killed, maybe by the plug-in itself)
            how = "ended, and the sandbox host it was forked from with it,"
        else:
            how = f"exited with code {rc}"
        return PluginExited("PluginExited", f"the plug-in's process {how} before answering (a plug-in must "
                                            "return or raise; os._exit, a crash or running out of memory end it)")

    # ---------------------------------------------------------------------------------- instances
    def instance(self, params: dict) -> Remote:
        """A new plug-in instance with ``params``, constructed in the child inside the run's seed."""
        self._next += 1
        header = self._request("new", (self._next, dict(params)))
        return Remote(self, self._next, frozenset(header.get("implements", ())))

    def call(self, handle: int, method: str, args: tuple, kwargs: dict):
        header = self._request("call", (handle, method, tuple(_sendable(a) for a in args),
                                        {k: _sendable(v) for k, v in kwargs.items()}))
        self.last_runtime = header.get("runtime", {})
        kind = header.get("kind")
        return None if kind == "none" else header["array"]

    def drop(self, handle: int) -> dict:
        return self._request("drop", handle).get("runtime", {})


class Remote:
    """A plug-in instance living in the child: its task methods, called with the model's view."""

    def __init__(self, box: Sandbox, handle: int, implemented: frozenset):
        self.box, self.handle, self.implemented = box, handle, implemented
        self.runtime: dict = {}

    def implements(self, method: str) -> bool:
        return method in self.implemented

    def __getattr__(self, name: str):
        if name not in METHODS:
            raise AttributeError(name)

        def method(*args, **kwargs):
            out = self.box.call(self.handle, name, args, kwargs)
            self.runtime = self.box.last_runtime
            return out

        return method

    def close(self) -> dict:
        self.runtime = self.box.drop(self.handle)
        return self.runtime


def answers_on_disk(prepared, split, datasets_dir) -> tuple[Path, ...]:
    """Where a plug-in could find test labels on this machine: the suite's results folder, the data
    cache, the job's prepared and split files (and their folders), each dataset card's local source
    files and the installed copies of the package files cards read data from (e.g. scanpy's
    bundled pbmc68k_reduced). The sandbox hides all of them."""
    import yaml  # noqa: PLC0415

    from cellarena.data.fetch import default_cache_dir  # noqa: PLC0415

    out = [REPO / "results", default_cache_dir(), Path(prepared), Path(split), Path(prepared).parent,
           Path(split).parent]
    site = [Path(p) for p in sys.path if p and Path(p).is_dir()]
    for card_path in sorted(Path(datasets_dir).glob("*.yaml")):
        try:
            sources = (yaml.safe_load(card_path.read_text()) or {}).get("sources") or []
        except (OSError, yaml.YAMLError):
            continue
        for src in sources:
            if not isinstance(src, dict):
                continue
            if src.get("kind") == "local" and src.get("path"):
                path = Path(str(src["path"])).expanduser()
                out.append(path if path.is_absolute() else card_path.parent / path)
            elif src.get("kind") == "pypi_wheel" and src.get("member"):
                out += [d / str(src["member"]) for d in site if (d / str(src["member"])).is_file()]
    return tuple(dict.fromkeys(p.resolve() for p in out))


def _sendable(value):
    """What goes to the child: an AnnData view becomes its own copy (a view would pickle its parent,
    with every cell and label the view leaves out)."""
    import anndata as ad  # noqa: PLC0415

    if isinstance(value, ad.AnnData) and value.is_view:
        return value.copy()
    return value


def _object_array(value, shape) -> np.ndarray:
    arr = np.empty(len(value) if isinstance(value, list) else 0, dtype=object)
    if isinstance(value, list) and shape and len(shape) == 1:
        arr[:] = value
        return arr
    return np.array(value, dtype=object)
