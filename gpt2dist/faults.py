"""Crash safety: atomic checkpoints, exact-resume RNG state, NaN/inf policy, clear disk-full and OOM messages.

- `AtomicCheckpointIO` (single-file checkpoints, every strategy that uses CheckpointIO): write
  `.<name>.tmp-<pid>`, fsync, `os.replace` onto the name, fsync the folder. A SIGKILL at any
  instant leaves either the old file or the new one under the name, never half of one.
- `save_distributed_atomically` (FSDP2 sharded folders, called by `FSDP2Strategy.save_checkpoint`):
  every rank writes its shard into `.<name>.tmp`, then rank 0 fsyncs and renames it onto the name.
  Replacing an existing folder (`last.ckpt`) takes two renames (old away, new in): a kill between
  them leaves no `last.ckpt` for an instant, and `--ckpt_path last` then takes the newest `step*`
  checkpoint, which keep-last-k always holds (ModelCheckpoint deletes an old checkpoint only after
  the new one is saved: `_save_checkpoint` then `_remove_checkpoint`, lightning 2.6).
  `AtomicDeepSpeedStrategy` routes DeepSpeed's folders through the same function.
- `FaultTolerance` callback: per-rank training RNG states in every checkpoint, restored right
  before the first batch after a resume; a non-finite loss/gradient policy (skip the step, or stop
  and name the last good checkpoint).
- `check_validation_on_step_boundary` (before fit) and `check_validation_schedule` (train start):
  validation, and the checkpoints saved after it, must end an optimizer step, or no resume from
  them is exact (Lightning counts val_check_interval in micro-batches). `trim_epochs_to_whole_steps`
  (setup) keeps the presets' data-sized epochs from drifting there: a whole number of steps each.
- `oom_message`: what `cli.main` prints on a CUDA out-of-memory error.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gpt2dist.errors import CheckpointError, ConfigError, GPT2DistError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- atomic writes


def fsync_dir(path: str | Path) -> None:
    """Persist a rename: the folder entry itself must reach the disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failed(err: RuntimeError) -> bool:
    """torch.save's zip writer reports a failed write as RuntimeError ("unexpected pos ..."), with the
    OSError in its context; any other RuntimeError (a CUDA error) is not the disk's and stays as it is."""
    cause = err.__cause__ or err.__context__
    return isinstance(cause, OSError) or "unexpected pos" in str(err) or "PytorchStreamWriter" in str(err)


def _save_failed(path: Path, err: BaseException) -> CheckpointError:
    # torch.save's zip writer reports a failed write as a RuntimeError ("unexpected pos ..."); the
    # OSError that says why (ENOSPC, a quota) is in its context chain.
    chain, cause = [], err
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    errnos = {getattr(c, "errno", None) for c in chain if isinstance(c, OSError)}
    if errno.ENOSPC in errnos or any("No space left" in str(c) for c in chain):
        what = f"disk full in {path.parent}"
    elif errno.EDQUOT in errnos:
        what = f"disk quota exceeded in {path.parent}"
    else:  # the OSError, when there is one, says more than torch's "unexpected pos"
        shown = next((c for c in chain if isinstance(c, OSError)), err)
        what = f"{type(shown).__name__}: {str(shown).splitlines()[0][:200] if str(shown) else ''}"
    kept = [p.name for p in sorted(path.parent.glob("*.ckpt")) if not p.name.startswith(".")]
    return CheckpointError(
        f"could not save checkpoint {path} ({what}); nothing was replaced, the previous checkpoints are intact "
        f"({', '.join(kept) or 'none yet'}). Free space (or fix the folder), then resume with --ckpt_path last")


def temporary_name(path: Path, suffix: str) -> Path:
    """The hidden name `path` is written under before its rename. Never holding "hpc_ckpt_": Lightning takes
    any such name for a requeue checkpoint, joining all its digits (.hpc_ckpt_1.ckpt.tmp-4242 read as
    hpc_ckpt_14242.ckpt: a resume of a file that does not exist, and the next save's number)."""
    return path.with_name(f".{path.name.replace('hpc_ckpt_', 'hpc-ckpt-')}{suffix}")


