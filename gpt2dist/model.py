"""`GPT2Module`: Hugging Face's GPT2LMHeadModel as a LightningModule.

The model is built in `configure_model` (not `__init__`), so sharding strategies can build or
wrap it where they need to. The loss is next-token cross-entropy over every position of each
packed block, identical to `GPT2LMHeadModel(input_ids, labels=input_ids).loss`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod

from gpt2dist.errors import CheckpointError, ConfigError
from gpt2dist.generation import Sampling, generate_texts, prompt_ids, row_seed
from gpt2dist.tokenizer import tokenizer_identity

log = logging.getLogger(__name__)

# Shapes of the released GPT-2 checkpoints, so `from_scratch` works offline for these ids.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),  # 124M
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),  # 355M
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),  # 774M
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),  # 1.5B
}
# Config fields that must agree between a checkpoint and the model it is loaded into.
SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
# Set inside GPT2Module.load_from_checkpoint: the model is built from the checkpoint's config, not configure_model's.
_FROM_CHECKPOINT = contextvars.ContextVar("gpt2dist_from_checkpoint", default=False)


@contextlib.contextmanager
def _not_from_checkpoint():
    token = _FROM_CHECKPOINT.set(False)
    try:
        yield
    finally:
        _FROM_CHECKPOINT.reset(token)


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    """A parameter's name without FSDP / checkpoint / compile wrapper prefixes."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def build_config(model_name_or_path: str, overrides: dict | None = None, dropout: float | None = None, **kwargs):
    """A GPT2Config: a released size or a local folder's config, then `overrides`."""
    from transformers import GPT2Config

    if model_name_or_path in GPT2_SIZES:
        config = GPT2Config(**GPT2_SIZES[model_name_or_path])
    elif os.path.isdir(model_name_or_path):
        if not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
            # transformers 5 gives a default GPT2Config (124M) for a folder without one: a run folder given for
            # its hf_model was planned, or built, as GPT-2 small.
            raise ConfigError(f"model.model_name_or_path={model_name_or_path!r} is a folder without config.json; "
                              f"give a Hugging Face model folder (a run's hf_model) or one of {', '.join(GPT2_SIZES)}")
        config = GPT2Config.from_pretrained(model_name_or_path)
    else:
        try:
            config = GPT2Config.from_pretrained(model_name_or_path)
        except Exception as e:
            raise ConfigError(
                f"cannot load the config of model.model_name_or_path={model_name_or_path!r} ({type(e).__name__}); "
                f"use a local folder or one of {', '.join(GPT2_SIZES)}"
            ) from None
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ConfigError(f"model.config_overrides: GPT2Config has no field {key!r}")
        setattr(config, key, value)
    if dropout is not None:
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    for key, value in kwargs.items():
        # The kernel is config._attn_implementation: a plain attribute of that name was saved with the config
        # but not used when the model is built from it (from_scratch, ZeRO-3), which ran SDPA.
        setattr(config, "_attn_implementation" if key == "attn_implementation" else key, value)
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
            raise ConfigError(f"model.config_overrides: {key}={getattr(config, key)!r} must be a positive integer")
    if config.n_embd % config.n_head:
        fits = [h for h in range(1, config.n_embd + 1) if config.n_embd % h == 0 and h <= 64][-3:]
        raise ConfigError(f"model.config_overrides: n_embd={config.n_embd} is not divisible by n_head={config.n_head} "
                          f"(each head gets n_embd / n_head dims); pick an n_head that divides it, e.g. {fits}")
    return config


def _check_block_size(block_size: int | None, n_positions: int) -> None:
    if block_size is not None and block_size > n_positions:
        raise ConfigError(
            f"data.block_size={block_size} exceeds the model's n_positions={n_positions}; "
            f"lower data.block_size to at most {n_positions}"
        )


KERNEL_KEYS = ("fused", "foreach", "capturable", "differentiable")  # torch AdamW's implementation choice


