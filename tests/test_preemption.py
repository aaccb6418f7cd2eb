"""gpt2dist/preemption.py: stop signals agreed by all ranks. The end-to-end signal runs (SIGTERM
to one DDP rank, SLURM's SIGUSR1 requeue, 2-node scancel) are in test_faults.py and test_slurm.py."""

from __future__ import annotations

import os
import signal

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


def fit_with_a_signal(tmp_path, monkeypatch, signal_at: int, sigterm: bool = False, checkpoint=None, **trainer_args):
    """A BoringModel fit under a (simulated) SLURM job whose requeue fails, sent SIGUSR1 (or SIGTERM) during
    step signal_at + 1, with a ModelCheckpoint `checkpoint` or none. Returns the trainer and the Preemption callback."""
    import signal

    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from gpt2dist import preemption

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    sent = []

    class Signal(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == signal_at and not sent:
                sent.append(1)
                if sigterm:
                    preemption._sigterm.append(signal.SIGTERM)  # what record_sigterm_without_collectives records
                else:
                    preemption._received.append(signal.SIGUSR1)  # what the SIGUSR1 handler records

    class UnderSlurm(preemption.Preemption):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            self._active = True  # as SLURMEnvironment with auto_requeue turns it on

    callback = UnderSlurm()
    trainer = pl.Trainer(logger=False, enable_checkpointing=checkpoint is not None, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Signal(), callback, *([checkpoint] if checkpoint else [])],
                         default_root_dir=tmp_path, limit_val_batches=0,
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


def test_a_preemption_stop_writes_nothing_after_its_checkpoint(tmp_path, monkeypatch):
    """After the hpc save and `scontrol requeue`, Lightning's train-end save wrote a second, full last.ckpt
    when the callback had saved nothing yet in this process (a requeued segment before its first interval):
    a model-sized write while SLURM's SIGTERM and SIGKILL come."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ck = ModelCheckpoint(dirpath=tmp_path / "ck", filename="step{step}", every_n_train_steps=8, save_last=True)
    trainer, callback = fit_with_a_signal(tmp_path, monkeypatch, 3, checkpoint=ck, max_steps=20)
    assert trainer.global_step == 4 and torch.load(callback.hpc_path, weights_only=True)["global_step"] == 4
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").iterdir())


def test_a_sigterm_at_the_last_step_is_consumed_not_left_for_the_next_fit(tmp_path, monkeypatch):
    """A SIGTERM agreed on at the run's last step lets it finish; it stayed recorded, and the next fit in the
    same process (the Python API, `cli.main` called again) saved and exited 143 at its first step."""
    from gpt2dist import preemption

    trainer, _ = fit_with_a_signal(tmp_path / "a", monkeypatch, 5, sigterm=True, max_steps=6)
    assert trainer.global_step == 6 and not preemption._sigterm
    trainer, callback = fit_with_a_signal(tmp_path / "b", monkeypatch, 10**6, max_steps=3)
    assert trainer.global_step == 3 and callback.sigterm_path is None


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


class _Validations:
    """Records (global_step, batches run) of each fit validation, and puts a signal in the recorders
    after validation batch `batch` of step `step` (or, with batch None, at the start of that step's
    training batch: the step-boundary path)."""

    def __new__(cls, signum: int, step: int, batch: int | None):
        import lightning.pytorch as pl

        from gpt2dist import preemption

        class Callback(pl.Callback):
            def __init__(self):
                self.runs: list[list[int]] = []
                self.sent = False

            def _send(self):
                self.sent = True
                (preemption._received if signum == signal.SIGUSR1 else preemption._sigterm).append(signum)

            def on_train_batch_start(self, trainer, *args):
                if batch is None and trainer.global_step == step - 1 and not self.sent:
                    self._send()

            def on_validation_start(self, trainer, *args):
                if not trainer.sanity_checking:
                    self.runs.append([trainer.global_step, 0])

            def on_validation_batch_end(self, trainer, pl_module, outputs, b, batch_idx, dataloader_idx=0):
                if trainer.sanity_checking:
                    return
                self.runs[-1][1] += 1
                if batch is not None and trainer.global_step == step and batch_idx == batch and not self.sent:
                    self._send()

        return Callback()


SCHEDULES = {  # both validate after steps 2, 4 and 6
    "mid_epoch": dict(max_steps=6, val_check_interval=2, check_val_every_n_epoch=None),
    # At each epoch's last batch: a resume from there rolls the epoch over before it redoes the validation.
    "epoch_end": dict(max_epochs=3, limit_train_batches=2),
}


def _fit(tmp_path, *callbacks, ckpt_path=None, schedule="mid_epoch"):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from gpt2dist.faults import FaultTolerance

    pl.seed_everything(7)

    class UnderSlurm(Preemption):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            self._active = True  # as SLURMEnvironment with auto_requeue turns it on

    model = BoringModel()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*callbacks, FaultTolerance(), UnderSlurm()], default_root_dir=tmp_path,
                         limit_val_batches=4, num_sanity_val_steps=0, accelerator="cpu", deterministic=True,
                         **SCHEDULES[schedule])
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("how", ["term", "usr1", "usr1-refused"])
def test_a_signal_during_fits_validation_stops_after_that_batch_and_the_resume_redoes_it(tmp_path, monkeypatch, how,
                                                                                        schedule):
    """A signal during step 4's validation (4 batches) was acted on only after the rest of it and one
    more training step: a long validation outlasted SLURM's 90 s warning and the job died unsaved.
    Now every rank saves after the current validation batch and leaves: the checkpoint is the one
    the step-4 boundary writes (a signal there gives the same file), the process exits 143
    (SIGTERM), 0 (requeued) or 138 (requeue refused, with one line naming the checkpoint), and the
    resumed run validates step 4 again from its first batch and ends as the uninterrupted run."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gpt2dist import preemption
    from gpt2dist.preemption import RequeueStop

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n" + (
        "echo 'Requeue of job 42 disabled' >&2\nexit 1\n" if how == "usr1-refused" else "exit 0\n"))
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    signum = signal.SIGTERM if how == "term" else signal.SIGUSR1

    reference = _Validations(signum, step=99, batch=None)
    _fit(tmp_path / "ref", reference, schedule=schedule)
    assert reference.runs == [[2, 4], [4, 4], [6, 4]]

    saved = {}
    for where, batch in (("boundary", None), ("validation", 1)):
        record = _Validations(signum, step=4, batch=batch)
        (bin_dir / "calls").unlink(missing_ok=True)
        if how != "term" and where == "boundary":
            trainer = _fit(tmp_path / where, record, schedule=schedule)  # Lightning's stop request: fit returns
            assert trainer.global_step == 4 and record.runs == [[2, 4]]
        else:
            with pytest.raises(SystemExit) as stop:
                _fit(tmp_path / where, record, schedule=schedule)
            assert type(stop.value) is (SIGTERMException if how == "term" else RequeueStop)
            if where == "boundary":  # no batch of step 4's validation ran after the save (one did)
                assert record.runs == [[2, 4]]
        assert not preemption._received and not preemption._sigterm
        saved[where] = tmp_path / where / ("checkpoints/last.ckpt" if how == "term" else "hpc_ckpt_1.ckpt")
        if how != "term":
            assert (bin_dir / "calls").read_text() == "requeue 42\n"
        if where == "validation":
            assert record.runs == [[2, 4], [4, 2]]  # stopped after batch 1, not after batch 3 and step 5
            if how != "term":
                assert stop.value.code == (138 if how == "usr1-refused" else 0)
                assert stop.value.message is None if how == "usr1" else stop.value.message.startswith(
                    f"stopped by SLURM's preemption signal at step 4 and saved {saved[where]}, "
                    "but `scontrol requeue 42` failed (Requeue of job 42 disabled)")
    boundary, during = (torch.load(saved[w], weights_only=False) for w in ("boundary", "validation"))
    assert during["global_step"] == 4
    assert during["loops"] == boundary["loops"]
    for key in ("state_dict", "optimizer_states", "callbacks"):
        assert str(during[key]) == str(boundary[key]), key  # (tensors printed: same values, same run)

    # The redone validation is cut short by a signal too: the same checkpoint again.
    again = _Validations(signum, step=4, batch=1)
    with pytest.raises(SystemExit):
        _fit(tmp_path / "validation", again, ckpt_path=str(saved["validation"]), schedule=schedule)
    assert again.runs == [[4, 2]]
    path = tmp_path / "validation" / ("checkpoints/last.ckpt" if how == "term" else "hpc_ckpt_2.ckpt")
    assert torch.load(path, weights_only=False)["loops"] == boundary["loops"]
    # (The weights of a resumed BoringModel are not compared: its plain DataLoader restarts the epoch.
    # test_faults.py resumes the real model from a signal mid-validation, bitwise.)
    resumed = _Validations(signum, step=99, batch=None)
    trainer = _fit(tmp_path / "validation", resumed, ckpt_path=str(path), schedule=schedule)
    assert resumed.runs == [[4, 4], [6, 4]] and trainer.global_step == 6  # step 4's validation again, whole


