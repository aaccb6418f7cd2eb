"""Callbacks: export a Hugging Face folder at the end of fit, write predictions, stop early."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gpt2dist.errors import ConfigError, GPT2DistError
from gpt2dist.export import check_export_target, load_any_checkpoint, model_from_lightning_state, save_hf_folder
from gpt2dist.generation import greedy_text, prompt_ids
from gpt2dist.strategies import full_state_dict, needs_gather


class HFExport(Callback):
    """At the end of a completed `fit`, write `<default_root_dir>/<dirname>` as a Hugging Face
    folder (safetensors, config, tokenizer) and print a greedy sample from `sample_prompt`."""

    def __init__(self, enabled: bool = True, dirname: str = "hf_model", source: Literal["final", "best"] = "final",
                 sample_prompt: str | None = "def ", sample_tokens: int = 48, sample_repetition_penalty: float = 1.3):
        """
        Args:
            enabled: Export at the end of fit.
            dirname: Folder name under trainer.default_root_dir.
            source: `final`: the weights at the end of fit; `best`: the best_checkpoint's (lowest val/loss), as Trainer's load_best_model_at_end.
            sample_prompt: Prompt for the sample printed after export (None: no sample).
            sample_tokens: Tokens to generate for the sample.
            sample_repetition_penalty: Greedy decoding's repetition penalty (1.0: plain greedy).
        """
        if sample_tokens < 1:
            raise ConfigError(f"export.sample_tokens={sample_tokens} must be >= 1 (or set export.sample_prompt=null for no sample)")
        if not sample_repetition_penalty > 0:
            raise ConfigError(f"export.sample_repetition_penalty={sample_repetition_penalty} must be > 0 (1.0: plain greedy)")
        self.enabled, self.dirname, self.source = enabled, dirname, source
        self.sample_prompt, self.sample_tokens = sample_prompt, sample_tokens
        self.sample_repetition_penalty = sample_repetition_penalty
        self.path: Path | None = None
        self.fix = f"set export.dirname to another name (or move {dirname} away)"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Refuse a folder the export would destroy before training, not after it. Rank 0 writes the
        # export, so its view decides, and every rank stops with it (none is left waiting in a collective).
        if stage != "fit" or not self.enabled:
            return
        error = None
        if trainer.is_global_zero:
            try:
                check_export_target(Path(trainer.default_root_dir) / self.dirname, self.fix)
            except GPT2DistError as e:
                error = str(e)
        error = trainer.strategy.broadcast(error)
        if error:
            raise GPT2DistError(error)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The sample prompt is checked before training, not after it (the model exists from here on).
        # Every rank holds the same tokenizer and prompt, so every rank raises together.
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if self.enabled and self.sample_prompt and tokenizer is not None:
            prompt_ids(tokenizer, self.sample_prompt, pl_module.model.config.n_positions, "export.sample_prompt")

    # on_train_end, not on_fit_end: Lightning tears the strategy down (model and optimizer state to
    # CPU) before on_fit_end, and ZeRO-3's fp32 gather then runs NCCL on CPU tensors (seen on an H200).
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        self.path = Path(trainer.default_root_dir) / self.dirname
        best = self._best_checkpoint(trainer) if self.source == "best" else None
        if best is not None:
            self._export_checkpoint(trainer, best, tokenizer)
        elif needs_gather(trainer):
            # Every rank joins the gather; rank 0 rebuilds a plain fp32 GPT2LMHeadModel from it.
            state = full_state_dict(trainer, pl_module)
            if trainer.is_global_zero:
                ckpt = {"gpt2_config": pl_module.model.config.to_dict(), "state_dict": {f"model.{k}": v for k, v in state.items()}}
                model = model_from_lightning_state(ckpt, "the trained model")
                save_hf_folder(model, tokenizer, self.path, self.fix)
                rank_zero_info(f"exported Hugging Face model to {self.path} (gathered from shards)")
                if self.sample_prompt and tokenizer is not None:
                    # From the gathered fp32 copy, on rank 0's CPU: its GPU still holds the sharded training state.
                    text = greedy_text(model.eval(), tokenizer, self.sample_prompt, self.sample_tokens,
                                       self.sample_repetition_penalty)
                    rank_zero_info(f"sample ({self.sample_prompt!r}, greedy):\n{text}")
        elif trainer.is_global_zero:
            masters = pl_module.master_state_dict() if hasattr(pl_module, "master_state_dict") else None
            if masters:  # bf16-true: the fp32 master weights, not their bf16 rounding
                ckpt = {"gpt2_config": pl_module.model.config.to_dict(), "state_dict": {**pl_module.state_dict(), **masters}}
                save_hf_folder(model_from_lightning_state(ckpt, "the trained model"), tokenizer, self.path, self.fix)
            else:
                save_hf_folder(pl_module.model, tokenizer, self.path, self.fix)
            rank_zero_info(f"exported Hugging Face model to {self.path}")
            if self.sample_prompt and tokenizer is not None:
                was_training = pl_module.training
                pl_module.eval()
                text = pl_module.generate_text(tokenizer, self.sample_prompt, self.sample_tokens,
                                               self.sample_repetition_penalty)
                pl_module.train(was_training)
                rank_zero_info(f"sample ({self.sample_prompt!r}, greedy):\n{text}")
        trainer.strategy.barrier("hf_export")

    @staticmethod
    def _best_checkpoint(trainer: pl.Trainer) -> tuple[str, str, float] | None:
        """(path, monitor, score) of the best checkpoint by validation (the CLI's best_checkpoint), or None
        (with a warning) when no validation has saved one."""
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor not in (None, "step") and cb.best_model_path:
                if "://" not in str(cb.best_model_path) and not os.path.exists(cb.best_model_path):
                    rank_zero_warn(f"export.source=best: the best checkpoint {cb.best_model_path} is gone (deleted or "
                                   f"moved): exporting the final weights")
                    return None
                return cb.best_model_path, cb.monitor, float(cb.best_model_score)
        rank_zero_warn("export.source=best, but no validation saved a best checkpoint (best_checkpoint.monitor "
                       "val/loss): exporting the final weights; validate during fit (trainer.val_check_interval)")
        return None

    def _export_checkpoint(self, trainer: pl.Trainer, best: tuple[str, str, float], tokenizer) -> None:
        """Rank 0 rebuilds the model from the best checkpoint file or folder (any strategy's; bf16-true:
        its fp32 masters) and exports it; the other ranks wait. No weights leave the GPUs."""
        path, monitor, score = best
        if trainer.is_global_zero:
            checkpoint = load_any_checkpoint(path)
            model = model_from_lightning_state(checkpoint, str(path))
            save_hf_folder(model, tokenizer, self.path, self.fix)
            rank_zero_info(f"exported Hugging Face model to {self.path} from the best checkpoint {path} "
                           f"(step {checkpoint.get('global_step', '?')}, {monitor} {score:.4f})")
            if self.sample_prompt and tokenizer is not None:
                text = greedy_text(model.eval(), tokenizer, self.sample_prompt, self.sample_tokens,
                                   self.sample_repetition_penalty)
                rank_zero_info(f"sample ({self.sample_prompt!r}, greedy):\n{text}")


class PredictionWriter(BasePredictionWriter):
    """Writes `predict` outputs, every prompt in prompt order, to `<default_root_dir>/predictions.jsonl`
    (rank 0) and prints each as it is generated."""

    def __init__(self, filename: str = "predictions"):
        """
        Args:
            filename: File stem under trainer.default_root_dir.
        """
        super().__init__(write_interval="batch")
        self.filename = filename

    def _path(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / f"{self.filename}.jsonl"

    @staticmethod
    def _own_prompts(trainer) -> bool:
        """Replicated weights (DDP): each rank generates its share of the prompts, gathered at the end.
        Sharded ones: every rank generates every prompt (TokenBlockDataModule.predict_dataloader), rank 0's count."""
        from gpt2dist.monitor import generation_mode

        return trainer.is_global_zero or generation_mode(trainer) == "rank0"

    def on_predict_start(self, trainer, pl_module) -> None:
        self._rows: list[dict] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if not self._own_prompts(trainer):
            return
        for row in prediction if isinstance(prediction, list) else [prediction]:
            if row.get("pad"):
                continue
            self._rows.append(row)
            sample = f" (sample {row['sample']})" if row.get("sample") else ""
            print(f"--- {row['prompt']!r}{sample}\n{row['text']}", flush=True)

    # Each run replaces the file (appending mixed two runs' lines in one file): written at the end under a
    # temporary name renamed onto it, so an interrupted run leaves the previous file whole.
    def on_predict_end(self, trainer, pl_module) -> None:
        rows = self._rows if self._own_prompts(trainer) else []
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shares: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, rows)  # DDP: each rank's prompts; sharded: rank 0's
            rows = [r for share in shares for r in share]
        if not trainer.is_global_zero:
            return
        rows.sort(key=lambda r: (r.get("index", 0), r.get("sample", 0)))  # stable: rows without an index keep their order
        path = self._path(trainer)
        os.makedirs(path.parent, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run killed while writing
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())  # durable before it gets the name
        os.replace(tmp, path)
        from gpt2dist.tracking import wandb_loggers

        for logger in wandb_loggers(trainer):  # the same rows as a W&B table, beside the run's other panels
            logger.log_table("predictions", columns=["index", "sample", "prompt", "text"],
                             data=[[r.get("index", i), r.get("sample", 0), r["prompt"], r["text"]] for i, r in enumerate(rows)])