def remove_stale_hpc_temporaries(root_dir: str | Path) -> None:
    """Temporaries of Lightning's hpc_ckpt_* saves left in `root_dir` by a job killed while saving (the
    SIGUSR1 save running past the time limit): Lightning misreads the old names (see temporary_name),
    and a new name is cleaned only when the same checkpoint name is saved again. Before fit picks a
    checkpoint; on every rank (idempotent)."""
    root = Path(root_dir)
    if "://" in str(root_dir) or not root.is_dir():
        return
    for stale in [*root.glob(".hpc_ckpt_*.tmp*"), *root.glob(".hpc-ckpt-*.tmp*"), *root.glob(".hpc_ckpt_*.old"),
                  *root.glob(".hpc-ckpt-*.old")]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary name, fsync, then rename: a checkpoint name is always complete."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if str(path).startswith("file://"):  # a local path: written atomically below
            path = str(path)[len("file://"):]
        elif "://" in str(path):  # s3://, gs://: Path() would make it a local folder named "s3:"
            return super().save_checkpoint(checkpoint, path, storage_options)  # fsspec's write (object stores: whole)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path, f".tmp-{os.getpid()}")
        for stale in path.parent.glob(temporary_name(path, ".tmp-*").name):  # left by a run killed writing this name
            stale.unlink(missing_ok=True)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)  # whatever stopped the write: no partial file is left behind
            if isinstance(e, OSError) or isinstance(e, RuntimeError) and _write_failed(e):
                raise _save_failed(path, e) from None
            raise
        _fsync_renamed(path)


def _fsync_renamed(path: Path) -> None:
    """Make a rename durable. After it, the new checkpoint is in place: a folder that refuses fsync (EINVAL
    on some FUSE and network mounts) is a warning, not "nothing was replaced" (false) and a stopped run."""
    try:
        fsync_dir(path.parent)
    except OSError as e:
        log.warning("saved %s, but could not fsync its folder (%s): a power loss now could undo the rename", path, e)


