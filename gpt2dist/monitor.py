"""Training telemetry callbacks, logged under the same names whatever the logger (W&B, CSV, TB).

`TrainMonitor`: `throughput/tokens_per_sec_per_device`, `throughput/tokens_per_sec` (job),
`throughput/mfu`, `train/tokens` (trained so far, all ranks), `train/grad_norm` (before clipping,
sharding-aware), and on CUDA
`memory/peak_allocated_gib` / `memory/peak_reserved_gib` (max over devices).

No host sync on the steps in between logging steps. Each sync drains the GPU's queue, so the
GPU then idles through Lightning's Python between steps (hooks, the next batch, the first
launches): a few ms of a 60-70 ms GPT-2 small step. A Python number passed to `self.log` is a
sync too (Lightning copies it to the device). So throughput is timed over the optimizer steps
between two logging steps (one clock read, with a device sync, at each end), and the numbers
Lightning would only write on a logging step are computed there.
`SampleLogger`: greedy samples from fixed prompts every `sample_every_n_steps`, as a W&B table
`samples` (step, prompt, text) and always as `samples.txt` next to the checkpoints.

Why not Lightning's `ThroughputMonitor`: its peak table lists H200/H100 NVL at their sparse
FLOP/s (MFU halved) and does not know the name "NVIDIA H200"; it measures FLOPs by tracing
rather than the 6N + 12·L·d·T convention used to compare MFU across codebases; and its metric
names (`train/device/items_per_sec`) differ from ours.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gpt2dist.errors import ConfigError
from gpt2dist.generation import prompt_ids
from gpt2dist.metrics import gpt2_flops_per_token, is_mig_slice, peak_bf16_flops, throughput

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- grad norm


def total_grad_norm(parameters, strategy=None) -> torch.Tensor | None:
    """L2 norm of all gradients of the full (unsharded) model, on every rank.

    - FSDP2 (DTensor grads): `get_total_norm` returns a partial DTensor; `full_tensor()`
      all-reduces it, as `torch.nn.utils.clip_grad_norm_` does.
    - FSDP1 (Lightning `FSDPStrategy`, use_orig_params): each rank of a shard group holds a
      disjoint shard of every gradient, so sum the local squares over that group, then sqrt.
      The group is the world (FULL_SHARD, SHARD_GRAD_OP), a node (HYBRID_SHARD: each node holds a
      copy), or one rank (NO_SHARD: every rank holds the whole); summed over the world, those
      counted each element once per copy (sqrt(world) or sqrt(nodes) too large). Collective.
    - single device / DDP: gradients are already the full, averaged ones.
    Returns None when no parameter has a gradient (DeepSpeed keeps them inside its engine).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        import torch.distributed as dist
        from torch.distributed.fsdp import ShardingStrategy

        device = strategy.root_device
        local = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros((), device=device))
        if dist.is_available() and dist.is_initialized() and strategy.sharding_strategy != ShardingStrategy.NO_SHARD:
            # The root FSDP module's process group is its shard group (HYBRID_SHARD: the node's ranks).
            dist.all_reduce(local, group=getattr(strategy.model, "process_group", None))
        return local.sqrt()
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm


def step_grad_norm(trainer, pl_module) -> torch.Tensor | None:
    """`total_grad_norm` of this optimizer step, computed once however many callbacks ask
    (TrainMonitor logs it, FaultTolerance checks it is finite): one pass over the gradients."""
    key = (id(trainer), trainer.global_step)
    cached = getattr(pl_module, "_step_grad_norm", None)
    if cached is None or cached[0] != key:
        cached = (key, total_grad_norm(pl_module.parameters(), trainer.strategy))
        pl_module._step_grad_norm = cached
    return cached[1]


def forget_step_grad_norm(pl_module) -> None:
    """Drop the cached norm at a fit's start: a rollback in the same process (the Python API) resumes at the
    global_step of the cached NaN norm, and stopped again at once on the bad step's norm."""
    if pl_module is not None:
        vars(pl_module).pop("_step_grad_norm", None)


