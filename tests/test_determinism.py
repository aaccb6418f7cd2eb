"""tools/determinism.py: a bare-torch run repeats itself in one process, and the tool's table
counts every fresh process and finds a known parting (1 intra-op thread instead of 2)."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import determinism  # noqa: E402


def test_a_run_repeats_itself_bitwise_in_one_process(tmp_path, capsys):
    determinism.train(2, tmp_path / "a.pt")
    determinism.train(2, tmp_path / "b.pt")
    a, b = capsys.readouterr().out.splitlines()
    assert a == b and len(a.split()) == 3  # thread count, then one digest per step
    assert a.split()[1] != a.split()[2]  # the weights moved
    wa, wb = (torch.load(tmp_path / f"{x}.pt", weights_only=True) for x in "ab")
    assert len(wa) == 28 and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_table_counts_every_process_and_finds_another_thread_count():
    # Processes 0 and 2 run 2 threads, process 1 runs 1: another summation order, so other weights.
    proc = subprocess.run([sys.executable, str(REPO / "tools/determinism.py"), "--processes", "3", "--threads", "2,1",
                           "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = re.findall(r"^\| (reference|other \d+) \((\d) threads\) \| (\d+) \| (\S+) \| (\d+) of 28 \| (\S+)", out, re.M)
    assert sum(int(r[2]) for r in rows) == 3
    assert rows[0][:2] == ("reference", "2")  # process 0's outcome leads a tie
    one_thread = [r for r in rows if r[1] == "1"]
    assert len(one_thread) == 1 and one_thread[0][2:4] == ("1", "1")  # one process, parted at step 1
    assert int(one_thread[0][4]) > 0 and float(one_thread[0][5]) > 0
    assert f"parted: {3 - int(rows[0][2])} of 3" in out


def test_bad_flags_are_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "tools/determinism.py"), "--threads", "2,x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--threads" in proc.stderr and "'2,x'" in proc.stderr


def test_equal_weights_under_different_thread_counts_are_one_outcome(monkeypatch, capsys):
    """The outcome key held the thread count: with --threads 2,1 processes with equal weights were counted
    as parted (what the flag exists to ask: does the thread count change the result?)."""
    from types import SimpleNamespace

    def run(cmd, env=None, **kw):  # each process: its thread count, then the same digests and weights
        torch.save({"w": torch.ones(2)}, cmd[cmd.index("--child") + 1])
        return SimpleNamespace(returncode=0, stdout=f"{env['OMP_NUM_THREADS']} aaaa bbbb\n", stderr="")

    monkeypatch.setattr(determinism.subprocess, "run", run)
    determinism.main(["--processes", "4", "--threads", "2,1", "--steps", "2"])
    out = capsys.readouterr().out
    assert "| reference (1,2 threads) | 4 | - | 0 of 1 | 0 |" in out and "| other" not in out
    assert "parted: 0 of 4" in out