def _saves_sharded(strategy) -> bool:
    """Whether the strategy writes its checkpoints through save_distributed_atomically (strategies.py)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return (isinstance(strategy, DeepSpeedStrategy) or getattr(strategy, "_save_distributed_checkpoint", False)
            or getattr(strategy, "_state_dict_type", None) == "sharded")


def save_distributed_atomically(strategy, save, checkpoint: dict, filepath) -> None:
    """`save(checkpoint, tmp)` on every rank (a sharded folder), then rank 0 renames tmp onto filepath."""
    if "://" in str(filepath):
        raise CheckpointError(f"cannot save the sharded checkpoint {filepath}: FSDP and DeepSpeed write one file per "
                              "rank to a shared filesystem, not a URL; set checkpoint.dirpath (or "
                              "trainer.default_root_dir) to a shared folder")
    path = Path(strategy.broadcast(str(filepath)))
    tmp = temporary_name(path, ".tmp")
    if strategy.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-write
    strategy.barrier("atomic_save_start")
    error: BaseException | None = None
    try:
        save(checkpoint, tmp)
    except BaseException as e:  # DCP raises CheckpointException, a BaseException
        error = e
    # Every rank must know whether every rank wrote its shard before anything is renamed.
    if strategy.reduce_boolean_decision(error is not None, all=False):
        if strategy.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(path, error or OSError("another rank failed to write its shard"))
    failed = None
    if strategy.global_rank == 0:
        try:
            for folder, _, files in os.walk(tmp):  # DeepSpeed folders nest (<tag>/*.pt)
                for name in files:
                    with open(os.path.join(folder, name), "rb") as fh:
                        os.fsync(fh.fileno())
                fsync_dir(Path(folder))
            old = temporary_name(path, ".old")
            if path.exists() or path.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
                # save_last=link's last.ckpt links to a folder: the link goes, not the folder
                os.replace(path, old) if path.is_dir() and not path.is_symlink() else path.unlink()
            os.replace(tmp, path)
        except OSError as e:  # e.g. a network filesystem's quota, reported at fsync
            failed = str(_save_failed(path, e))
        else:
            _fsync_renamed(path)
            shutil.rmtree(old, ignore_errors=True)
    # Rank 0's failure is every rank's: the others would otherwise wait at the next collective for ever.
    failed = strategy.broadcast(failed, src=0)
    if failed:
        raise CheckpointError(failed)
    strategy.barrier("atomic_save_end")


def is_complete_distributed_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "meta.pt").is_file() and any(path.glob("*.distcp"))


# ----------------------------------------------------------------------------- the callback


def _rng_state() -> dict:
    # Tensors and plain Python values only: Lightning resumes with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            # This rank's own GPU only: touching every visible GPU would open a CUDA context (~500 MB) on
            # each of them from every rank.
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    cuda = s.get("cuda")
    if isinstance(cuda, list):  # checkpoints before 2026-11-26 held every visible GPU's state
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.current_device() < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


class FaultTolerance(Callback):
    """Exact resume of RNG streams, and what to do about a non-finite loss or gradient."""

    def __init__(self, nan_policy: Literal["skip", "stop", "off"] = "stop", max_consecutive_nan: int = 3,
                 save_rng_state: bool = True):
        """
        Args:
            nan_policy: On a non-finite loss or gradient: skip (no update, count it), stop (name the last good checkpoint), or off (no check).
            max_consecutive_nan: With skip: stop after this many non-finite steps in a row.
            save_rng_state: Store every rank's torch/numpy/python RNG state in checkpoints and restore it on resume.
        """
        if max_consecutive_nan < 1:
            raise GPT2DistError(f"faults.max_consecutive_nan={max_consecutive_nan} must be >= 1")
        self.nan_policy, self.max_consecutive_nan, self.save_rng_state = nan_policy, max_consecutive_nan, save_rng_state
        self.consecutive = 0
        self.skipped = 0
        self._logged_skipped = 0
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, non-finite flag on the device), not yet read
        self._pending_rng: dict | None = None
        self._train_rng: dict | None = None
        self._trainer = None
        self._redoing_validation = False
        # The fit's resolved --ckpt_path (None: fresh), set by the CLI: checkpoints that `last`/`auto`
        # would prefer over this fit's are set aside at setup. "unknown" (Python API): nothing moves.
        self.fit_ckpt_path: str | None = "unknown"

    # --- state -------------------------------------------------------------

    def state_dict(self) -> dict:
        trainer = self._trainer
        if self._pending and trainer is not None:
            self._settle(trainer)  # a due stop raises before this checkpoint is written
        state: dict[str, Any] = {"skipped": self.skipped, "consecutive": self.consecutive}
        if self.save_rng_state:
            own = self._train_rng
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            world = torch.distributed.get_world_size() if distributed else 1
            if own is None and self._pending_rng is not None and len(self._pending_rng) == world:
                # Resumed, before the first training batch applied it (a redone validation's save, an
                # early stop there): the checkpoint's state is training's, not what validation drew since.
                own = self._pending_rng[torch.distributed.get_rank() if world > 1 else 0]
            own = own or _rng_state()
            # Called on every rank by Trainer.save_checkpoint; rank 0's copy is what gets written.
            if distributed:
                states: list = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(states, own)
            else:
                states = [own]
            state["rng"] = states
        return state

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = state.get("skipped", 0), state.get("consecutive", 0)
        self._pending_rng = state.get("rng") if self.save_rng_state else None

    # --- RNG: training's stream is the same whether or not a run was interrupted -----------------
    # Whatever runs between two training batches may draw from the global RNGs: validation (each
    # DataLoader iterator draws a base seed), checkpoint saving, logging. A resumed run skips some of
    # it (the validation of the step it resumed at), so the state each checkpoint stores is the one
    # at the end of the training batch, and every batch starts from it: training's dropout stream
    # never depends on what ran in between, in an uninterrupted run or a resumed one.

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict() takes no trainer, and must settle pending flags
        if stage == "fit":
            trim_epochs_to_whole_steps(trainer)
            # A second fit with this callback (Python API) starts clean; a checkpoint's state is loaded after this.
            self.skipped = self.consecutive = self._logged_skipped = 0
            self._pending, self._pending_rng, self._train_rng = [], None, None
            from gpt2dist.resume import check_ranks_share_the_run

            # Before the checkpoint is restored: a rank that sees another run folder stops every rank here.
            root, ckpt_dir = str(trainer.default_root_dir), getattr(trainer.checkpoint_callback, "dirpath", None)
            if "://" in str(ckpt_dir) and _saves_sharded(trainer.strategy):  # else it fails at the first save
                raise ConfigError(f"checkpoint.dirpath={ckpt_dir} is a URL, but {type(trainer.strategy).__name__} "
                                  "writes sharded checkpoints (one file per rank) to a shared filesystem; set "
                                  "checkpoint.dirpath (or trainer.default_root_dir) to a shared folder")
            outside = ckpt_dir and ("://" in str(ckpt_dir) or not Path(ckpt_dir).resolve().is_relative_to(Path(root).resolve()))
            check_ranks_share_the_run([root, *([str(ckpt_dir)] if outside else [])], self.fit_ckpt_path)  # URLs: skipped there

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        from gpt2dist.data import start_the_epoch_a_resume_is_in
        from gpt2dist.monitor import forget_step_grad_norm

        forget_step_grad_norm(pl_module)  # a previous fit's (a NaN norm at the step a rollback resumes at)

        start_the_epoch_a_resume_is_in(trainer)  # a resume at an epoch's end: the next epoch's data
        check_validation_schedule(trainer)  # before anything moves: a refused run changes nothing
        if self.fit_ckpt_path != "unknown":
            from gpt2dist.resume import set_aside_other_runs

            # Before any save, and after everything that can refuse the run (a failed start moves nothing);
            # before the last.ckpt lookup below. One rank moves, all wait.
            moved = None
            if trainer.is_global_zero:
                moved = set_aside_other_runs(self.fit_ckpt_path, trainer.default_root_dir,
                                             getattr(trainer.checkpoint_callback, "dirpath", None))
            trainer.strategy.barrier("gpt2dist_set_aside")
            if trainer.is_global_zero:
                from gpt2dist.resume import clear_start_record

                clear_start_record(trainer.default_root_dir)  # set aside: a requeue now goes on from its own saves
            how = "starts fresh" if self.fit_ckpt_path is None else f"starts from {self.fit_ckpt_path}"
            self.fit_ckpt_path = "unknown"  # once per fit the CLI prepared
            if moved:
                dest, paths = moved
                log.warning("fit %s: moved %d checkpoint(s) that --ckpt_path last|auto would have chosen over this "
                            "run's (%s: an earlier run's, or the continuation this rollback abandons) to %s; nothing "
                            "was deleted", how, len(paths), ", ".join(p.name for p in paths), dest)
        if trainer.global_step > 0:
            from gpt2dist.resume import reconcile_best

            reconcile_best(trainer)
        if trainer.global_step > 0:
            redo = self._redo_validation_of_resumed_step(trainer)
            # Resumed at a step boundary: Lightning's ModelCheckpoint forgets it already saved this step
            # and would save it again (after the next micro-batch, mid-accumulation, or at the epoch end
            # the resumed loop reaches again) beside the good one, as step<N>-v1. Except for the
            # validation redone above: a callback that saves at validation ends must still consider it
            # (best-by-val/loss, the step file), as the uninterrupted run did.
            for cb in trainer.checkpoint_callbacks:
                if hasattr(cb, "_last_global_step_saved") and not (redo and _saves_at_validation_end(cb, trainer)):
                    cb._last_global_step_saved = trainer.global_step
                # A step file holds the state from before that step's last.ckpt save (no last_model_path):
                # resumed from it, Lightning would write last-v1.ckpt beside the run's last.ckpt.
                if isinstance(cb, ModelCheckpoint) and cb.save_last and not cb.last_model_path and cb.dirpath:
                    last = cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST)
                    if os.path.exists(last):
                        cb.last_model_path = last

    def _redo_validation_of_resumed_step(self, trainer: pl.Trainer) -> bool:
        """A step's checkpoint is written at the end of its training batch, before that step's
        validation. Lightning, resuming from it, skips the validation: a SIGTERM or requeue save at a
        validation step lost that validation for good (no val/loss there, no best checkpoint
        considered, early stopping one check short). Here it runs first, as Lightning does for a
        checkpoint written mid-validation, from the first batch. No effect when the step has no
        validation, or when the checkpoint is the end-of-fit last.ckpt. Returns whether it will run."""
        from lightning.pytorch.loops.evaluation_loop import RestartStage

        epoch_loop = trainer.fit_loop.epoch_loop
        if not (epoch_loop.restarting and epoch_loop.restarted_on_train_batch_end):
            return False
        val_loop = epoch_loop.val_loop
        # Lightning's restart consults this only where a validation is due (`advance`), and then
        # returns before the next training batch so that `on_advance_end` validates.
        val_loop._restart_stage = RestartStage.RESTARTED_MID_EVALUATION
        val_loop.batch_progress.current.reset()  # from the first batch, not the previous validation's end
        self._redoing_validation = True  # until the first training batch: see on_validation_start
        return True

    def on_validation_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self._redoing_validation and trainer.state.fn == "fit":
            self._redoing_validation = False
            # The resumed loop already counted the checkpoint's batch for the loggers' step, and counts
            # it again after this validation: without this, val metrics and every later row would be
            # logged one step later than in the uninterrupted run.
            trainer.fit_loop.epoch_loop._batches_that_stepped -= 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._redoing_validation = False  # the resumed step had no validation due
        if self._pending_rng is None:
            if self._train_rng is not None:
                _set_rng_state(self._train_rng)
            return
        states, self._pending_rng = self._pending_rng, None
        if len(states) == trainer.world_size:
            _set_rng_state(states[trainer.global_rank])
        elif trainer.is_global_zero:
            log.warning("resume: checkpoint has RNG states for %d ranks, this run has %d: RNG streams (dropout) "
                        "are not restored, so the run is not bitwise identical", len(states), trainer.world_size)

    # --- non-finite values ---------------------------------------------------
    # The check is the full model's gradient norm (the one TrainMonitor logs: computed once per
    # step), the same on every rank: DDP grads are averaged, FSDP shards' squares summed across
    # ranks. A NaN/inf loss makes NaN gradients. DeepSpeed keeps its own gradients and its own overflow
    # check (it skips such a step): there the loss is checked, as under 16-mixed.
    #
    # With a fused AdamW (the default on GPUs), nothing waits for the GPU: the flag goes to the
    # kernel as `found_inf`, the mechanism GradScaler uses, and the kernel itself leaves weights,
    # moments and step count untouched when it is set. The host reads the flags later, where it
    # syncs anyway: logging steps, before any checkpoint is written, at the end. A stop therefore
    # comes a few steps late, but the skipped update was never applied and no checkpoint is
    # written after it. Other optimizers: the flag is read at once (one host sync per step).
    # Under 16-mixed the GradScaler skips overflowing steps; only the loss is checked (see below).

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        if self.nan_policy == "off":
            return
        from gpt2dist.monitor import step_grad_norm
        from gpt2dist.optim import skips_on_found_inf

        from lightning.pytorch.strategies import DeepSpeedStrategy

        deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)
        if deepspeed and trainer.fit_loop._should_accumulate():
            # DeepSpeed's engine accumulates, so Lightning "steps" it every micro-batch; the window's loss is
            # known at its last one. Checked here, the last window's loss was counted again per micro-batch
            # (one bad step, accumulate 8: "8 in a row", a stop blaming the next, healthy step).
            return
        norm = step_grad_norm(trainer, pl_module)
        if norm is None and not deepspeed:
            return
        step = trainer.global_step + 1
        opt = getattr(optimizer, "_optimizer", optimizer)  # under a LightningOptimizer
        if deepspeed or getattr(trainer.precision_plugin, "scaler", None) is not None:
            # 16-mixed: an overflowing gradient is the GradScaler's to skip (routine while it lowers its
            # scale from 65536; it skips the step and halves the scale). Only a non-finite loss is a fault.
            # DeepSpeed: its engine holds the gradients and skips an overflowing step itself, silently (five
            # in a row went by with exit 0 and an export): the loss is checked, counted and stopped on here.
            loss = getattr(pl_module, "window_loss_sum", None)
            if loss is None:
                return
            bad = not bool(torch.isfinite(torch.as_tensor(loss)))
            if trainer.world_size > 1:
                bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
            self._account(trainer, step, bad)  # its gradients are non-finite too: the scaler skips the update
            return
        if skips_on_found_inf(opt):
            flag = (~torch.isfinite(norm.detach())).to(torch.float32).reshape(())
            if trainer.world_size > 1:  # a rank that disagrees (a fault on one device): all skip
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            opt.found_inf = flag
            self._pending.append((step, flag))
            if len(self._pending) >= 256:  # bounded, whatever the logging interval
                self._settle(trainer)
            return
        bad = not bool(torch.isfinite(norm))  # the one host sync of the step
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            for p in pl_module.parameters():  # no gradient, no update: AdamW skips these parameters
                p.grad = None
        self._account(trainer, step, bad)

    def _account(self, trainer: pl.Trainer, step: int, bad: bool) -> None:
        """Count a step's verdict; stop (raise) when the policy says so."""
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        if self.nan_policy == "stop" or self.consecutive >= self.max_consecutive_nan:
            why = ("faults.nan_policy=stop" if self.nan_policy == "stop"
                   else f"{self.consecutive} consecutive non-finite steps (faults.max_consecutive_nan={self.max_consecutive_nan})")
            self._pending = []
            raise GPT2DistError(f"non-finite loss or gradient norm at step {step}; stopped by {why}. "
                                f"The last good checkpoint is {last_good_checkpoint(trainer)}: lower model.lr or "
                                f"check the data near this step, then resume with --ckpt_path last")
        if trainer.is_global_zero:
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
                        step, self.consecutive, self.skipped)

    def _settle(self, trainer: pl.Trainer) -> None:
        """Read the deferred flags (one host sync) and account for them in step order."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([f for _, f in pending]).cpu().tolist()
        for (step, _), bad in zip(pending, flags):
            self._account(trainer, step, bad > 0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.save_rng_state:
            self._train_rng = _rng_state()
        from gpt2dist.monitor import logs_this_step

        # Before ModelCheckpoint's hook (Lightning runs checkpoint callbacks last), so a due stop
        # comes before this step's checkpoint; state_dict() settles too, for any other save.
        if self._pending and (logs_this_step(trainer) or trainer.global_step >= trainer.max_steps > 0
                              or any(_saves_at(cb, trainer.global_step) for cb in trainer.checkpoint_callbacks)):
            self._settle(trainer)
        if self.skipped != self._logged_skipped:
            self._logged_skipped = self.skipped
            pl_module.log("train/nan_skipped", torch.tensor(float(self.skipped)), rank_zero_only=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._settle(trainer)  # before the end-of-fit export (a later callback); a due stop raises here
        # The steps after the last interval save (max_steps not a multiple of every_n_train_steps)
        # would be lost to a resume, and last.ckpt would lag behind the exported model: save
        # last.ckpt at the final step. (Lightning's own end-of-fit save only runs when nothing was
        # saved at all.) Not reached after a NaN stop or a SIGTERM: those raise before the end.
        for cb in trainer.checkpoint_callbacks:
            if (isinstance(cb, ModelCheckpoint) and cb.save_last and cb._last_checkpoint_saved
                    and cb._last_global_step_saved != trainer.global_step):
                if cb.save_last == "link":  # a link to the last interval file, not this step: a file of its own
                    cb._last_checkpoint_saved = ""
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                cb._last_global_step_saved = trainer.global_step


def save_deferred_interval_checkpoints(trainer: pl.Trainer) -> None:
    """At an epoch's last batch Lightning defers a monitored interval save (our step checkpoint monitors `step`)
    to the validation it expects there: any, when check_val_every_n_epoch is None. With val_check_interval in
    steps there was none, and the save came at the next on_train_batch_end, one micro-batch into the next
    epoch, mid-accumulation: a resume from that step file (a kill early in the next epoch, a rollback) lost
    the micro-batch's gradient. Saved here instead, at the end of the epoch's last batch, as every other
    interval save is (before a validation of that step, which a resume redoes). Called from
    GPT2Module.on_train_batch_end: the one hook after ModelCheckpoint's (Lightning runs those last)."""
    for cb in trainer.checkpoint_callbacks:
        if not (isinstance(cb, ModelCheckpoint) and getattr(cb, "_defer_save_until_validation", False)):
            continue
        # Only for a monitor that is fresh at every step (the step checkpoint's `step`, or a training metric): a
        # validation metric could be stale here, and that save waits for the validation, as Lightning means it to.
        if not (cb.monitor in ("step", "epoch") or str(cb.monitor).startswith("train/")):
            continue
        due = _saves_at(cb, trainer.global_step) or cb._train_time_interval is not None
        candidates = cb._monitor_candidates(trainer)
        if due and cb.monitor in candidates and not cb._should_skip_saving_checkpoint(trainer):
            cb._save_topk_checkpoint(trainer, candidates)
            cb._save_last_checkpoint(trainer, candidates)
            cb._defer_save_until_validation = False


