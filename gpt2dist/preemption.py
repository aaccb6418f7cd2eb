"""Stop signals: SLURM's requeue signal and SIGTERM, acted on at a step boundary by all ranks together.

Preemption (`Preemption` callback + `install_early_handler`): SLURM sends SIGUSR1 90 s before the
time limit (`--signal=SIGUSR1@90`) or on `scancel --signal=USR1`. Lightning's own handler saves
`hpc_ckpt_N.ckpt` and runs `scontrol requeue` from inside the signal handler, i.e. at whatever
instruction each rank happens to be executing (between `optimizer.step()` and the step counter,
in the middle of a gradient accumulation window, or before training has started, where the
default action of SIGUSR1 kills the process). Here the handler only records the signal; at the
next optimizer-step boundary the ranks agree (one CPU all-reduce of a 0/1 flag, `agree_on_flags`) and then all run
Lightning's requeue routine together, so the checkpoint is a consistent state from which the
resumed losses equal an uninterrupted run's. A requeue SLURM refuses ends the run with one line and
exit 138 (`cli.main`), not exit 0 at the preemption step. A signal during fit's validation is acted on
after the current validation batch, not after the whole validation and one more step (a long
validation outlasted SLURM's 90 s warning): the checkpoint is the one the step boundary before that
validation would have written, and the resumed run redoes the validation (FaultTolerance).

Which checkpoint a restarted job loads is `gpt2dist/resume.py`'s job.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.loops.utilities import _is_max_limit_reached
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt2dist import early_signal
from gpt2dist.resume import prune_requeue_checkpoints, slurm_job_id

log = logging.getLogger(__name__)

# SIGUSR1s recorded by the early handler (installed by `gpt2dist.__main__` before torch is imported), consumed
# by Preemption: the same list.
_received = early_signal.received


def install_early_handler() -> bool:
    """Under SLURM, record SIGUSR1 instead of dying on it (`gpt2dist.early_signal`); for `cli.main()` called
    from Python, where `gpt2dist.__main__` did not run."""
    return early_signal.install()


_sigterm: list[int] = []  # SIGTERMs recorded by `record_sigterm_without_collectives`, consumed by Preemption


def _sigterm_recorder(trainer: pl.Trainer):
    """A SIGTERM handler that only records the signal (and forwards it to processes Lightning started)."""
    def record(signum, frame) -> None:
        log.info("[rank: %d] Received SIGTERM: %d", trainer.global_rank, signum)
        if not _sigterm and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # processes Lightning started itself (no collective)
        _sigterm.append(signum)

    return record


def record_sigterm_without_collectives(trainer: pl.Trainer) -> None:
    """Lightning's SIGTERM handling, minus its collectives (lightning 2.6).

    Lightning's handler runs a broadcast inside the signal handler. A signal handler runs wherever
    the main thread is, e.g. inside an all_reduce's Python wrapper: its broadcast then pairs with
    another rank's all_reduce and every rank waits forever (seen on the local SLURM cluster, 2 nodes:
    `scancel --signal=TERM` hung the job). Lightning's loop also broadcasts the flag from rank 0 on
    the GPU before every training micro-batch and reads it back: a host sync per micro-batch in
    every multi-process run (Lightning issue #21487). Here the handler only records the signal (and
    forwards it to processes Lightning started), the per-batch broadcast is off, and `Preemption`
    has the ranks agree at the next optimizer step, on the CPU, saves there, and stops them together."""
    if os.name == "nt":
        return
    connector = trainer._signal_connector
    current = signal.getsignal(signal.SIGTERM)
    handlers = getattr(current, "signal_handlers", None)  # Lightning's _HandlersCompose
    if not isinstance(handlers, list) or connector._sigterm_notifier_fn not in handlers:
        return
    record = _sigterm_recorder(trainer)
    current.signal_handlers = [record if h == connector._sigterm_notifier_fn else h for h in handlers]
    # An instance attribute shadows the loop's method: the decision is Preemption's, on the CPU.
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


_FLAG_GROUPS: dict = {}


def cpu_flag_group():
    """A gloo process group for 0/1 flags (None: not distributed). Under NCCL, all-reducing a flag
    means a GPU tensor read back with .item(): the host waits for the GPU queue to drain (a sync)
    each time; a gloo all-reduce of a CPU tensor leaves the GPU queue alone. Collective: every rank
    calls it the first time."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if "gloo" not in _FLAG_GROUPS:
        _FLAG_GROUPS["gloo"] = dist.new_group(backend="gloo")
    return _FLAG_GROUPS["gloo"]


def agree_on_flags(flags: list[bool]) -> list[bool]:
    """Each flag true on any rank, on every rank (one CPU all-reduce; no GPU sync)."""
    import torch.distributed as dist

    group = cpu_flag_group()
    if group is None:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