def logs_this_step(trainer) -> bool:
    """Whether Lightning writes this training step's metrics to the loggers (every
    `log_every_n_steps` optimizer steps): values logged on other steps are dropped anyway."""
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None else bool(connector.should_update_logs)


def _deepspeed_engine(trainer):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return trainer.strategy.deepspeed_engine if isinstance(trainer.strategy, DeepSpeedStrategy) else None


# ----------------------------------------------------------------------------- TrainMonitor


class TrainMonitor(Callback):
    """Logs tokens/s (per device and job) and MFU over the steps since the last logging step, and
    grad norm and peak GPU memory, on the steps Lightning writes (trainer.log_every_n_steps)."""

    def __init__(self, enabled: bool = True, peak_tflops: float | None = None,
                 grad_norm: bool = True, skip_first_steps: int = 1, window: int | None = None):
        """
        Args:
            enabled: Log throughput and MFU (averaged over the steps since the last logging step), grad norm and memory.
            peak_tflops: This GPU's dense bf16 peak in TFLOP/s, for GPUs missing from gpt2dist.metrics.PEAK_BF16_FLOPS.
            grad_norm: Log train/grad_norm (the norm before clipping).
            skip_first_steps: Optimizer steps left out of tokens/s (warm-up: allocator, kernels, lazy init).
            window: Deprecated, ignored: tokens/s spans the steps between logging steps (trainer.log_every_n_steps). Kept so older saved configs still load.
        """
        if peak_tflops is not None and not peak_tflops > 0:
            raise ConfigError(f"monitor.peak_tflops={peak_tflops} must be > 0 (the GPU's dense bf16 TFLOP/s), or null "
                              f"to look the GPU up in gpt2dist.metrics.PEAK_BF16_FLOPS")
        if skip_first_steps < 0:
            raise ConfigError(f"monitor.skip_first_steps={skip_first_steps} must be >= 0")
        if window is not None:
            rank_zero_warn(f"monitor.window={window} is ignored: tokens/s and MFU now average the steps between logging "
                           "steps (set trainer.log_every_n_steps instead); drop monitor.window from the config")
        self.enabled, self.peak_tflops = enabled, peak_tflops
        self.grad_norm, self.skip_first_steps = grad_norm, skip_first_steps
        self.flops_per_token: int | None = None
        self.peak_flops: float | None = None
        # Tokens trained by all ranks since step 0: an x axis that compares runs of other batch sizes.
        # Kept in checkpoints (counted, not step x batch: an epoch's last step may hold fewer micro-batches).
        self.tokens_trained: int | None = None  # None until on_train_start, or restored
        self._reset()

    def state_dict(self) -> dict:
        return {"tokens_trained": self.tokens_trained}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_trained = state_dict.get("tokens_trained")

    def _reset(self) -> None:
        self._t_ref: float | None = None  # start of the open timing segment; None while paused
        self._pending = 0.0  # seconds of the open timing window already closed by pause()
        self._tokens = 0  # tokens this rank processed since the timing window opened
        self._steps_seen = 0
        self._last_step: int | None = None

    def _now(self, pl_module) -> float:
        # CUDA kernels run asynchronously: without a sync the clock would time the launches.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def pause(self, pl_module) -> None:
        """Stop the clock (validation, checkpointing, sampling are not training throughput)."""
        if self._t_ref is not None:
            self._pending += self._now(pl_module) - self._t_ref
            self._t_ref = None

    # --- setup ---------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        forget_step_grad_norm(pl_module)
        self._last_step = trainer.global_step
        if trainer.global_step == 0:
            self.tokens_trained = 0  # a fresh fit (this callback may have run one before)
        elif self.tokens_trained is None:  # resumed from a checkpoint older than the count (it has no state
            # for this callback, so load_state_dict never ran): every step full, as it is but at an epoch's end
            dm = trainer.datamodule
            self.tokens_trained = (trainer.global_step * trainer.accumulate_grad_batches * trainer.world_size *
                                   getattr(dm, "batch_size", 0) * getattr(dm, "block_size", 0))
        if not self.enabled:
            return
        device = pl_module.device
        if self.peak_tflops:
            self.peak_flops, label = self.peak_tflops * 1e12, f"peak_tflops={self.peak_tflops}"
        elif device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            found = peak_bf16_flops(name)
            if found is None:
                self.peak_flops = None
                why = "is a MIG slice (a fraction of the GPU's peak)" if is_mig_slice(name) else \
                    "is not in gpt2dist.metrics.PEAK_BF16_FLOPS"
                rank_zero_warn(f"no MFU: GPU {name!r} {why}; "
                               "set monitor.peak_tflops to its dense bf16 TFLOP/s. tokens/s is still logged.")
            else:
                label, self.peak_flops = found
        else:
            self.peak_flops = None
            rank_zero_warn(f"no MFU on {device.type}: peak FLOP/s is only known for GPUs; tokens/s is still logged.")
        if self.peak_flops:
            rank_zero_info(f"MFU against {label}: {self.peak_flops / 1e12:.1f} TFLOP/s dense bf16 per device")

    # --- timing --------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.enabled and self._t_ref is None:
            self._t_ref = self._now(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.enabled and not trainer.sanity_checking:
            self.pause(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.enabled:
            self.pause(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # After AMP unscaling and before Lightning clips: the raw norm. A device tensor: no sync.
        if self.enabled and self.grad_norm:
            norm = step_grad_norm(trainer, pl_module)
            if norm is not None:
                pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = int(batch["input_ids"].numel())
        # Counted even when disabled: the count is checkpointed, and a later resume with the monitor on logs it.
        self.tokens_trained += tokens * trainer.world_size  # every rank's micro-batch has this shape
        if not self.enabled:
            return
        self._tokens += tokens  # every micro-batch of the window counts
        if trainer.global_step == self._last_step:
            return  # accumulating: no optimizer step yet
        self._last_step = trainer.global_step
        self._steps_seen += 1
        logging = logs_this_step(trainer)
        if logging:
            self._log_norm_and_memory(trainer, pl_module)
            # float64 (exact to 2^53 tokens); Lightning's float32 would round above 16.7M.
            pl_module.log("train/tokens", torch.tensor(float(self.tokens_trained), dtype=torch.float64),
                          on_step=True, on_epoch=False)
        if self._steps_seen <= self.skip_first_steps:  # warm-up: the window opens after it
            self._tokens, self._pending, self._t_ref = 0, 0.0, self._now(pl_module)
            return
        if not logging:
            return  # the clock keeps running: no sync, nothing logged
        now = self._now(pl_module)
        seconds = self._pending + (now - self._t_ref if self._t_ref is not None else 0.0)
        tokens, self._tokens, self._pending, self._t_ref = self._tokens, 0, 0.0, now
        if seconds <= 0 or tokens == 0:
            return
        if self.flops_per_token is None and getattr(pl_module, "model", None) is not None:
            self.flops_per_token = gpt2_flops_per_token(pl_module.model.config, int(batch["input_ids"].shape[1]))
        rates = throughput(tokens, seconds, trainer.world_size, self.flops_per_token, self.peak_flops)
        # CPU tensors: Lightning would copy a Python float to the GPU (a sync), and the bar reads them often.
        for key, value in rates.items():
            pl_module.log(f"throughput/{key}", torch.tensor(value), on_step=True, on_epoch=False)
        pl_module.log("tok/s", torch.tensor(rates["tokens_per_sec"]), on_step=True, on_epoch=False, prog_bar=True,
                      logger=False)

    def _log_norm_and_memory(self, trainer, pl_module) -> None:
        engine = _deepspeed_engine(trainer)
        if engine is not None and self.grad_norm:
            norm = engine.get_global_grad_norm()  # DeepSpeed's own pre-clipping norm of the last step
            if norm is not None:
                pl_module.log("train/grad_norm", torch.tensor(float(norm)), on_step=True, on_epoch=False)
        if pl_module.device.type == "cuda":
            gib = 2**30
            mem = torch.tensor([torch.cuda.max_memory_allocated(pl_module.device) / gib,
                                torch.cuda.max_memory_reserved(pl_module.device) / gib], device=pl_module.device)
            pl_module.log("memory/peak_allocated_gib", mem[0], on_step=True, on_epoch=False, sync_dist=True, reduce_fx="max")
            pl_module.log("memory/peak_reserved_gib", mem[1], on_step=True, on_epoch=False, sync_dist=True, reduce_fx="max")


# ----------------------------------------------------------------------------- samples


def generation_mode(trainer) -> str:
    """Who runs `generate`: "rank0" (replicated weights), "all" (sharded weights: every rank
    must take part in the gathers), or "wrapper" (FSDP1: all ranks, through the FSDP wrapper's
    forward, which alone gathers the root's flat parameters: embeddings, ln_f, tied head)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        return "wrapper"
    if isinstance(strategy, (ModelParallelStrategy, DeepSpeedStrategy)):
        return "all"
    return "rank0"


@torch.no_grad()
def generate_samples(pl_module, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                     strategy=None, sampling=None, seeds: list[int] | None = None) -> list[str]:
    """Continuations of `prompts` in one batch (greedy unless `sampling` says so; sampled rows draw from
    their own `seeds`), with a fixed seed, without disturbing training's RNG.

    Under FSDP2 (`fully_shard` applied to the LightningModule root and to each block), the
    root's parameters (embeddings, ln_f, tied head) are unsharded explicitly here because
    `generate` calls `pl_module.model`, not the root's forward; the blocks gather their own.
    Under FSDP1 (pass its `strategy`), the batch goes through the FSDP wrapper's forward, as
    Lightning routes `validation_step`: the root's flat parameters are gathered there, in the
    training compute dtype. Either way every rank must call it (the gathers are collective).
    """
    from torch.distributed.fsdp import FSDPModule

    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    root_fsdp = isinstance(pl_module, FSDPModule)
    args = (tokenizer, prompts, max_new_tokens, sampling, seeds)
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if strategy is not None and strategy.model is not pl_module:
                return strategy._forward_redirection(strategy.model, pl_module, "generate_batch", *args)
            if root_fsdp:
                pl_module.unshard()
            try:
                return pl_module.generate_batch(*args)
            finally:
                if root_fsdp:
                    pl_module.reshard()
    finally:
        pl_module.train(was_training)


def _sample_entry(step: int, prompt: str, text: str) -> str:
    return f"=== step {step} | prompt {prompt!r}\n{text}\n\n"


class SampleLogger(Callback):
    """Every `sample_every_n_steps`, greedy samples from `prompts`: a W&B table `samples`
    (step, prompt, text) when a WandbLogger is active, and always `samples.txt` next to the checkpoints."""

    def __init__(self, sample_every_n_steps: int = 500, prompts: list[str] | None = None, max_new_tokens: int = 32,
                 seed: int = 1234, filename: str = "samples.txt"):
        """
        Args:
            sample_every_n_steps: Optimizer steps between samples (0: never).
            prompts: Prompts to continue (default: a prose and a code prompt).
            max_new_tokens: Tokens generated per prompt.
            seed: Seed set (in a forked RNG) before generating.
            filename: Text file in the checkpoint folder that collects every sample.
        """
        if sample_every_n_steps < 0:
            raise ConfigError(f"samples.sample_every_n_steps={sample_every_n_steps} must be >= 0 (0: never)")
        if max_new_tokens < 1:
            raise ConfigError(f"samples.max_new_tokens={max_new_tokens} must be >= 1")
        self.every, self.max_new_tokens, self.seed, self.filename = sample_every_n_steps, max_new_tokens, seed, filename
        self.prompts = list(prompts) if prompts is not None else ["The", "def "]
        self.rows: list[list] = []  # every sample so far: the W&B table is re-logged whole each time

    def state_dict(self) -> dict:
        return {"rows": self.rows}  # a resumed run's table keeps the earlier samples

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = [list(r) for r in state_dict.get("rows", [])]

    def path(self, trainer) -> Path | str:
        """Beside the checkpoints; an object store's folder (s3://b/ckpt) as its URL, written through fsspec
        (Path() made it a local folder named "s3:" under the working directory)."""
        ckpt = trainer.checkpoint_callback
        folder = str(getattr(ckpt, "dirpath", None) or trainer.default_root_dir)
        return f"{folder.rstrip('/')}/{self.filename}" if "://" in folder else Path(folder) / self.filename

    def _write(self, path: Path | str, rows: list, append: bool) -> None:
        """`rows` at the file's end (`append`) or as the whole file, which is replaced atomically. An object
        store cannot append: there the file is always rewritten whole, from every row so far."""
        text = "".join(_sample_entry(*row) for row in rows)
        if isinstance(path, str):
            import fsspec

            fs, p = fsspec.core.url_to_fs(path)
            fs.makedirs(fs._parent(p), exist_ok=True)
            fs.pipe_file(p, "".join(_sample_entry(*row) for row in self.rows).encode() if append else text.encode())
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    def _exists(self, path: Path | str) -> bool:
        if isinstance(path, str):
            import fsspec

            fs, p = fsspec.core.url_to_fs(path)
            return fs.exists(p)
        return path.exists()

    def on_fit_start(self, trainer, pl_module) -> None:
        # Every prompt before training, on every rank (same tokenizer, same prompts: all raise together),
        # not at the first sample step, with the other ranks left waiting in a collective.
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if self.every and tokenizer is not None:
            for i, prompt in enumerate(self.prompts):
                prompt_ids(tokenizer, prompt, pl_module.model.config.n_positions, f"samples.prompts[{i}]")

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if trainer.global_step == 0 and not getattr(trainer, "ckpt_path", None):
            self.rows = []  # a fresh fit: none of an earlier fit of this callback (the Python API)
        if trainer.is_global_zero and (getattr(trainer, "ckpt_path", None) or trainer.global_step == 0) and \
                self._exists(self.path(trainer)):
            # Resumed: the file holds the samples of steps after the checkpoint too, which this run trains
            # (and samples) again. The checkpoint's rows are every sample up to it: the file is those.
            # A fresh fit (its rows: none) in a folder of an earlier run starts the file afresh, as its
            # checkpoints are set aside: appended to, it read as one run sampling each step twice.
            self._write(self.path(trainer), self.rows, append=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == getattr(self, "_last_step", None):
            return  # accumulating: no optimizer step since the last call (or since a resume)
        self._last_step = step
        if not self.every or not self.prompts or step % self.every:
            return
        mode = generation_mode(trainer)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            return
        for cb in trainer.callbacks:
            if isinstance(cb, TrainMonitor):
                cb.pause(pl_module)
        if mode == "rank0" and not trainer.is_global_zero:
            return
        texts = generate_samples(pl_module, tokenizer, self.prompts, self.max_new_tokens, self.seed,
                                 trainer.strategy if mode == "wrapper" else None)
        if not trainer.is_global_zero:
            return
        new = [[step, p, t] for p, t in zip(self.prompts, texts)]
        self.rows.extend(new)
        self._write(self.path(trainer), new, append=True)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # At the x (trainer/global_step) where Lightning logs this step's loss, right after this hook:
                # the step index, step - 1. Without one, W&B's step_sync put the table at the last x logged,
                # a step earlier (or log_every_n_steps earlier). The `step` column counts steps done, as
                # checkpoint names and samples.txt do.
                logger.log_table("samples", columns=["step", "prompt", "text"], data=self.rows,
                                 step=trainer.fit_loop.epoch_loop._batches_that_stepped)
