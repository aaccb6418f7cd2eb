"""TEST-ONLY callbacks that inject faults into a real `gpt2dist fit` subprocess.

Passed through a config overlay (`trainer.callbacks: [{class_path: fault_plugins.KillAt, ...}]`)
with tests/ on PYTHONPATH. Never used by the package itself.
"""

from __future__ import annotations

import errno
import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


def _kill_group() -> None:
    # The test starts the CLI in its own session: this kills it and every DDP/FSDP child at once,
    # like a node failure (no handler, no cleanup, no flush).
    os.killpg(os.getpgid(0), signal.SIGKILL)


class KillAt(Callback):
    """SIGKILL the run at optimizer step `step` (1-based): `mid_accumulation` after the first
    micro-batch's backward of that step; `during_save` while that step's checkpoint `name` lies
    complete under its temporary name, before the rename; `between_renames` after an existing
    sharded `name` was moved away and before the new one is renamed in; `before_train` at fit's setup
    (e.g. a requeue while data is prepared), `step` unused."""

    def __init__(self, step: int, when: str = "mid_accumulation", name: str = "last.ckpt"):
        self.step, self.when, self.name = step, when, name
        self._real_replace = os.replace

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.when == "before_train" and stage == "fit":
            _kill_group()

    def on_train_start(self, trainer, pl_module) -> None:
        if self.when in ("mid_accumulation", "before_train") or trainer.global_rank != 0:
            return
        real, me = self._real_replace, self

        def replace(src, dst, *a, **k):
            src_s, dst_s = str(src), str(dst)
            hit = trainer.global_step >= me.step and os.path.basename(dst_s).startswith((me.name, "." + me.name))
            if hit and me.when == "during_save" and ".tmp" in os.path.basename(src_s):
                _kill_group()
            real(src, dst, *a, **k)
            if hit and me.when == "between_renames" and dst_s.endswith(".old"):
                _kill_group()

        os.replace = replace

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.when == "mid_accumulation" and trainer.global_step + 1 == self.step:
            _kill_group()


class InjectNaN(Callback):
    """Make step `steps[i]` (1-based) non-finite: NaN in one gradient (rank 0 only, to show the
    ranks agree) or an inf loss."""

    def __init__(self, steps: list[int], target: str = "grad"):
        self.steps, self.target = set(steps), target

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.target == "loss" and trainer.global_step + 1 in self.steps:
            real = type(pl_module).token_losses
            pl_module.token_losses = lambda ids: real(pl_module, ids) * float("inf")
        elif "token_losses" in pl_module.__dict__:
            del pl_module.token_losses

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.target == "grad" and trainer.global_step + 1 in self.steps and trainer.global_rank == 0:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            g.view(-1)[0] = float("nan")


class RaiseOOM(Callback):
    """Raise the error CUDA raises when memory runs out (torch.OutOfMemoryError), at train (or test, or
    predict) start."""

    def _raise(self, trainer, pl_module) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    on_train_start = on_test_start = on_predict_start = _raise


class DiskFullAt(Callback):
    """From optimizer step `step` (1-based) on, every fsync fails with ENOSPC, as on a full disk."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 >= self.step:
            def full(fd):
                raise OSError(errno.ENOSPC, "No space left on device")

            os.fsync = full


class RecordSaves(Callback):
    """Append `global_step accumulating(0|1) validating(0|1)` to `path` for every checkpoint the run saves (rank 0)."""

    def __init__(self, path: str):
        self.path = path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step} {int(trainer.fit_loop.epoch_loop._should_accumulate())} "
                        f"{int(trainer.validating)}\n")


class TermAt(Callback):
    """SIGTERM to this process after optimizer step `step` (a scheduler or `kill` stopping the run);
    with `rank`, only that rank's process gets it."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGTERM)


class TermAtEval(Callback):
    """SIGTERM to this process after evaluation batch `batch` of validate / test / predict (scancel of an
    evaluation job); with `rank`, only that rank's process gets it."""

    def __init__(self, batch: int = 0, rank: int | None = None):
        self.batch, self.rank = batch, rank

    def _maybe(self, trainer, batch_idx: int) -> None:
        if batch_idx == self.batch and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._maybe(trainer, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._maybe(trainer, batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._maybe(trainer, batch_idx)


def _digest(*tensors: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:8]


class SignalInValidation(Callback):
    """A real signal (TERM, or SLURM's USR1) to this process after batch `batch` of fit's validation at
    optimizer step `step` (a preemption while a long validation runs); with `rank`, only that rank's process gets it."""

    def __init__(self, step: int, batch: int = 0, signum: str = "TERM", rank: int | None = None):
        self.step, self.batch, self.signum, self.rank = step, batch, getattr(signal, f"SIG{signum}"), rank

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if (not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == self.batch
                and self.rank in (None, trainer.global_rank)):
            os.kill(os.getpid(), self.signum)


class WaitAtTrainStart(Callback):
    """Touches `path`.reached at train start, then waits (up to 120 s) until `path` exists: a fit that is
    still running while the test starts another."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        import time
        from pathlib import Path

        Path(self.path + ".reached").touch()
        deadline = time.monotonic() + 120
        while not Path(self.path).exists() and time.monotonic() < deadline:
            time.sleep(0.1)


class RecordBatches(Callback):
    """Append `global_step epoch batch_idx digest` to `path` for every training micro-batch (rank 0):
    which data a run saw, in which order. With `trace`, also `global_step epoch batch_idx loss weights rng
    threads` at each micro-batch's end (the loss's bits, digests of every parameter and of the torch RNG
    state, torch's intra-op threads: 1 vs 2 threads alone moved 25 of 28 tensors by up to 3e-6 in 6 steps):
    where two runs part, if their weights differ in the end (a diagnosis, not an assertion)."""

    def __init__(self, path: str, trace: str | None = None):
        self.path, self.trace = path, trace

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx} {_digest(batch['input_ids'])}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.trace and trainer.global_rank == 0:
            loss = outputs["loss"].detach().float().item().hex()
            with open(self.trace, "a") as f:
                f.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx} {loss} "
                        f"{_digest(*pl_module.parameters())} {_digest(torch.get_rng_state())} {torch.get_num_threads()}\n")


class RecordGrads(Callback):
    """Save, for the first optimizer step, every micro-batch's own gradient (a tensor hook: before
    it is accumulated and before DDP's all-reduce) and `p.grad` as the optimizer step sees it, to
    `{out}/grads-rank{r}.pt`."""

    def __init__(self, out: str):
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        self.micro, self.current = [], {}

        def grab(name, grad):
            self.current[name] = grad.detach().clone()

        self.handles = [p.register_hook(lambda g, n=n: grab(n, g)) for n, p in pl_module.named_parameters()]

    def on_after_backward(self, trainer, pl_module) -> None:
        self.micro.append(self.current)
        self.current = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            final = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
            torch.save({"micro": self.micro, "final": final}, os.path.join(self.out, f"grads-rank{trainer.global_rank}.pt"))
            for h in self.handles:
                h.remove()