def _saves_at_validation_end(cb, trainer: pl.Trainer) -> bool:
    """Whether ModelCheckpoint `cb` saves when a validation ends (not at training batch or epoch ends)."""
    return (isinstance(cb, ModelCheckpoint) and not cb._every_n_train_steps and cb._train_time_interval is None
            and not cb._should_save_on_train_epoch_end(trainer))


def _saves_at(cb, step: int) -> bool:
    """Whether ModelCheckpoint `cb` saves after this optimizer step (step-interval saves)."""
    every = getattr(cb, "_every_n_train_steps", 0) or 0
    return every > 0 and step % every == 0


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    from gpt2dist.resume import newest_checkpoint

    try:
        found = newest_checkpoint(trainer.default_root_dir, getattr(trainer.checkpoint_callback, "dirpath", None))
    except CheckpointError:
        found = None
    return f"{found[0]} (step {found[1][0]})" if found else "none (no checkpoint saved yet)"


def check_writable(root: str | None, what: str = "trainer.default_root_dir") -> None:
    """`what` (trainer.default_root_dir, a logger's save_dir) must be a folder we can create files in:
    checked before any work. `~` is expanded as Lightning expands default_root_dir (a literal `./~` folder
    would be made and checked instead); a remote URL (s3://...) is left to its filesystem."""
    if root and "://" in str(root):
        return
    path = Path(os.path.expanduser(str(root)) if root else os.getcwd())
    probe = path / f".gpt2dist-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GPT2DistError(f"{what}={str(path)!r} is not writable ({e.strerror or type(e).__name__}); "
                            f"choose a folder you can write to") from None