class ValidationReport(Callback):
    """One plain line per validation (step, losses, ppl), readable in logs without a TTY."""

    def __init__(self, enabled: bool = True):
        """
        Args:
            enabled: Print the line.
        """
        self.enabled = enabled

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, ("train/loss", "val/loss", "val/ppl"))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, ("test/loss", "test/ppl"))

    def _report(self, trainer: pl.Trainer, keys: tuple[str, ...]) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        if trainer.state.fn == TrainerFn.FITTING:
            where = f"step {trainer.global_step:>6}" + (" (sanity check, before training)" if trainer.sanity_checking else "")
        else:
            # `gpt2dist validate|test`: the trainer's step is 0; the checkpoint's own step says what was evaluated.
            from gpt2dist.resume import checkpoint_progress

            progress = checkpoint_progress(trainer.ckpt_path) if trainer.ckpt_path else None
            where = (f"{trainer.state.fn.value} {trainer.ckpt_path} (step {progress[0]})" if progress else
                     f"{trainer.state.fn.value} (no checkpoint: the model as configured)")
        # train/loss is written on logging steps only (trainer.log_every_n_steps): one from an earlier step says so.
        loss_step = getattr(trainer.lightning_module, "shown_loss_step", None)
        stale = f" (step {loss_step})" if loss_step is not None and loss_step != trainer.global_step else ""
        parts = [where] + [f"{key} {float(m[key]):.4f}" + (stale if key == "train/loss" else "") for key in keys if key in m]
        print("  ".join(parts), flush=True)