class RequeueStop(SIGTERMException):
    """Leaves fit mid-validation after a SIGUSR1 save (and requeue): all ranks raise it after the same
    validation batch. A SystemExit: exit code 0 when SLURM took the requeue, 138 (128 + SIGUSR1) with
    `message` when it refused (`cli.main` prints the message)."""

    def __init__(self, message: str | None):
        super().__init__(0 if message is None else 128 + signal.SIGUSR1)
        self.message = message


def _run_ends_at_this_step(trainer: pl.Trainer) -> bool:
    """Whether fit ends after this batch: max_steps reached, or the last batch of the last epoch.
    Not Lightning's `_is_training_done`: that is true at the end of every epoch, and a SIGUSR1 first
    agreed on there was dropped (no save, no requeue; SLURM killed the job at its time limit)."""
    loop = trainer.fit_loop
    if _is_max_limit_reached(trainer.global_step, loop.max_steps):
        return True
    return (loop.epoch_loop._num_ready_batches_reached() and loop.max_epochs is not None
            and _is_max_limit_reached(trainer.current_epoch + 1, loop.max_epochs))


class Preemption(Callback):
    """Stop signals, acted on at the next optimizer step by all ranks together. SLURM's SIGUSR1: save
    `hpc_ckpt_N.ckpt` and requeue the job (Lightning's routine, plus the requeue's outcome). SIGTERM
    (a scheduler's preemption or time limit, `kill`, anywhere): save `last.ckpt` and stop (the CLI
    exits 143). Either way training stops without exporting. During fit's validation either is acted on
    after the current validation batch, and the resumed run redoes that validation. In validate / test /
    predict, SIGTERM stops every rank after the same batch, with nothing reported for the unfinished
    split (exit 143)."""

    def __init__(self, enabled: bool = True, check_every_n_steps: int = 1):
        """
        Args:
            enabled: Take over SLURM's requeue signal and SIGTERM (off: Lightning's handlers, which stop mid-step without saving).
            check_every_n_steps: Optimizer steps (and fit's validation batches) between the ranks' agreement
                on a received signal (one CPU all-reduce of two numbers each time; 90 s of warning covers many steps).
        """
        if check_every_n_steps < 1:
            raise ValueError(f"preemption.check_every_n_steps={check_every_n_steps} must be >= 1")
        self.enabled, self.check_every_n_steps = enabled, check_every_n_steps
        self.requeued = False
        self.hpc_path: str | None = None
        self.requeue_error: str | None = None  # rank 0: why `scontrol requeue` failed
        self._active = False  # SLURM requeue on SIGUSR1
        self._last_step = -1
        self.sigterm_path: str | None = None  # the checkpoint saved on SIGTERM
        self._mid_validation = False  # saving during fit's validation: see on_save_checkpoint
        self._val_progress_at_step: dict | None = None
        self._loaded_loops: dict | None = None  # the resumed checkpoint's, until the first training batch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loaded_loops = None  # a second fit with this callback: only its own checkpoint counts
        if self.enabled and os.name != "nt":
            # Lightning registers its SIGTERM handlers after setup, just before the stage runs: with its
            # notifier swapped now, ours is what it registers. Else until the hooks below replace it (no
            # sanity check on a resume: on_train_start), a SIGTERM ran Lightning's broadcast on one rank.
            trainer._signal_connector._sigterm_notifier_fn = _sigterm_recorder(trainer)
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            record_sigterm_without_collectives(trainer)  # Lightning registers its handlers just before this

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            record_sigterm_without_collectives(trainer)  # again: no sanity check ran (num_sanity_val_steps 0)
            cpu_flag_group()  # collective: created here, by every rank, not at the first signal
        env = trainer._accelerator_connector.cluster_environment
        self._active = self.enabled and isinstance(env, SLURMEnvironment) and env.auto_requeue and os.name != "nt"
        if self._active:
            signal.signal(env.requeue_signal or signal.SIGUSR1, early_signal.record)
        elif not self.enabled and isinstance(env, SLURMEnvironment) and env.auto_requeue and os.name != "nt":
            # install_early_handler kept Lightning from installing its own: put Lightning's back.
            signal.signal(env.requeue_signal or signal.SIGUSR1, trainer._signal_connector._slurm_sigusr_handler_fn)
        self._last_step = trainer.global_step
        # A resumed run may redo its step's validation before any training batch (FaultTolerance).
        self._val_progress_at_step = copy.deepcopy(trainer.fit_loop.epoch_loop.val_loop.batch_progress.state_dict())
        if trainer.is_global_zero:
            how = "at the next optimizer step" if self._active else "off"
            log.info("cluster environment: %s (world size %d); requeue on preemption signal: %s",
                     type(env).__name__, trainer.world_size, how)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        # A resume may redo its step's validation before any training batch: a save during it is this
        # checkpoint again, loops included (the live ones are already past the reset of a resume).
        self._loaded_loops = copy.deepcopy(checkpoint.get("loops"))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._loaded_loops = None  # trained past the loaded checkpoint
        # Only at optimizer-step boundaries: a mid-accumulation checkpoint would lose the partial gradients.
        if not self.enabled or self.requeued or self.sigterm_path or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        # What this step boundary's checkpoint holds of the validation loop: a save during the validation
        # that may follow writes it instead (see on_save_checkpoint). A few integers, copied once per step.
        self._val_progress_at_step = copy.deepcopy(trainer.fit_loop.epoch_loop.val_loop.batch_progress.state_dict())
        if trainer.global_step % self.check_every_n_steps:
            return
        usr1, term = agree_on_flags([self._active and bool(_received), bool(_sigterm)])
        if (usr1 or term) and _run_ends_at_this_step(trainer):
            # A signal at the last step: the run finishes (and exports) as usual. A requeued job would
            # resume at max_steps, where Lightning trains nothing and no export runs.
            _received.clear()
            _sigterm.clear()  # consumed: a next fit in this process (the Python API) stopped at its first step
            return
        if not (usr1 or term):
            return
        self._save_and_stop_others(trainer, usr1)
        # No validation before the exit: a stop request makes Lightning run one at once (meant for early
        # stopping), and a due one would run (a batch of it, under SIGTERM) inside the grace period for
        # nothing. The resumed run validates this step first if one was due (FaultTolerance).
        trainer.fit_loop.epoch_loop._skip_next_val = True
        if usr1:
            trainer.should_stop = True
            # Lightning ignores a stop request before trainer.min_steps / min_epochs; the job is leaving now
            # (the resumed run reads both from its config again).
            trainer.fit_loop.epoch_loop.min_steps, trainer.fit_loop.min_epochs = None, None
        else:
            # Every rank at once: Lightning raises SIGTERMException at the end of this batch (exit 143).
            trainer._signal_connector.received_sigterm = True

    def _fit_validation_batch_end(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """A signal during fit's validation: act after this batch. Waiting for the next step boundary
        meant the rest of the validation and one more step first; a long validation (a big split,
        generated samples) then outlasted SLURM's 90 s warning and the job was killed unsaved.
        Nothing of this validation is reported; the checkpoint is the step boundary's (the training
        state has not moved since), and the resumed run redoes the validation from its first batch."""
        if self.requeued or self.sigterm_path or trainer.sanity_checking or batch_idx % self.check_every_n_steps:
            return
        if trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch:
            return  # the validation is whole after this batch: it stands, and the next step boundary acts
        usr1, term = agree_on_flags([self._active and bool(_received), bool(_sigterm)])
        if not (usr1 or term):
            return
        loop = trainer.fit_loop
        redone_last = (self._loaded_loops is not None and loop.max_epochs is not None  # a redo: epoch rolled over
                       and _is_max_limit_reached(trainer.current_epoch, loop.max_epochs))
        if _run_ends_at_this_step(trainer) or redone_last:
            _received.clear()  # the last step's validation: the run finishes as usual (see on_train_batch_end)
            _sigterm.clear()
            return
        self._mid_validation = True
        try:
            self._save_and_stop_others(trainer, usr1)
        finally:
            self._mid_validation = False
        rank_zero_info(f"stopped during the validation of step {trainer.global_step}: the resumed run validates it again")
        if usr1:
            raise RequeueStop(self.stopped_message(trainer.global_step))  # every rank, after this same batch
        # Lightning's evaluation loop raises SIGTERMException after this batch (not the last), on every rank.
        trainer._signal_connector.received_sigterm = True

    def _save_and_stop_others(self, trainer: pl.Trainer, usr1: bool) -> None:
        """Save (and requeue on SIGUSR1), then keep the other callbacks from acting on the stop."""
        if usr1:
            signum = _received[0] if _received else signal.SIGUSR1
            _received.clear()
            self._save_and_requeue(trainer, signum)
            self.requeued = True
        else:
            _sigterm.clear()
            self._save_on_sigterm(trainer)
        for cb in trainer.callbacks:
            if hasattr(cb, "enabled") and type(cb).__name__ == "HFExport":
                cb.enabled = False  # the job is not finished: no Hugging Face export this time
            if isinstance(cb, ModelCheckpoint) and hasattr(cb, "_last_global_step_saved"):
                # Stopping would make it save this same step again (train end): a second full write
                # of a large model inside SLURM's 90 s warning, for nothing.
                cb._last_global_step_saved = trainer.global_step
                if not cb._last_checkpoint_saved:
                    # Lightning's own train-end save writes last.ckpt when this callback saved nothing yet in
                    # this process (a requeued segment before its first interval), whatever the step: after
                    # `scontrol requeue`, while SLURM's SIGTERM and SIGKILL come.
                    cb._last_checkpoint_saved = self.hpc_path or self.sigterm_path

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        if not self._mid_validation:
            return
        if self._loaded_loops is not None:
            # The resumed step's redone validation: at an epoch's last batch, Lightning's resume has already
            # rolled the epoch over, and loops patched from the live ones would skip the validation next time.
            checkpoint["loops"] = copy.deepcopy(self._loaded_loops)
            return
        # Saved mid-validation: write the loops as the step boundary before it left them. The training
        # batch reads as not yet completed (Lightning's "saved on train batch end", which FaultTolerance
        # resumes by redoing the step's validation), and the validation loop as before this validation.
        # Lightning would otherwise skip the validation on resume (a save "after the last batch").
        fit = checkpoint["loops"]["fit_loop"]
        progress = fit["epoch_loop.batch_progress"]
        for counts in (progress["total"], progress["current"]):
            counts["completed"] = counts["processed"] - 1
        fit["epoch_loop.val_loop.batch_progress"] = copy.deepcopy(self._val_progress_at_step)

    # --- validation / test / predict batches

    def _eval_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.enabled and trainer.state.fn != TrainerFn.FITTING:
            record_sigterm_without_collectives(trainer)  # Lightning's broadcast inside the handler hung DDP
            cpu_flag_group()  # collective: every rank, now

    on_validation_start = on_test_start = on_predict_start = _eval_start

    def _eval_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """After each evaluation batch the ranks agree on a SIGTERM (their shares are padded to equal
        batch counts) and all stop after that batch: the CLI exits 143, and no partial mean is reported
        as the split's loss. After the last batch the result is whole, and stands."""
        if not self.enabled:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._fit_validation_batch_end(trainer, batch_idx)
            return
        if agree_on_flags([bool(_sigterm)])[0]:
            _sigterm.clear()
            if trainer.state.fn == TrainerFn.PREDICTING:  # its loop has no SIGTERM check of its own
                if not trainer.predict_loop.batch_progress.is_last_batch:
                    raise SIGTERMException
            else:
                trainer._signal_connector.received_sigterm = True  # the evaluation loop raises after this batch

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _eval_batch_end

    def _save_on_sigterm(self, trainer: pl.Trainer) -> None:
        """Save `last.ckpt` at this step boundary (all ranks; atomic), so a resume loses nothing."""
        cb = trainer.checkpoint_callback
        folder = getattr(cb, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        self.sigterm_path = os.path.join(folder, f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}")
        rank_zero_info(f"SIGTERM: saving {self.sigterm_path} at step {trainer.global_step}, then stopping")
        trainer.save_checkpoint(self.sigterm_path)  # ends with a barrier: every rank's part is written
        if isinstance(cb, ModelCheckpoint):
            cb.last_model_path = self.sigterm_path

    def _save_and_requeue(self, trainer: pl.Trainer, signum: int) -> None:
        """Lightning's requeue routine (finalize loggers, save hpc_ckpt_N, rank 0 runs `scontrol
        requeue`), except that a failed requeue is recorded in `requeue_error`: Lightning only logs a
        warning, and the run would then end with exit 0 (COMPLETED in SLURM) at this step."""
        rank_zero_info(f"Handling auto-requeue signal: {signum}")
        for logger in trainer.loggers:
            logger.finalize("finished")
        self.hpc_path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(self.hpc_path)  # ends with a barrier: every rank's part is written
        if not trainer.is_global_zero:
            return
        prune_requeue_checkpoints(trainer.default_root_dir, self.hpc_path)
        job_id = slurm_job_id()
        try:
            r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            why = "" if r.returncode == 0 else (r.stderr.strip() or r.stdout.strip() or f"exit code {r.returncode}")
        except (OSError, subprocess.SubprocessError) as e:
            why = f"{type(e).__name__}: {e}"
        if why:
            self.requeue_error = f"`scontrol requeue {job_id}` failed ({why.splitlines()[0]})"
            log.warning("Requeuing SLURM job %s failed: %s", job_id, why)
        else:
            log.info("Requeued SLURM job: %s", job_id)

    def stopped_message(self, step: int) -> str | None:
        """One line for `cli.main` when this callback stopped the run but the job was not requeued."""
        if not (self.requeued and self.requeue_error):
            return None
        return (f"stopped by SLURM's preemption signal at step {step} and saved {self.hpc_path}, but {self.requeue_error}: "
                f"the job will not restart by itself; submit the same command again to resume from that "
                f"checkpoint (--ckpt_path auto, slurm/fit.sbatch's default)")
