"""gpt2dist/preemption.py: stop signals agreed by all ranks. The end-to-end signal runs (SIGTERM
to one DDP rank, SLURM's SIGUSR1 requeue, 2-node scancel) are in test_faults.py and test_slurm.py."""

from __future__ import annotations

import os

import pytest
import torch
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


def fit_with_a_signal(tmp_path, monkeypatch, signal_at: int, **trainer_args):
    """A BoringModel fit under a (simulated) SLURM job whose requeue fails, sent SIGUSR1 during step
    signal_at + 1. Returns the trainer and the Preemption callback."""
    import signal

    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from gpt2dist import preemption

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    sent = []

    class Signal(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == signal_at and not sent:
                sent.append(1)
                preemption._received.append(signal.SIGUSR1)  # what the SIGUSR1 handler records

    class UnderSlurm(preemption.Preemption):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            self._active = True  # as SLURMEnvironment with auto_requeue turns it on

    callback = UnderSlurm()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Signal(), callback], default_root_dir=tmp_path, limit_val_batches=0,
                         accelerator="cpu", **trainer_args)
    trainer.fit(BoringModel())
    return trainer, callback


@pytest.mark.parametrize("signal_at, max_steps, stopped_at", [(3, 20, 4), (5, 6, 6)])
def test_a_preemption_signal_stops_before_trainer_min_steps(tmp_path, monkeypatch, signal_at, max_steps, stopped_at):
    """Lightning ignores should_stop until min_steps: the run trained on past SLURM's warning window, and,
    with the requeue failed, reported a checkpoint many steps older than where it ended. A signal at the
    last step finishes the run as usual (a requeued job would resume at max_steps and export nothing)."""
    from gpt2dist import preemption

    trainer, callback = fit_with_a_signal(tmp_path, monkeypatch, signal_at, max_steps=max_steps, min_steps=10)
    assert trainer.global_step == stopped_at  # the signal came during step signal_at + 1: stopped at its end
    if stopped_at == max_steps:
        assert callback.hpc_path is None and not callback.requeued and not preemption._received
        return
    assert torch.load(callback.hpc_path, weights_only=True)["global_step"] == stopped_at
    message = callback.stopped_message(trainer.global_step)
    assert message.startswith(f"stopped by SLURM's preemption signal at step {stopped_at}") and "Invalid job id" in message


@pytest.mark.parametrize("signal_at, stopped_at", [(3, 4), (11, 12)])
def test_a_preemption_signal_at_an_epochs_last_batch_requeues_unless_the_run_ends_there(tmp_path, monkeypatch,
                                                                                        signal_at, stopped_at):
    """3 epochs of 4 steps. SIGUSR1 during step 4, the last of epoch 0: saved and requeued at step 4.
    Lightning's "training done" is true at every epoch's end, and the signal was dropped there: no
    checkpoint, no requeue, and the job trained on until SLURM killed it. During step 12 the run ends:
    it finishes as usual."""
    from gpt2dist import preemption

    trainer, callback = fit_with_a_signal(tmp_path, monkeypatch, signal_at, max_epochs=3, limit_train_batches=4)
    assert trainer.global_step == stopped_at and not preemption._received
    if stopped_at == 12:
        assert callback.hpc_path is None and not callback.requeued
        return
    assert torch.load(callback.hpc_path, weights_only=True)["global_step"] == stopped_at
    assert callback.stopped_message(trainer.global_step).startswith(f"stopped by SLURM's preemption signal at step {stopped_at}")


def test_a_sigterm_between_lightnings_handler_registration_and_train_start_is_only_recorded():
    """Lightning registers its SIGTERM handlers just before the stage runs; ours replaced its notifier only at
    on_sanity_check_start / on_train_start (no sanity check on a resume). A SIGTERM in between ran Lightning's
    notifier, with its broadcast, on one rank. Preemption.setup now hands Lightning our recorder to register."""
    import signal

    import lightning.pytorch as pl

    from gpt2dist import preemption

    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[Preemption()])
    preemption._sigterm.clear()
    trainer.callbacks[0].setup(trainer, None, "fit")
    trainer._signal_connector.register_signal_handlers()  # what Trainer._run does after setup
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption._sigterm == [signal.SIGTERM] and not trainer._signal_connector.received_sigterm
    finally:
        trainer._signal_connector.teardown()
        preemption._sigterm.clear()
