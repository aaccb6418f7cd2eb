"""A real, throw-away SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd
daemons emulating nodes n1 and n2 (Debian's slurm 22.05 packages; recipe in ../shared/notes/findings.md).

Everything lives in one temp dir; the daemons' PIDs are recorded and exactly those are stopped at
the end. Nothing is installed here: `.ci/run` apt-installs the packages (a developer runs
`apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge` once).
Without the packages the SLURM tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo"]


def missing_programs() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in DAEMONS if shutil.which(p, path=path) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class SlurmCluster:
    """Two emulated nodes (n1, n2: 2 CPUs each) in partition `debug`, all state under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.pids: list[int] = []
        self.conf = root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "SlurmCluster":
        d = self.root
        os.chmod(d, 0o755)  # munged runs as user munge and must reach d/munge (mkdtemp makes 0700)
        for sub in ("etc", "munge", "state", "spool/n1", "spool/n2", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "munge", "munge", "munge")
        os.chmod(d / "munge", 0o755)  # munged: "execute permissions for all required" on the socket dir
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("mungekey"), "-c", "-k", str(d / "munge/munge.key")],
                       check=True, capture_output=True, timeout=30)
        sock = d / "munge" / "munge.socket"
        host = socket.gethostname().split(".")[0]
        ports = [_free_port() for _ in range(3)]
        self.conf.write_text(f"""\
ClusterName=gpt2dist-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MessageTimeout=30
KillWait=5
InactiveLimit=0
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=2048 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn(["runuser", "-u", "munge", "--", _sbin("munged"), "-F", "--socket", str(sock),
                     "--key-file", str(d / "munge/munge.key"), "--pid-file", str(d / "munge/munged.pid"),
                     "--log-file", str(d / "log/munged.log"), "--seed-file", str(d / "munge/munged.seed")], "munged")
        self._wait(lambda: sock.exists(), "munged socket")
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in ("n1", "n2"):
            self._spawn([_sbin("slurmd"), "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
        self._wait(self._nodes_idle, "nodes n1,n2 idle (see %s/log)" % d, timeout=60)
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.pids.append(p.pid)

    def _nodes_idle(self) -> bool:
        r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return states.get("n1") == "idle" and states.get("n2") == "idle"

    @staticmethod
    def _wait(pred, what: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}")

    def stop(self) -> None:
        # Exactly the processes this fixture started (each leads its own session: take its group).
        for pid in reversed(self.pids):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 15
        for pid in self.pids:
            while time.monotonic() < end:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # --- client commands -------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, env: dict | None = None, cwd: Path | None = None,
            timeout: int = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ...); {} once the job is gone."""
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}

    def wait_job(self, job_id: str, until=lambda j: j.get("JobState") in FINAL, timeout: float = 300) -> dict:
        """Poll once a second (sbatch --wait polls slowly) until `until(job)` holds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            j = self.job(job_id)
            if until(j):
                return j
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} did not reach the expected state in {timeout}s: {self.job(job_id)}")


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