class GPT2Module(pl.LightningModule):
    """Fine-tunes (or pre-trains) GPT-2 with AdamW and a warmup + cosine schedule."""

    def __init__(
        self,
        model_name_or_path: str = "gpt2",
        from_scratch: bool = False,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str = "sdpa",
        dropout: float | None = None,
        lr: float = 1e-4,
        min_lr: float = 1e-5,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        samples_per_prompt: int = 1,
        stop_strings: list[str] | None = None,
        generation_seed: int = 0,
        pad_vocab_to_multiple_of: int = 1,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_options: dict[str, Any] | None = None,
        activation_checkpointing: bool = False,
        tf32: bool = True,
        fused_cross_entropy: bool = False,
        master_weights: bool = True,
        bias_after_matmul: bool = False,
    ):
        """
        Args:
            model_name_or_path: Hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or local folder of a GPT-2 model.
            from_scratch: Randomly initialise instead of loading pretrained weights (shape from the id/folder + overrides).
            config_overrides: GPT2Config fields to override (n_layer, n_embd, n_head, n_positions, vocab_size, ...).
            attn_implementation: Attention kernel: sdpa (flash/mem-efficient when available) or eager.
            dropout: If set, overrides resid/embd/attn dropout (0 for exact parity tests).
            lr: Peak learning rate after warmup.
            min_lr: Learning rate at the end of the cosine decay.
            warmup_steps: Optimizer steps of linear warmup from 0 to lr.
            decay_steps: Optimizer steps until min_lr (default: the run's total steps).
            weight_decay: AdamW decay, applied only to weights with dim >= 2 (not biases or LayerNorm).
            betas: AdamW betas.
            eps: AdamW epsilon.
            max_new_tokens: Tokens generated per prompt by `predict`.
            do_sample: `predict` samples each token (temperature, top_k, top_p) instead of taking the most likely one.
            temperature: Sampling temperature: logits are divided by it (< 1 sharper, > 1 flatter).
            top_k: Sample only among the k most likely tokens (0: no cut).
            top_p: Sample only from the smallest set of tokens whose probability reaches top_p (1: no cut).
            repetition_penalty: `predict`'s CTRL penalty on tokens already in the row (1: none; ~1.2 keeps small models from looping).
            samples_per_prompt: Continuations per prompt in `predict` (each its own line and seed; with do_sample); a batch generates predict_batch_size x this many rows.
            stop_strings: `predict` ends a continuation at the token that completes any of these (e.g. a blank line, "\\n\\n"); the text keeps it.
            generation_seed: Seed of `predict`'s sampling; a row's draws depend only on it, the prompt's index and the sample number.
            pad_vocab_to_multiple_of: Pad embedding/lm_head rows to a multiple of this (128 on GPUs: 50257 -> 50304); padded logits are never predicted and the export is unpadded. 1: no padding.
            compile: torch.compile each GPT2Block ("regional": compile time of one block).
            compile_mode: torch.compile mode (None: default; "max-autotune-no-cudagraphs" tunes matmuls: on an H200 its compile ran past 150 s for GPT-2 Large and did not finish).
            compile_options: Inductor options for the compiled blocks, e.g. {coordinate_descent_tuning: true} (tunes Inductor's own kernels; see torch._inductor.list_options()); not with compile_mode.
            activation_checkpointing: Recompute each block's activations in backward (less memory, ~1/3 more compute).
            tf32: Allow TF32 for fp32 matmuls on Ampere+ GPUs.
            fused_cross_entropy: Liger fused linear cross-entropy (CUDA + `pip install liger-kernel`): no vocab-wide logits in memory.
            bias_after_matmul: Blocks compute x @ W then + bias, not cuBLAS addmm (faster per GEMM, but 4-6% slower per step on an H200; see perf.BiasAfterMatmul).
            master_weights: Under trainer.precision bf16-true (single device, DDP): AdamW steps fp32 master copies of the bf16 weights and sums accumulated micro-batch gradients in fp32 (gpt2dist/optim.py); false: it steps the bf16 weights.
        """
        super().__init__()
        Sampling(do_sample, temperature, top_k, top_p, repetition_penalty, tuple(stop_strings or ())).check()
        if max_new_tokens < 1:
            raise ConfigError(f"model.max_new_tokens={max_new_tokens} must be >= 1 (tokens `predict` generates per prompt)")
        if samples_per_prompt < 1 or (samples_per_prompt > 1 and not do_sample):
            raise ConfigError(f"model.samples_per_prompt={samples_per_prompt} needs model.do_sample=true (greedy "
                              "continuations of one prompt are all the same) and must be at least 1")
        if compile_mode or compile_options:  # a typo must stop the run now, not at the first compiled forward
            from gpt2dist.perf import check_compile_options

            check_compile_options(compile_mode, compile_options)
            if not compile:  # a silent no-op otherwise (the fsdp1 and deepspeed_* overlays turn compile off)
                rank_zero_warn(f"model.compile_mode / compile_options are set ({compile_mode or compile_options}) but "
                               "model.compile is false: nothing is compiled; set model.compile=true to use them")
        self.save_hyperparameters()
        self.model = None  # built in configure_model

    # --- building ------------------------------------------------------------

    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def resolve_config(self, datamodule=None):
        """The GPT2Config this run trains, checked against the data (vocab and block size): the trainer's
        datamodule, or `datamodule` where there is no trainer (`gpt2dist prepare`)."""
        hp = self.hparams
        overrides = dict(hp.config_overrides or {})
        dm = datamodule if datamodule is not None else self._datamodule()
        tokenizer = getattr(dm, "tokenizer", None)
        if hp.from_scratch and tokenizer is not None:
            overrides.setdefault("vocab_size", len(tokenizer))
            # generate() stops at EOS: use the data's EOS id, not GPT-2's 50256.
            overrides.setdefault("bos_token_id", tokenizer.eos_token_id)
            overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
        config = build_config(hp.model_name_or_path, overrides, hp.dropout, attn_implementation=hp.attn_implementation)
        if tokenizer is not None and len(tokenizer) > config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
                "use the model's own tokenizer or set model.config_overrides.vocab_size"
            )
        if getattr(getattr(self._trainer, "state", None), "fn", None) != "predict":  # generation: bounded by n_positions
            _check_block_size(getattr(dm, "block_size", None), config.n_positions)
        return config

    def check_block_size(self, block_size: int | None) -> None:
        """data.block_size must fit the model's positions. Needs only the hyperparameters, so the CLI
        checks it before prepare_data tokenizes the corpus (resolve_config checks it again)."""
        hp = self.hparams
        _check_block_size(block_size, build_config(hp.model_name_or_path, hp.config_overrides).n_positions)

    @_restricted_classmethod  # as Lightning's: called on an instance it raises, it does not load in place
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, building the model once, from the checkpoint's saved config, with the perf knobs
        applied. Lightning calls configure_model before on_load_checkpoint: that built the configured model
        (from_pretrained of model_name_or_path: a download, or a failure once that folder is gone), which
        on_load_checkpoint then replaced by a bare model with no activation checkpointing or compile."""
        token = _FROM_CHECKPOINT.set(True)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _FROM_CHECKPOINT.reset(token)

    def configure_model(self) -> None:
        if self.model is not None or (_FROM_CHECKPOINT.get() and self._trainer is None):
            return  # built; or load_from_checkpoint builds it in on_load_checkpoint
        from transformers import GPT2LMHeadModel

        from gpt2dist.perf import pad_vocab

        mesh = self._device_mesh
        if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            # Lightning's ModelParallelStrategy, whose sizes default to "auto" (tensor parallel = devices per node):
            # GPT-2 here has no tensor-parallel plan, so each tensor-parallel group's ranks would train on the same
            # batches, the global batch that many times smaller than it reads.
            raise ConfigError(f"trainer.strategy {type(self._trainer.strategy).__name__} has tensor_parallel_size="
                              f"{mesh['tensor_parallel'].size()}, and GPT2Module has no tensor parallelism; use "
                              f"configs/strategy/fsdp.yaml (gpt2dist.strategies.FSDP2Strategy, data parallel over "
                              f"every process) or set tensor_parallel_size: 1")
        config = self.resolve_config()
        strategy = self._trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False):
            if self.hparams.pad_vocab_to_multiple_of > 1:
                raise ConfigError("model.pad_vocab_to_multiple_of > 1 cannot resize ZeRO-3 partitioned embeddings; "
                                  "set it to 1 with DeepSpeed ZeRO-3")
            # Inside deepspeed.zero.Init: parameters are partitioned as they are created.
            from gpt2dist.strategies import build_zero3_model

            self.model = build_zero3_model(config, self.hparams)
        elif self.hparams.from_scratch:
            self.model = GPT2LMHeadModel(config)
        else:
            try:
                self.model = GPT2LMHeadModel.from_pretrained(
                    self.hparams.model_name_or_path, config=config, attn_implementation=self.hparams.attn_implementation
                )
            except Exception as e:
                raise ConfigError(
                    f"cannot load pretrained weights from {self.hparams.model_name_or_path!r} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); give a local folder, or set "
                    "model.from_scratch=true"
                ) from None
            # In the dtype trainer.precision builds in (bf16 under bf16-true, else fp32), not the stored one: a
            # folder saved in bf16 trained bf16 weights under 32-true and bf16-mixed. Cast here, not by
            # from_pretrained's dtype argument, which transformers < 4.56 (allowed: >= 4.45) calls torch_dtype.
            if any(p.dtype != torch.get_default_dtype() for p in self.model.parameters()):
                self.model.to(torch.get_default_dtype())
        # Padding after building: the real rows are initialised (or loaded) exactly as unpadded.
        real_vocab = pad_vocab(self.model, self.hparams.pad_vocab_to_multiple_of)
        if self.model.config.vocab_size != real_vocab:
            self.model.config.unpadded_vocab_size = real_vocab  # read back by export (slices to it)
        self._model_built()
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2 (see strategies.py)
            from gpt2dist.strategies import shard_fsdp2

            shard_fsdp2(self, self._device_mesh["data_parallel"], str(self._trainer.precision))

    def _model_built(self) -> None:
        """After `self.model` is built (configure_model, or load_from_checkpoint's saved config)."""
        from gpt2dist.perf import apply_perf_options

        apply_perf_options(self)
        # Shapes before any sharding, for the weight-decay groups (see configure_optimizers).
        self._param_ndim = {_unwrapped_name(n): len(getattr(p, "ds_shape", p.shape)) for n, p in self.named_parameters()}

    @property
    def vocab_size(self) -> int:
        """The real vocabulary (logit columns that can be predicted), without padding rows."""
        return getattr(self.model.config, "unpadded_vocab_size", self.model.config.vocab_size)

    # --- steps ---------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, per_token_loss: bool = False) -> torch.Tensor:
        """Logits over the real vocabulary, (batch, T, vocab); with `per_token_loss`, the next-token
        losses instead, (batch, T-1) in fp32. The loss goes through here, the module's own call, because
        FSDP2 shards this root: its forward hook gathers the embeddings and the tied head (calling
        `self.model` directly met a sharded DTensor embedding, compiled FSDP2 x2 on CPU)."""
        return self._token_losses(input_ids) if per_token_loss else self._logits(input_ids)

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        # use_cache=False: GPT-2's config says True, and then every training forward fills a KV cache:
        # memory for nothing, and each block's first cache write makes torch.compile recompile, so past
        # 8 blocks (dynamo's recompile limit) the rest ran eager (GPT-2 small at 0.70x HF Trainer, H200).
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        # Padded vocabulary rows are sliced off: they can never be predicted or take loss mass.
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]

    def token_losses(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token next-token loss, shape (batch, block_size - 1), computed in fp32."""
        return self(input_ids, per_token_loss=True)

    def _token_losses(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("fused_cross_entropy"):
            from gpt2dist.perf import fused_linear_token_losses

            return fused_linear_token_losses(self.model, input_ids, self.vocab_size)
        from gpt2dist.perf import compiled_shifted_token_losses, shifted_token_losses

        if self.hparams.compile:  # padded logits in, masked inside the compiled loss (see shifted_token_losses)
            logits = self.model(input_ids=input_ids, use_cache=False).logits
            return compiled_shifted_token_losses(logits, input_ids, real_vocab=self.vocab_size)
        return shifted_token_losses(self._logits(input_ids), input_ids)  # eager: a slice copies fewer fp32 columns

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.token_losses(batch["input_ids"]).mean()
        # Mean over the accumulation window, logged once per optimizer step (not the last micro-batch).
        self._loss_sum = getattr(self, "_loss_sum", 0.0) + loss.detach()
        self._loss_n = getattr(self, "_loss_n", 0) + 1
        if not self.trainer.fit_loop.epoch_loop._should_accumulate():
            from gpt2dist.monitor import logs_this_step

            # Only on steps Lightning writes to the loggers: nothing is dropped, and no all-reduce
            # (sync_dist) or host copy on the others. Progress-bar values are CPU tensors: every
            # bar refresh (Rich's: every batch) reads them, and reading a GPU tensor is a host sync.
            if logs_this_step(self.trainer):
                self._shown_loss = self._loss_sum / self._loss_n
                self.shown_loss_step = self.trainer.global_step + 1  # the optimizer step this window ends at
                self.log("train/loss", self._shown_loss, sync_dist=True)
                self.log("lr", torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"]), prog_bar=True)
            self.window_loss_sum = self._loss_sum  # non-finite iff a micro-batch's loss was (FaultTolerance, 16-mixed)
            self._loss_sum, self._loss_n = 0.0, 0
        return loss

    def on_fit_start(self) -> None:
        from gpt2dist.strategies import use_fp32_gradient_reduce

        if use_fp32_gradient_reduce(self.trainer):  # DDP + bf16-true: the gradient mean in fp32
            log.info("DDP: bf16 gradients are all-reduced in fp32 (gpt2dist.strategies.fp32_allreduce_hook)")

    def _fp32_accumulation(self):
        """(MasterWeightAdamW, the DDP hook's FP32Reduce or None on one device) when micro-batch
        gradients are summed in fp32 (bf16-true masters, trainer.accumulate_grad_batches > 1), else None."""
        from torch.nn.parallel import DistributedDataParallel

        from gpt2dist.strategies import fp32_reduce_state

        trainer = self._trainer
        if trainer is None or trainer.accumulate_grad_batches <= 1:
            return None
        opt = self._master_optimizer()
        state = fp32_reduce_state(trainer)
        if opt is None or (isinstance(trainer.strategy.model, DistributedDataParallel) and state is None):
            return None  # under a user's DDP comm hook the local sums would never be all-reduced: bf16 sums
        return opt, state

    def on_before_backward(self, loss: torch.Tensor) -> None:
        fp32 = self._fp32_accumulation()
        if fp32 and fp32[1] is not None and not self.trainer.fit_loop.epoch_loop._should_accumulate():
            fp32[1].pending = fp32[0].pending_sums()  # the all-reduce of this backward adds them

    def on_after_backward(self) -> None:
        fp32 = self._fp32_accumulation()
        if not fp32:
            return
        opt, state = fp32
        if self.trainer.fit_loop.epoch_loop._should_accumulate():
            opt.accumulate()  # under DDP's no_sync: local sums, all-reduced with the last micro-batch
        elif state is not None:
            state.pending = {}
            opt.discard_pending()  # the all-reduce added them
        else:
            opt.fold()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        from gpt2dist.faults import save_deferred_interval_checkpoints

        save_deferred_interval_checkpoints(self.trainer)  # here: after every callback's hook, ModelCheckpoint's too
        shown = getattr(self, "_shown_loss", None)
        if shown is not None:  # a logging step: TrainMonitor has just synced, so this copy waits for nothing
            self._shown_loss = None
            self.log("loss", shown.detach().float().cpu(), prog_bar=True, logger=False)

    def _eval_step(self, batch: dict) -> None:
        losses = self.token_losses(batch["input_ids"])
        weight = batch["loss_weight"].to(losses.dtype)  # 0 for padding blocks of uneven shards
        if "scored" in batch:  # overlapping windows (data.eval_stride): only each window's last `scored` targets
            position = torch.arange(losses.shape[1], device=losses.device)
            mask = (position[None, :] >= losses.shape[1] - batch["scored"][:, None]).to(losses.dtype)
            self._eval_sum += ((losses * mask).sum(dim=1) * weight).sum().detach()
            self._eval_tokens += (mask.sum(dim=1) * weight).sum()
            return
        self._eval_sum += (losses.sum(dim=1) * weight).sum().detach()
        self._eval_tokens += weight.sum() * losses.shape[1]

    def _eval_start(self) -> None:
        self._eval_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._eval_tokens = torch.zeros((), device=self.device, dtype=torch.float64)

    def _eval_end(self, prefix: str) -> None:
        total = self.trainer.strategy.reduce(self._eval_sum, reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._eval_tokens, reduce_op="sum")
        if tokens.item() == 0:
            return
        loss = (total / tokens).float()
        # Token-weighted mean over the whole split, then exp: not a mean of per-batch ppl.
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{prefix}/ppl", torch.exp(loss), prog_bar=prefix == "val", sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def sampling(self) -> Sampling:
        hp = self.hparams
        return Sampling(hp.do_sample, hp.temperature, hp.top_k, hp.top_p, hp.repetition_penalty, tuple(hp.stop_strings or ()))

    @torch.no_grad()
    def generate_text(self, tokenizer, prompt: str, max_new_tokens: int | None = None,
                      repetition_penalty: float = 1.0) -> str:
        """Greedy continuation of `prompt` (deterministic); a penalty > 1 keeps small models from looping."""
        return self.generate_batch(tokenizer, [prompt], max_new_tokens, Sampling(repetition_penalty=repetition_penalty))[0]

    @torch.no_grad()
    def generate_batch(self, tokenizer, prompts: list[str], max_new_tokens: int | None = None,
                       sampling: Sampling | None = None, seeds: list[int] | None = None) -> list[str]:
        """Continuations of `prompts` in one batch (gpt2dist/generation.py); greedy unless `sampling` says so."""
        return generate_texts(self.model, tokenizer, prompts, max_new_tokens or self.hparams.max_new_tokens,
                              sampling or Sampling(), seeds, self.vocab_size)

    def on_predict_start(self) -> None:
        # Every prompt, on every rank, before any is generated: a bad one fails the run at once on all ranks
        # (not after the others, with a rank left waiting in a collective).
        dm = self._datamodule()
        for where, prompt in dm.prompts_with_origin() if hasattr(dm, "prompts_with_origin") else []:
            prompt_ids(dm.tokenizer, prompt, self.model.config.n_positions, where)

    def predict_step(self, batch: list[dict] | dict, batch_idx: int) -> list[dict]:
        """One row {"index", "sample", "prompt", "text"} per continuation of each prompt in the batch: a list of
        the DataModule's {"index": i, "prompt": p} items (or one item)."""
        from gpt2dist.monitor import generate_samples

        items = batch if isinstance(batch, list) else [batch]
        # A bare string has no index: its seed and place in the output were batch_idx, the same for every
        # string of a batch (equal samples, rows out of order), and another rank's too under DDP.
        if not all(isinstance(x, dict) and {"index", "prompt"} <= x.keys() for x in items):
            raise ConfigError("predict batches must be {'index': i, 'prompt': text} items, as gpt2dist's "
                              "TokenBlockDataModule makes them from data.predict_file; got "
                              f"{type(items[0] if items else batch).__name__} items")
        tokenizer = getattr(self._datamodule(), "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("predict needs the run's tokenizer: run it with gpt2dist's TokenBlockDataModule "
                              "(`gpt2dist predict --config ...`), not a dataloader alone")
        hp = self.hparams
        # Pad items even out the ranks' shares (DDP): not generated, not written.
        rows = [{"index": x["index"], "sample": j, "prompt": x["prompt"]}
                for x in items if not x.get("pad") for j in range(hp.samples_per_prompt)]
        if not rows:
            return []
        seeds = [row_seed(hp.generation_seed, r["index"], r["sample"]) for r in rows]
        # Through generate_samples: under FSDP2 `generate` calls self.model, not the root's forward, so the
        # root's parameters (embeddings, ln_f, tied head) must be unsharded there.
        texts = generate_samples(self, tokenizer, [r["prompt"] for r in rows], hp.max_new_tokens,
                                 seed=hp.generation_seed, sampling=self.sampling(), seeds=seeds)
        return [{**r, "text": t} for r, t in zip(rows, texts)]

    # --- optimisation --------------------------------------------------------

    def lr_at(self, step: int, total: int) -> float:
        """Linear warmup to lr, then cosine decay to min_lr at `total` steps (flat after)."""
        hp = self.hparams
        if step < hp.warmup_steps:
            return hp.lr * (step + 1) / hp.warmup_steps
        progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
        return hp.min_lr + 0.5 * (hp.lr - hp.min_lr) * (1 + math.cos(math.pi * progress))

    def configure_optimizers(self):
        hp = self.hparams
        if hp.lr <= 0:  # the schedule is a multiple of lr (LambdaLR): 0 divided by zero, < 0 torch's bare ValueError
            raise ConfigError(f"model.lr={hp.lr} must be > 0 (the peak learning rate); to train nothing, use "
                              "`gpt2dist validate`")
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        # By the shape each parameter had before sharding: ZeRO-3 partitions are empty 1-D tensors
        # and FSDP1 flattens, so p.dim() there would put every weight in the no-decay group.
        shapes = getattr(self, "_param_ndim", {})
        ndim = {n: shapes.get(_unwrapped_name(n), len(getattr(p, "ds_shape", p.shape))) for n, p in named}
        named_groups = [
            {"params": [(n, p) for n, p in named if ndim[n] >= 2], "weight_decay": hp.weight_decay},
            {"params": [(n, p) for n, p in named if ndim[n] < 2], "weight_decay": 0.0},  # biases, LayerNorm
        ]
        named_groups = [g for g in named_groups if g["params"]]  # wrappers drop empty groups; keep lambdas in step
        from gpt2dist.strategies import deepspeed_offloads_optimizer, keeps_own_master_weights

        # One kernel for all params instead of a loop (CUDA, and CPU since torch 2.4), which also
        # takes the NaN guard's flag and skips a bad step on the device (gpt2dist/faults.py); not
        # for DeepSpeed's CPU-offloaded partitions. On CPU, the quickstart's 1.33M params, 2 threads:
        # 1.1 ms per step fused vs 11.0 foreach, 9.7 for-loop (torch 2.13, median of 30).
        offloaded = deepspeed_offloads_optimizer(self.trainer.strategy)  # always call: it also configures DeepSpeed
        # Not under a GradScaler (16-mixed): a fused AdamW unscales inside its own step, so Lightning unscales
        # neither before clipping (it refuses to clip, and every preset clips) nor before the grad-norm hook
        # (train/grad_norm logged x65536, the NaN guard's norm too).
        plugin = getattr(self.trainer, "precision_plugin", None)
        scaled = getattr(plugin, "scaler", None) is not None
        fused = self.device.type in ("cuda", "cpu") and not offloaded and not scaled
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision

        if fused and isinstance(plugin, MixedPrecision):
            # bf16-mixed has no GradScaler, so nothing is unscaled, yet Lightning's AMP plugin refuses to clip
            # for any optimizer that could unscale inside its step (fused AdamW): every GPU preset (bf16-mixed,
            # gradient_clip_val 1.0) died at its first optimizer step. The base plugin's clip: clip_grad_norm_.
            import types

            plugin.clip_gradients = types.MethodType(Precision.clip_gradients, plugin)
        bf16_weights = any(p.dtype == torch.bfloat16 for _, p in named)  # trainer.precision bf16-true
        owner = keeps_own_master_weights(self.trainer.strategy)
        if hp.master_weights and bf16_weights and owner is False:
            from gpt2dist.optim import MasterWeightAdamW

            optimizer = MasterWeightAdamW(named_groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        else:
            if bf16_weights and not owner:
                why = ("model.master_weights is false" if owner is False else
                       f"{type(self.trainer.strategy).__name__} keeps none; use trainer.precision bf16-mixed there")
                rank_zero_warn(f"AdamW steps bf16 weights without fp32 masters ({why}): updates below bf16's resolution are lost")
            if any(p.dtype == torch.float16 for _, p in named) and not owner:
                rank_zero_warn("trainer.precision 16-true: AdamW steps fp16 weights with no fp32 masters and no loss "
                               "scaling (small gradients underflow); use bf16-true or 16-mixed")
            groups = [{**g, "params": [p for _, p in g["params"]]} for g in named_groups]
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        # The run's total optimizer steps: min(max_steps, what max_epochs allows). max_steps alone decayed a
        # `--trainer.max_epochs 1` run on top of a preset's max_steps 5000 over 5000 steps it never reached: a
        # 6-step epoch kept the peak lr throughout.
        total = hp.decay_steps or self._total_steps()
        if not math.isfinite(total) or total < 1:  # Lightning's -1: an iterable loader with no length, no max_steps
            raise ConfigError("trainer.max_steps and trainer.max_epochs are both unbounded (-1), so the cosine decay has no "
                              "length; set trainer.max_steps, trainer.max_epochs or model.decay_steps")
        total = int(total)
        if hp.min_lr > hp.lr:  # at fit only: evaluating or loading a checkpoint of such a run stays possible
            raise ConfigError(f"model.min_lr={hp.min_lr} is above model.lr={hp.lr}: the cosine decay would raise the "
                              "learning rate; set model.min_lr below model.lr")
        if 0 < total <= hp.warmup_steps:
            # A short fine-tune with the default 100 warmup steps: its lr never reached model.lr nor decayed
            # (50 steps: 0.5 x lr at the end); a shorter decay_steps dropped it to min_lr in one step.
            rank_zero_warn(f"model.warmup_steps={hp.warmup_steps} is not below the {total} steps of the lr schedule "
                           f"(model.decay_steps, else the run's: trainer.max_steps or max_epochs): there is no decay "
                           f"after the warmup; "
                           f"lower model.warmup_steps (e.g. {max(1, total // 20)}, 5%)")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_at(step, total) / hp.lr)
        self._schedule = {"lr": hp.lr, "min_lr": hp.min_lr, "warmup_steps": hp.warmup_steps, "decay_steps": total}
        self._group_settings = [{"betas": tuple(hp.betas), "eps": hp.eps, "weight_decay": g["weight_decay"]} for g in named_groups]
        inner = getattr(optimizer, "inner", optimizer)  # MasterWeightAdamW steps through its inner AdamW
        self._kernel_settings = [{k: g[k] for k in KERNEL_KEYS if k in g} for g in inner.param_groups]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> float:
        """Lightning's estimated_stepping_batches, counted from the data module when max_epochs bounds the run.
        Lightning's own count builds the fit loop's train loader here, before a resume restores the loader's
        state, which then never reaches it: a resume mid-epoch replayed the epoch from its first block."""
        t = self.trainer
        max_epochs = getattr(t, "max_epochs", None)
        if max_epochs is None or max_epochs == -1:  # bounded by max_steps only (or not at all)
            return t.max_steps if t.max_steps != -1 else math.inf
        dm = self._datamodule()
        if getattr(dm, "train_set", None) is not None and hasattr(dm, "optimizer_steps_per_epoch"):
            per_epoch = dm.optimizer_steps_per_epoch(t.world_size, t.accumulate_grad_batches)
            limit = t.limit_train_batches
            if limit is not None and (isinstance(limit, int) or limit != 1.0):  # Lightning's cap per epoch: a count or a fraction
                micro = len(dm.train_set) // t.world_size // dm.batch_size
                micro = min(micro, int(limit)) if isinstance(limit, int) else int(micro * limit)
                per_epoch = math.ceil(micro / t.accumulate_grad_batches)
            total = per_epoch * max(max_epochs, 1)
            return min(total, t.max_steps) if t.max_steps != -1 else total
        # Another loader (the Python API): max_steps where set, as before; else Lightning's count, which loads it.
        return t.max_steps if t.max_steps > 0 else t.estimated_stepping_batches

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients are freed at once (as nanoGPT and llm.c do).

        Lightning sets them to None only after the next training_step, so every forward ran with
        the last step's gradients still held: 4 bytes x N under bf16-mixed (GPT-2 Large: 3.1 GB)
        on top of the activations. Nothing reads them after the step (the NaN guard and the
        gradient norm run before it). DeepSpeed's engine.step() already zeroes its own buffers."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            optimizer.zero_grad(set_to_none=True)

    def on_train_start(self) -> None:
        self._kernel_over_restored_optimizer()
        self._config_over_restored_optimizer()

    def _kernel_over_restored_optimizer(self) -> None:
        """AdamW's kernel is this run's pick, not the checkpoint's: load_state_dict takes the saved groups whole,
        `fused` included. A checkpoint of a 16-mixed run (unfused: GradScaler) resumed under bf16 stepped unfused,
        while the NaN guard, which asks the optimizer's construction, still handed it `found_inf`: the first step
        died (AssertionError); the other way round, a fused kernel stepped under a GradScaler."""
        settings = getattr(self, "_kernel_settings", None)
        optimizer = self.trainer.optimizers[0] if settings and self.trainer.optimizers else None
        inner = getattr(optimizer, "inner", optimizer)
        if isinstance(inner, torch.optim.AdamW):  # not DeepSpeed's (its engine restores its own)
            for group, kernel in zip(inner.param_groups, settings):
                if all(group.get(k) == v for k, v in kernel.items()):
                    continue
                group.update(kernel)
                # load_state_dict put each `step` where the saved kernel wants it: the fused (and capturable)
                # kernels take it on the parameter's device, the others on the CPU (a CUDA fused step refused it).
                on_device = bool(group.get("fused") or group.get("capturable"))
                for p in group["params"]:
                    state = inner.state.get(p, {})
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].to(p.device if on_device else "cpu", torch.float32)

    def on_validation_model_zero_grad(self) -> None:
        """Lightning builds the validation loader (forking data.num_workers processes, 0.1-0.2 s with 4)
        before any callback's on_validation_start: the throughput clock stops here, or each validation's
        loader start counted as training time (the first tokens/s after it read several times too low)."""
        from gpt2dist.monitor import TrainMonitor

        for callback in self.trainer.callbacks:
            if isinstance(callback, TrainMonitor) and callback.enabled:
                callback.pause(self)
        super().on_validation_model_zero_grad()

    def _config_over_restored_optimizer(self) -> None:
        """After a resume, the config's optimizer settings and schedule apply, not the checkpoint's.

        Restoring a checkpoint puts back the optimizer's param-group settings (betas, eps, weight_decay)
        and the scheduler's base_lrs (the old peak lr): a `--model.lr 1e-4` resume of a 3e-3 run stepped
        at 30x the asked-for rate, and a new weight_decay was ignored. Unchanged settings recompute the same
        floats (LambdaLR's own base_lr * lambda(step)), so an exact resume stays bitwise exact."""
        saved = getattr(self, "_saved_schedule", None)
        if saved is None or not self.trainer.optimizers or not getattr(self, "_group_settings", None):
            return  # not a resume (or not our optimizer)
        optimizer, scheduler = self.trainer.optimizers[0], self.lr_schedulers()
        changes = [f"{k} {saved[k]} -> {v}" for k, v in self._schedule.items() if k in saved and saved[k] != v]
        for group, want in zip(optimizer.param_groups, self._group_settings):
            for key, value in want.items():
                if key not in group:
                    continue
                old = tuple(group[key]) if key == "betas" else group[key]
                if old != value:
                    changes.append(f"{key} {old} -> {value}")
                    group[key] = value
        if scheduler is not None:
            scheduler.base_lrs = [self.hparams.lr] * len(scheduler.base_lrs)
            step = scheduler.last_epoch
            for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["initial_lr"], group["lr"] = base, base * fn(step)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if changes:
            hint = (f"; model.decay_steps={saved['decay_steps']} keeps the checkpoint's decay"
                    if saved.get("decay_steps") != self._schedule["decay_steps"] else "")
            rank_zero_warn(f"resume: the optimizer settings are the config's, not the checkpoint's "
                           f"({', '.join(dict.fromkeys(changes))}); lr at step {self.trainer.global_step} is "
                           f"{optimizer.param_groups[0]['lr']:.3g}{hint}")

    # --- checkpoints ---------------------------------------------------------

    def _master_optimizer(self):
        """The trainer's MasterWeightAdamW (bf16-true with master_weights), else None."""
        from gpt2dist.optim import MasterWeightAdamW

        trainer = self._trainer
        return next((o for o in (trainer.optimizers if trainer is not None else []) if isinstance(o, MasterWeightAdamW)), None)

    def teardown(self, stage: str) -> None:
        # Lightning moves optimizer state to the CPU after fit (Strategy.teardown) by walking
        # optimizer.state; the masters and moments live in MasterWeightAdamW's inner AdamW, so they
        # stayed on the GPU: 16 B/param, 24 GB for GPT-2 XL, held until the process ends.
        opt = self._master_optimizer()
        if opt is not None and stage == "fit":
            opt.to(torch.device("cpu"))

    def master_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights by state_dict key (tied names included) when AdamW keeps them
        (bf16-true with master_weights), else None."""
        opt = self._master_optimizer()
        if opt is None:
            return None
        by_param = {id(p): m for p, m in opt.pairs()}
        return {n: by_param[id(p)] for n, p in self.named_parameters(remove_duplicate=False) if id(p) in by_param}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gpt2_config"] = self.model.config.to_dict()
        if getattr(self, "_schedule", None):  # what a resume compares its config with
            checkpoint["lr_schedule"] = dict(self._schedule)
        masters = self.master_state_dict()
        if masters:
            # The fp32 masters are the weights (the bf16 ones are their rounding): stored once, here,
            # so exports hold them; the optimizer state points here instead of a second copy.
            checkpoint["state_dict"].update(masters)
            for state in checkpoint.get("optimizer_states", []):
                if isinstance(state.get("masters"), dict):
                    state["masters"] = "state_dict"
        batch = self._batch_setup()
        if batch:  # what a resume compares its global batch with
            checkpoint["batch_setup"] = batch
        tokenizer = getattr(self._datamodule(), "tokenizer", None)
        if tokenizer is not None:  # lets tools/export_hf.py find the tokenizer again
            # A local folder's absolute path: relative (data.cache_dir runs/cache), tools/export_hf.py found it
            # only from the directory training ran in.
            name = str(tokenizer.name_or_path)
            checkpoint["tokenizer_name_or_path"] = os.path.abspath(name) if os.path.isdir(name) else name
            checkpoint["tokenizer_identity"] = self._tokenizer_identity(tokenizer)  # what the ids mean: checked on load

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._saved_schedule = checkpoint.get("lr_schedule", {})
        for state in checkpoint.get("optimizer_states", []):
            # Masters stored in the state_dict (see on_save_checkpoint); from a checkpoint saved
            # without them (bf16-mixed), its fp32 weights are the masters. Plain AdamW ignores the key.
            if isinstance(state, dict) and not isinstance(state.get("masters"), dict):
                state["masters"] = checkpoint.get("state_dict")
        saved = checkpoint.get("gpt2_config")
        if saved is None:
            if self.model is None:  # a checkpoint from before gpt2_config was stored: the configured model
                with _not_from_checkpoint():
                    self.configure_model()
            return
        if self.model is None or self._trainer is None:
            # GPT2Module.load_from_checkpoint(...) outside a Trainer: the saved config is the truth
            # (its vocab came from the training data's tokenizer, which is not at hand here).
            from transformers import GPT2Config, GPT2LMHeadModel

            self.model = GPT2LMHeadModel(GPT2Config.from_dict(saved))
            self._model_built()
            return
        ours = self.model.config.to_dict()
        diff = {k: (saved.get(k), ours.get(k)) for k in SHAPE_KEYS if saved.get(k) != ours.get(k)}
        real = lambda cfg: cfg.get("unpadded_vocab_size") or cfg.get("vocab_size")
        if set(diff) == {"vocab_size"} and real(saved) == real(ours):  # the same model, padded to other row counts
            pad = (checkpoint.get("hyper_parameters") or {}).get("pad_vocab_to_multiple_of")
            raise CheckpointError(
                f"the checkpoint pads the vocabulary of {real(saved)} to {saved['vocab_size']} rows"
                f"{f' (model.pad_vocab_to_multiple_of={pad})' if pad else ''}, this config to {ours['vocab_size']} "
                f"(model.pad_vocab_to_multiple_of={self.hparams.pad_vocab_to_multiple_of}); "
                f"set model.pad_vocab_to_multiple_of{f'={pad}' if pad else ' as the checkpoint was trained'}")
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
            raise CheckpointError(f"the checkpoint is for a different model ({desc}); use the matching model config")
        self._check_tokenizer(checkpoint)
        self._warn_on_another_global_batch(checkpoint.get("batch_setup"))

    def _batch_setup(self) -> dict | None:
        """The global batch's factors: micro-batch x processes x accumulation."""
        micro = getattr(self._datamodule(), "batch_size", None)
        if self._trainer is None or not isinstance(micro, int):
            return None
        return {"micro_batch": micro, "world_size": self.trainer.world_size,
                "accumulate": self.trainer.accumulate_grad_batches}

    def _warn_on_another_global_batch(self, saved: dict | None) -> None:
        """A resume under another global batch is legitimate (more nodes, a larger micro-batch), and the data
        position is kept (data.start_the_epoch_a_resume_is_in: no block skipped or repeated), but it is no
        longer the run that was started: said once, with what changed."""
        ours = self._batch_setup()
        if not saved or not ours or self.trainer.state.fn != "fit" or saved == ours:
            return
        size = lambda b: b["micro_batch"] * b["world_size"] * b["accumulate"]
        show = lambda b: f"{b['micro_batch']} x {b['world_size']} processes x {b['accumulate']} accumulated"
        partial = (" The first optimizer step may accumulate fewer micro-batches (Lightning counts the window from "
                   "the epoch's start)." if saved["accumulate"] != ours["accumulate"] else "")
        rank_zero_warn(f"resume: the global batch was {show(saved)} = {size(saved)} sequences per optimizer step, now "
                       f"{show(ours)} = {size(ours)}: training goes on from the same data position, but each step holds "
                       f"other samples than the uninterrupted run's, and the lr schedule goes on by step.{partial}")

    def _tokenizer_identity(self, tokenizer) -> str:
        """tokenizer_identity, once per tokenizer object: 0.3 s for GPT-2's 50k tokens and merges, at every save."""
        cached = getattr(self, "_identity_cache", None)
        if cached is None or cached[0] is not tokenizer:
            self._identity_cache = cached = (tokenizer, tokenizer_identity(tokenizer))
        return cached[1]

    def _check_tokenizer(self, checkpoint: dict) -> None:
        """The same vocabulary size is not the same tokenizer: a tokenizer trained again on a corpus with one
        more file (data.train_tokenizer_vocab_size) kept 512 tokens, and 214 of them meant other text. The
        weights would be read through the wrong ids (resumed, evaluated, sampled) without a word."""
        saved = checkpoint.get("tokenizer_identity")
        tokenizer = getattr(self._datamodule(), "tokenizer", None)
        if saved is None or tokenizer is None or self._tokenizer_identity(tokenizer) == saved:
            return  # a checkpoint from before this check, or no tokenizer at hand
        recorded = checkpoint.get("tokenizer_name_or_path")
        trained = getattr(self._datamodule(), "train_tokenizer_vocab_size", None)
        fix = (f"set data.tokenizer={recorded}" + (" and data.train_tokenizer_vocab_size=null (the data changed, so "
               "a new tokenizer was trained)" if trained else "")) if recorded else "use the tokenizer it was trained with"
        raise CheckpointError(f"the checkpoint was trained with another tokenizer ({recorded or 'not recorded'}) than "
                              f"this run's ({tokenizer.name_or_path}): its token ids mean other text; {fix}")
