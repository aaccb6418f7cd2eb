"""SLURM's requeue signal (SIGUSR1), recorded from the first line of the `gpt2dist` command.

Importing torch, Lightning and transformers takes seconds (more on a shared filesystem), and SIGUSR1's
default action kills the process: a preemption signal then ended the task (exit 138), `srun
--kill-on-bad-exit` ended the others, and the job was not requeued. This module imports nothing heavy,
so `gpt2dist.__main__` installs the handler before anything else; `gpt2dist/preemption.py` acts on what
it recorded at the next optimizer step.
"""

from __future__ import annotations

import os
import signal

received: list[int] = []  # SIGUSR1s recorded here, consumed by preemption.Preemption


def record(signum, frame) -> None:
    """The handler: note the signal; `Preemption` acts on it at the next optimizer step."""
    received.append(signum)


def under_srun() -> bool:
    """Lightning's SLURMEnvironment.detect(), without importing Lightning: srun started this task, and the job is
    not an interactive allocation (job name bash / interactive), where Lightning manages no SLURM signals."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def install() -> bool:
    """Under SLURM, record SIGUSR1 instead of dying on it. Lightning then finds a handler in place and does not
    install its own; `Preemption` does the requeue. Returns whether it was installed."""
    if os.name == "nt" or not under_srun():
        return False
    signal.signal(signal.SIGUSR1, record)
    return True