_MID_STEP = "validation and its checkpoints fall inside an optimizer step, which a resume cannot rebuild"


def check_validation_on_step_boundary(trainer: pl.Trainer) -> None:
    """Before fit, from the config: Lightning counts an int trainer.val_check_interval in micro-batches.
    Not a multiple of accumulate_grad_batches, validation (and the checkpoints saved after it) lands
    inside an optimizer step: e.g. 500 with accumulate 8 is step 62.5, and a resume from that file
    rebuilds step 63 from only 4 of its 8 micro-batches (the accumulated gradients are not in the
    checkpoint). A time interval validates at whatever micro-batch the clock reaches. Fractions of an
    epoch and epochs that do not divide: `check_validation_schedule`, at train start."""
    accum = trainer.accumulate_grad_batches
    if accum <= 1 or trainer.limit_val_batches == 0:
        return
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        raise GPT2DistError(f"a time-based trainer.val_check_interval validates at whatever micro-batch the clock "
                            f"reaches, and with trainer.accumulate_grad_batches={accum} {_MID_STEP}; give a number "
                            f"of micro-batches, a multiple of {accum}")
    every = getattr(trainer, "val_check_interval", None)
    if isinstance(every, int) and not isinstance(every, bool) and every % accum:
        near = max(1, every // accum)
        raise GPT2DistError(f"trainer.val_check_interval={every} counts micro-batches, and with "
                            f"trainer.accumulate_grad_batches={accum} {_MID_STEP}; use a multiple of {accum}: "
                            f"{every * accum} validates every {every} optimizer steps, {near * accum} every {near}")


def _validation_mid_step(trainer: pl.Trainer, accum: int, batches: int, every: int) -> tuple[int, int] | None:
    """(epoch, micro-batch) of the first validation inside an optimizer step, with `batches` micro-batches per
    epoch and validation every `every`; None when each falls on a step boundary or an epoch's end."""
    if trainer.check_val_every_n_epoch is not None:  # counted within each epoch: the same micro-batches every epoch
        counts = range(every, batches + 1, every)
    else:  # counted across epochs; the epoch positions repeat after batches / gcd(batches, every) validations
        steps_per_epoch = math.ceil(batches / accum)
        # The micro-batches this fit can see: up to max_steps, and within max_epochs (whichever ends it first;
        # the presets set max_steps, and --trainer.max_epochs 1 on a small corpus was refused for epochs it
        # would never reach).
        total = batches * (trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 10**9)
        if trainer.max_steps > 0:
            full, rest = divmod(trainer.max_steps, steps_per_epoch)
            total = min(total, full * batches + min(batches, rest * accum))
        counts = range(every, min(total, every * (batches // math.gcd(batches, every))) + 1, every)
    for t in counts:
        epoch, at = divmod(t - 1, batches)
        if (at + 1) % accum and at + 1 != batches:  # neither a step boundary nor the epoch's last micro-batch
            return epoch, at
    return None


def trim_epochs_to_whole_steps(trainer: pl.Trainer) -> None:
    """In setup, before Lightning sizes the epoch: with check_val_every_n_epoch=null (the presets) an epoch
    of micro-batches that is not a multiple of accumulate_grad_batches lets validation drift into optimizer
    steps from the second epoch on, which `check_validation_schedule` refuses. The presets' epoch length is
    the data's (WikiText-103 on 8 GPUs: a coin toss for accumulate 2, 7 in 8 for 8), so rather than refuse,
    each epoch leaves out its last few micro-batches (trainer.limit_train_batches, as the refusal's fix
    says; the next epoch reshuffles them in). Every optimizer step then has all its micro-batches."""
    accum, every = getattr(trainer, "accumulate_grad_batches", 1), getattr(trainer, "val_check_interval", None)
    dm = getattr(trainer, "datamodule", None)
    train_set, batch_size = getattr(dm, "train_set", None), getattr(dm, "batch_size", None)
    if (accum <= 1 or trainer.check_val_every_n_epoch is not None or trainer.limit_val_batches == 0
            or not isinstance(every, int) or isinstance(every, bool) or every % accum
            or train_set is None or not isinstance(batch_size, int)):
        return  # not this case, or check_validation_on_step_boundary's refusal (every not a multiple)
    val_set = getattr(dm, "val_set", None)
    if val_set is not None and not len(val_set):
        return
    micro = len(train_set) // trainer.world_size // batch_size  # per process, as the loader drops a partial batch
    limit = trainer.limit_train_batches
    batches = min(micro, int(limit)) if isinstance(limit, int) else int(micro * limit)
    if batches < accum or not batches % accum or _validation_mid_step(trainer, accum, batches, every) is None:
        return
    trainer.limit_train_batches = batches - batches % accum
    log.info("trainer.limit_train_batches=%d: each epoch leaves out its last %d of %d micro-batch(es) per process, so "
             "that validation every %d stays on optimizer-step boundaries across epochs (accumulate_grad_batches=%d)",
             trainer.limit_train_batches, batches % accum, batches, every, accum)


def check_validation_schedule(trainer: pl.Trainer) -> None:
    """At train start, with the epoch's length known (trainer.num_training_batches, per process): what
    `check_validation_on_step_boundary` cannot see from the config. Lightning steps every `accumulate`
    micro-batches counted from each epoch's start, and at the epoch's end, but with
    check_val_every_n_epoch=null (the presets) it validates every val_check_batch micro-batches counted
    across epochs: when an epoch's micro-batches are not a multiple of `accumulate`, validation can drift
    into optimizer steps from the second epoch on. A fraction of an epoch (a float interval) can too."""
    accum, batches, every = trainer.accumulate_grad_batches, trainer.num_training_batches, trainer.val_check_batch
    if accum <= 1 or not trainer.enable_validation or not every or math.isinf(every) or math.isinf(batches):
        return
    val_set = getattr(trainer.datamodule, "val_set", None)
    if val_set is not None and not len(val_set):  # no validation split (data.val_fraction 0): nothing is saved mid-step
        return
    every, batches = int(every), int(batches)
    mid_step = _validation_mid_step(trainer, accum, batches, every)
    if mid_step is None:
        return
    epoch, at = mid_step
    if every % accum:
        fix = f"give a number of micro-batches, a multiple of {accum}"
    elif batches < accum:  # limit_train_batches would be 0: no training at all
        fix = (f"an epoch is less than one optimizer step, so validate at epoch ends: set "
               f"trainer.val_check_interval={math.ceil(every / batches) * batches} (a multiple of {batches}), "
               f"or lower trainer.accumulate_grad_batches to at most {batches}")
    else:  # with gpt2dist's DataModule, trim_epochs_to_whole_steps did this already
        fix = (f"set trainer.limit_train_batches={batches - batches % accum} (each epoch then leaves out its "
               f"last {batches % accum} micro-batch(es) of {batches})")
    raise GPT2DistError(f"validation every {every} micro-batches (trainer.val_check_interval="
                        f"{trainer.val_check_interval}) with trainer.accumulate_grad_batches={accum} and "
                        f"{batches} micro-batches per epoch per process reaches micro-batch {at + 1} of epoch "
                        f"{epoch}: {_MID_STEP}; {fix}")


def check_strategy_accelerator(trainer: pl.Trainer) -> None:
    """DeepSpeed and FSDP1 need CUDA; Lightning finds out only after launching (a RuntimeError)."""
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if getattr(strategy, "runs_on_cpu", False):  # test-only subclasses (tests/cpu_strategies.py) that run them on gloo
        return
    if isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)) and not isinstance(trainer.accelerator, CUDAAccelerator):
        kind = "DeepSpeed" if isinstance(strategy, DeepSpeedStrategy) else "FSDP1"
        raise GPT2DistError(f"trainer.strategy {type(strategy).__name__} ({kind}) needs CUDA GPUs, but the accelerator is "
                            f"{type(trainer.accelerator).__name__.replace('Accelerator', '').lower()}; on CPU use "
                            f"configs/strategy/fsdp.yaml (FSDP2) or configs/strategy/ddp.yaml")


# ----------------------------------------------------------------------------- OOM


def oom_message(info: dict) -> str:
    """One paragraph for `cli.main` when CUDA runs out of memory: what the failing stage held per process,
    and what to lower for it (generation and evaluation have knobs of their own)."""
    strategy = info.get("strategy", "?")
    stage = info.get("stage", "fit")
    sharded = "a sharded strategy for a model one GPU cannot hold (configs/strategy/fsdp.yaml)"
    if stage == "predict":
        return (f"out of memory generating (data.predict_batch_size={info.get('predict_batch_size')} prompts x "
                f"model.samples_per_prompt={info.get('samples_per_prompt')} rows per generate call, each up to "
                f"model.max_new_tokens={info.get('max_new_tokens')} new tokens, strategy {strategy}, "
                f"{info.get('world_size')} process(es)). Try: lower data.predict_batch_size (the KV cache grows with "
                f"rows x tokens); bf16 precision; {sharded}")
    if stage in ("validate", "test"):
        return (f"out of memory evaluating (data.batch_size={info.get('batch_size')} x data.block_size="
                f"{info.get('block_size')} tokens per process, strategy {strategy}, {info.get('world_size')} "
                f"process(es)). Try: lower data.batch_size (evaluation uses the training micro-batch); bf16 precision; {sharded}")
    return (f"out of memory (micro-batch data.batch_size={info.get('batch_size')} x data.block_size={info.get('block_size')} "
            f"tokens per process, trainer.accumulate_grad_batches={info.get('accumulate')}, strategy {strategy}, "
            f"{info.get('world_size')} process(es)). Try: halve data.batch_size and double "
            f"trainer.accumulate_grad_batches and trainer.val_check_interval (same global batch, same validation "
            f"steps: the interval counts micro-batches); activation checkpointing "
            f"(model.activation_checkpointing=true); a sharded strategy "
            f"(configs/strategy/fsdp.yaml); bf16 precision. Estimate first with: "
            f"{plan_command(info)}")


def plan_command(info: dict) -> str:
    """The `tools/plan.py` command that estimates this run's memory (its shape, accumulation, precision,
    compile, padding)."""
    import shlex

    cmd = (f"python tools/plan.py --model {shlex.quote(str(info.get('model', 'gpt2')))} --gpus {info.get('world_size')} "
           f"--seq {info.get('block_size')} --micro-batch {info.get('batch_size')}")
    if int(info.get("accumulate") or 1) > 1:  # the gradients then stay through every micro-batch
        cmd += f" --accumulate {info['accumulate']}"
    if info.get("precision") == "bf16-true":
        cmd += " --precision bf16-true"
    # This run's padding and compile for every row (plan.py's defaults are the presets' per strategy).
    cmd += f" --pad-vocab {int(info.get('pad_vocab') or 1)}"
    if info.get("compile") is not None:
        cmd += f" --compile {'on' if info['compile'] else 'off'}"
    if info.get("gpu_mem_gb"):  # the card that ran out, not plan.py's default 80 GB
        cmd += f" --gpu-mem-gb {info['gpu_mem_gb']:g}"
    unplanned = [f"precision {info['precision']} (planned as bf16-mixed)"] if info.get("precision") not in (
        None, "bf16-mixed", "bf16-true") else []
    if info.get("config_overrides"):
        unplanned.append(f"model.config_overrides {info['config_overrides']} (planned as the base model)")
    return cmd + (f"  # not modelled: {'; '.join(unplanned)}" if unplanned else "")
