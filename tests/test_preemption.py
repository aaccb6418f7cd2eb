"""gpt2dist/preemption.py: stop signals agreed by all ranks. The end-to-end signal runs (SIGTERM
to one DDP rank, SLURM's SIGUSR1 requeue, 2-node scancel) are in test_faults.py and test_slurm.py."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from gpt2dist.preemption import Preemption, agree_on_flags, cpu_flag_group, install_early_handler


def test_preemption_knob_is_checked():
    with pytest.raises(ValueError, match="check_every_n_steps=0"):
        Preemption(check_every_n_steps=0)


def test_outside_slurm_and_without_a_process_group_nothing_is_taken_over(monkeypatch):
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    assert install_early_handler() is False  # SIGUSR1 keeps its default outside SLURM
    assert cpu_flag_group() is None and agree_on_flags([True, False]) == [True, False]


def _agree(rank: int, world: int, init_file: str, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Rank 1 alone got SIGTERM; nobody got SIGUSR1: both ranks must see (False, True).
        out.put((rank, agree_on_flags([False, rank == 1]), cpu_flag_group() is dist.group.WORLD))
    finally:
        dist.destroy_process_group()


def test_flags_are_agreed_across_ranks_on_a_gloo_group(tmp_path):
    from conftest import spawn_ranks

    results = sorted(spawn_ranks(_agree, 2, str(tmp_path / "init"), timeout=120))
    assert results == [(0, [False, True], True), (1, [False, True], True)]