_NOT_THIS_TIME = object()  # EarlyStop: no stop was agreed at this validation
VALIDATION_METRICS = ("val/loss", "val/ppl")  # what GPT2Module logs at each validation (its _eval_step)


class EarlyStop(EarlyStopping):
    """Stop `fit` when the validation metric has stopped improving (off unless `patience` or a
    threshold is set). Lightning's EarlyStopping, made resumable: a stopped run stays stopped on
    `--ckpt_path last|auto`, and the config's patience wins over the checkpoint's."""

    def __init__(self, patience: int | None = None, monitor: str = "val/loss", mode: Literal["min", "max"] = "min",
                 min_delta: float = 0.0, stopping_threshold: float | None = None,
                 divergence_threshold: float | None = None):
        """
        Args:
            patience: Stop after this many validations in a row without a new best (None: off); counts validations, not steps.
            monitor: The metric compared at each validation (val/ppl orders as val/loss).
            mode: min: lower is better; max: higher is better.
            min_delta: A new best must beat the old one by more than this.
            stopping_threshold: Stop as soon as the metric is better than this (None: no target).
            divergence_threshold: Stop as soon as the metric is worse than this (None: no limit).
        """
        if patience is not None and patience < 1:
            raise ConfigError(f"early_stopping.patience={patience} must be >= 1 (validations without a new best), "
                              f"or null to turn early stopping off")
        if min_delta < 0:
            raise ConfigError(f"early_stopping.min_delta={min_delta} must be >= 0 (the margin a new best must beat)")
        self.enabled = patience is not None or stopping_threshold is not None or divergence_threshold is not None
        # No patience with a threshold: only the threshold stops (a patience no run reaches).
        super().__init__(monitor=monitor, min_delta=min_delta, patience=patience or 2**62, mode=mode, strict=True,
                         check_finite=True, stopping_threshold=stopping_threshold,
                         divergence_threshold=divergence_threshold,
                         check_on_train_epoch_end=False)  # after each validation, whatever its interval
        self.config_patience = self.patience
        self.stopped_step: int | None = None  # the optimizer step this run stopped at
        self.stopped_value: float | None = None  # the monitored value that stopped it
        self._current: float | None = None
        self._deferred = False  # a stop held back by trainer.min_steps / min_epochs was announced
        self._stopped_in_checkpoint: tuple[int, str] | None = None
        self._deferred_in_checkpoint: float | None = None  # a deferred stop's value, from a checkpoint

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.enabled or stage != "fit":
            return
        if self.monitor not in VALIDATION_METRICS:
            # Lightning finds out at the first validation (hundreds of steps in), in a traceback.
            raise ConfigError(f"early_stopping.monitor={self.monitor!r} is not logged at validation; use "
                              f"{' or '.join(VALIDATION_METRICS)}")
        # Without validation the check never runs: the run would silently train to max_steps.
        val_set = getattr(trainer.datamodule, "val_set", None) if trainer.datamodule is not None else None
        # With check_val_every_n_epoch: null, validation comes only every val_check_interval micro-batches.
        interval, steps = trainer.val_check_interval, trainer.max_steps
        never = (trainer.check_val_every_n_epoch is None and isinstance(interval, int) and steps is not None
                 and 0 < steps and steps * trainer.accumulate_grad_batches < interval)
        data_fix = "set data.val_files (or data.val_fraction > 0) and trainer.limit_val_batches > 0"
        why, fix = (("trainer.limit_val_batches=0 turns validation off", data_fix) if trainer.limit_val_batches == 0 else
                    ("the data has no validation split", data_fix) if val_set is not None and not len(val_set) else
                    (f"trainer.val_check_interval={interval} micro-batches come after the run's last (max_steps={steps} x "
                     f"accumulate_grad_batches={trainer.accumulate_grad_batches})",
                     f"set trainer.val_check_interval to at most {steps * trainer.accumulate_grad_batches}") if never else
                    (None, None))
        if why:
            raise ConfigError(f"early_stopping needs validation during fit, and {why}; {fix}, or set "
                              f"early_stopping.patience=null")

    def state_dict(self) -> dict:
        # A stop held back by min_steps / min_epochs (its value): Lightning saves no trainer.should_stop, so a
        # run resumed before min_steps trained on to the next regular validation, past the uninterrupted stop.
        deferred = self._current if self._deferred and self.stopped_step is None else None
        return {**super().state_dict(), "stopped_step": self.stopped_step, "stopped_value": self.stopped_value,
                "deferred_value": deferred}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.patience = self.config_patience  # the config's, as for every other knob on resume
        stopped = state_dict.get("stopped_step")
        self._stopped_in_checkpoint = (stopped, state_dict.get("stopping_reason_message") or "",
                                       state_dict.get("stopped_value")) if stopped is not None else None
        self._deferred_in_checkpoint = state_dict.get("deferred_value") if stopped is None else None

    def _still_stops(self, value: float | None) -> tuple[bool, str | None]:
        """Whether the checkpoint's stop (or deferred stop) holds under this config: patience used up, or the
        value that stopped it still past the config's threshold. -> (holds, the threshold's knob, if one)."""
        why = self.stopping_reason
        if why == why.PATIENCE_EXHAUSTED and self.wait_count < self.patience:
            return False, None  # a larger patience: the run goes on, counting from the checkpoint's validations
        # A threshold stop is judged again by the config's threshold, as patience is (the value that stopped it).
        knob = {why.STOPPING_THRESHOLD: "stopping_threshold", why.DIVERGENCE_THRESHOLD: "divergence_threshold"}.get(why)
        if knob and value is not None:
            threshold, v = getattr(self, knob), torch.tensor(value)
            if threshold is None or not self.monitor_op(v if knob == "stopping_threshold" else -v,
                                                        threshold if knob == "stopping_threshold" else -threshold):
                return False, knob  # turned off, or moved past the value that stopped the run: it goes on
        return why != why.NOT_STOPPED, knob

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        deferred, self._deferred_in_checkpoint = self._deferred_in_checkpoint, None
        if deferred is not None and self.enabled and self._still_stops(deferred)[0]:
            # Asked again: Lightning trains on to min_steps / min_epochs and validates there, as uninterrupted.
            self._deferred, self._current = True, deferred
            trainer.should_stop = True
        if self._stopped_in_checkpoint is None:
            return
        step, reason, value = self._stopped_in_checkpoint
        self._stopped_in_checkpoint = None
        if not self.enabled or trainer.global_step != step:
            return  # early stopping turned off: the run goes on
        holds, knob = self._still_stops(value)
        if not holds:
            return
        why = self.stopping_reason
        self.stopped_step, self.stopped_value = step, value
        trainer.should_stop = True
        past = f"{value:.4g}" if value is not None else "the value that stopped it"  # a checkpoint before 2026-12-05
        fix = (f"move early_stopping.{knob} (now {getattr(self, knob)}) past {past}, or set it to null" if knob
               else "resume from an earlier checkpoint (--ckpt_path FILE), e.g. with a lower model.lr"
               if why == why.NON_FINITE_METRIC else
               f"raise early_stopping.patience (now {self.patience if self.patience < 2**62 else None}) "
               f"or set early_stopping.patience=null and no thresholds")
        rank_zero_warn(f"resume: this run stopped early at step {step} ({reason}); nothing left to train. To go on, {fix}")

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        self._current = float(current)
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if should_stop and self.stopping_reason == self.stopping_reason.PATIENCE_EXHAUSTED:
            reason = (f"{self.monitor} has not improved on its best, {float(self.best_score):.4f}, for "
                      f"{self.wait_count} validations (early_stopping.patience={self.patience}, "
                      f"min_delta={abs(self.min_delta)})")  # Lightning stores it negated in min mode
        return should_stop, reason

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if self._deferred and self.stopped_step is None:
            # Lightning sets the message only when the ranks agree to stop: left as this, they did not.
            self.stopping_reason_message = _NOT_THIS_TIME
        try:
            super().on_validation_end(trainer, pl_module)
        finally:
            withdrawn = self.stopping_reason_message is _NOT_THIS_TIME
            if withdrawn:
                self.stopping_reason_message = None  # never a checkpoint's
        if withdrawn:
            # The stop held back by min_steps / min_epochs no longer holds (the value improved since, or came
            # back inside a threshold): Lightning would still stop at min_steps, for a reason gone stale, and
            # a resume (its patience not used up) would train on from there.
            self._deferred = False
            self.stopping_reason = self.stopping_reason.NOT_STOPPED
            trainer.should_stop = False
            rank_zero_info(f"early stopping deferred earlier is off at step {trainer.global_step}: {self.monitor}="
                           f"{self._current:.4f} (best {float(self.best_score):.4f}) no longer stops the run")
            return
        if self.stopped_step is not None or not trainer.should_stop or self.stopping_reason == self.stopping_reason.NOT_STOPPED:
            return  # going on, or stopped already, or stopping for another reason (a requeue)
        why = (self.stopping_reason_message or "").replace(" Signaling Trainer to stop.", "")
        if trainer.fit_loop._can_stop_early:
            self._stopped(trainer, why)
        elif not self._deferred:
            # Lightning trains on to trainer.min_steps / min_epochs, then validates once more (a stop
            # request asks for it) and stops there: that validation lands in the branch above.
            self._deferred = True
            rank_zero_info(f"early stopping at step {trainer.global_step} deferred: {why}; trainer.min_steps="
                           f"{trainer.min_steps} / min_epochs={trainer.fit_loop.min_epochs} not reached yet")

    def _stopped(self, trainer: pl.Trainer, why: str) -> None:
        self.stopped_step, self.stopped_value = trainer.global_step, self._current
        rank_zero_info(f"early stopping at step {trainer.global_step}: {why}")
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last:
                # This step's checkpoint was written before its validation: last.ckpt is written
                # again at the end of fit (FaultTolerance.on_train_end), holding that the run stopped.
                cb._last_global_step_saved = -1