@pytest.mark.parametrize("command", ["python -m gpt2dist", "gpt2dist"])
def test_a_preemption_signal_while_torch_is_imported_is_recorded_not_fatal(tmp_path, command):
    """SLURM's SIGUSR1 during start-up: the handler was installed in cli.main, after torch, Lightning and
    transformers had loaded (5 s here, more on a shared filesystem), so the signal's default action killed the
    task (exit 138) and srun --kill-on-bad-exit the job, unrequeued. It is now installed before any of them.
    The signal is sent by the process itself at the moment `import torch` starts (an audit hook)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "def hook(event, args):\n"
        "    if event == 'import' and args[0] == 'torch' and not getattr(hook, 'sent', False):\n"
        "        hook.sent = True\n"
        "        os.kill(os.getpid(), signal.SIGUSR1)\n"
        "sys.addaudithook(hook)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", SLURM_NTASKS="1", SLURM_JOB_NAME="gpt2dist", SLURM_JOB_ID="42")
    start = [sys.executable, "-m", "gpt2dist"] if command.startswith("python") else [str(Path(sys.executable).with_name("gpt2dist"))]
    p = subprocess.run([*start, "fit", "--print_config", "--config", str(REPO / "configs/quickstart.yaml")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])  # -10: killed by SIGUSR1
    assert "seed_everything:" in p.stdout
