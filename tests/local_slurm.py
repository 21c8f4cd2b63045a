"""A real one-node SLURM cluster on this machine, for the tests: munged, slurmctld and slurmd on
loopback, with a configuration written into a scratch folder.

Debian's ``slurm-wlm`` and ``munge`` packages provide the daemons (`.ci/run` installs them). The
cluster has one node with this machine's cores and most of its memory, one default partition, no
accounting database (status comes from ``squeue``, completed jobs are kept for ``MinJobAge``) and a
text job-completion log, read by :meth:`LocalSlurm.completed_jobs`.

Every client command finds the cluster through ``$SLURM_CONF`` (:attr:`LocalSlurm.env`), except the
``srun`` that Snakemake's SLURM job step starts inside each batch job: the job-step plug-in drops
every ``SLURM_*`` variable but the job's identity before it, so ``srun`` reads the default
``/etc/slurm/slurm.conf``. slurmd therefore runs inside a bubblewrap mount namespace in which
``/etc/slurm`` is the scratch configuration folder; its jobs inherit that view, and the machine's
own ``/etc/slurm`` is never touched.

Needs root (slurmd starts jobs as their user) and bubblewrap; :func:`unavailable` says what is
missing, for a test's skip reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "bwrap")
PARTITION = "debug"  # not the profile's business: jobs go to the cluster's default partition


def unavailable() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts each job as its user)"
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return (f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge bubblewrap; "
                ".ci/run installs them)")
    if not Path("/etc/slurm").is_dir():
        return "no /etc/slurm (the folder slurm-wlm installs), over which the test's configuration is mounted"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as fh:
        total_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    return int(total_kb / 1024 * 0.8)


class LocalSlurm:
    """Start with :meth:`start` (or as a context manager); :meth:`stop` ends every daemon."""

    def __init__(self, root: Path, *, min_job_age_s: int = 1800):
        self.root = Path(root)
        self.etc = self.root / "etc"
        self.conf = self.etc / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        self.min_job_age_s = min_job_age_s
        self.node = "cellarena-node"
        self._procs: list[subprocess.Popen] = []
        self._munge_socket = self.root / "munge" / "socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, scancel, Snakemake's executor)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _config(self) -> str:
        r = self.root
        host = socket.gethostname().split(".")[0]
        return "\n".join([
            "ClusterName=cellarena-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self._munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",  # no cgroups needed: containers and CI machines
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",  # jobs are placed by their cores and mem_mb
            f"MinJobAge={self.min_job_age_s}",  # finished jobs stay visible to squeue this long
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "KillWait=10",  # seconds between a cancel's SIGTERM and its SIGKILL
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_mem_mb()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def start(self, timeout_s: float = 60) -> LocalSlurm:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        for d in ("munge", "state", "spool", "log", "etc"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        self.conf.write_text(self._config())
        plugstack = Path("/etc/slurm/plugstack.conf")
        if plugstack.exists():  # the packaged SPANK list (empty): the bind mount hides the original
            shutil.copy(plugstack, self.etc / "plugstack.conf")
        m = self.root / "munge"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={self._munge_socket}",
                        f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                        f"--seed-file={m / 'munged.seed'}"], check=True, capture_output=True)
        log = open(self.root / "log" / "daemons.out", "ab")
        self._procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)],
                                            stdout=log, stderr=log, env=self.env))
        # /etc/slurm of slurmd and its jobs is the scratch folder (see the module's docstring)
        wrap = ["bwrap", "--die-with-parent", "--dev-bind", "/", "/", "--bind", str(self.etc), "/etc/slurm", "--"]
        self._procs.append(subprocess.Popen([*wrap, "slurmd", "-D", "-N", self.node, "-f", str(self.conf)],
                                            stdout=log, stderr=log, env=self.env))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            if any(p.poll() is not None for p in self._procs):
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the local SLURM cluster did not come up within {timeout_s:.0f} s:\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.exists():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"== {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def squeue(self) -> list[dict]:
        """Jobs the controller knows (running, pending, and finished ones within MinJobAge)."""
        out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k|%M"], capture_output=True,
                             text=True, env=self.env, check=True).stdout
        return [dict(zip(("job_id", "state", "comment", "time"), line.split("|"))) for line in out.splitlines()]

    def completed_jobs(self) -> list[dict]:
        """Every finished job from the completion log: id, state, start, end and the rest, as text."""
        if not self.jobcomp.exists():
            return []
        rows = []
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            rows.append(fields)
        return rows

    def stop(self) -> None:
        for p in reversed(self._procs):
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid"):  # a daemon that outlived its parent
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().split()[0])
                if b"slurm" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        if self._munge_socket.exists():
            subprocess.run(["munged", "--stop", f"--socket={self._munge_socket}"], capture_output=True)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
