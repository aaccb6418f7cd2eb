"""Speed and memory switches for GPT2Module, applied in `configure_model`.

Each switch is a typed knob on GPT2Module (so a YAML line turns it on) and each is measured
with `tools/bench.py`:

- `pad_vocab_to_multiple_of`: 50257 -> 50304 rows (multiple of 128) so the logits matmul maps
  onto whole tensor-core tiles. The padded rows are zero, never looked up by the data, excluded
  from the loss (-inf inside the compiled loss, sliced off in eager) and suppressed in generation,
  and sliced off again on export
  so the Hugging Face folder keeps the standard 50257-row shape.
- `compile`: `torch.compile` per GPT2Block ("regional"): the 12..48 blocks share one compiled
  graph, so compile time is that of one block, not of the whole model. The loss is a second region.
- `activation_checkpointing`: recompute each block in backward (keeps only block inputs).
- `tf32`: TF32 for fp32 matmuls (the fp32 parts under bf16-mixed, and 32-true runs).
- `fused_cross_entropy`: Liger's fused linear + cross-entropy (GPU only, optional import):
  the (tokens x vocab) logits are never materialised.
- `bias_after_matmul`: each block's Conv1D runs as a plain matmul, then `+ bias`, instead of
  cuBLAS `addmm` with the bias in its epilogue (see `BiasAfterMatmul`). On: faster GEMMs, but a
  slower step (H200: -4% GPT-2 Large, -6% small), so it is off by default.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers.pytorch_utils import Conv1D

from gpt2dist.errors import ConfigError

log = logging.getLogger(__name__)

def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (1: unchanged). 50257, 128 -> 50304."""
    if multiple < 1:
        raise ConfigError(f"model.pad_vocab_to_multiple_of={multiple} must be >= 1 (1 disables padding)")
    return math.ceil(vocab_size / multiple) * multiple


def pad_vocab(model, multiple: int) -> int:
    """Grow the (tied) embedding/lm_head to a multiple of `multiple` rows; returns the real vocab.

    The new rows are zero: their logits are sliced off before the loss, so they get no gradient
    (and weight decay keeps zero at zero). Real rows keep their values bit for bit, so a padded
    model computes the same loss as the unpadded one.
    """
    real = model.config.vocab_size
    padded = padded_vocab_size(real, multiple)
    if padded != real:
        model.resize_token_embeddings(padded, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[real:].zero_()
            out = model.get_output_embeddings()
            if out.weight is not model.get_input_embeddings().weight:  # untied heads (not GPT-2's default)
                out.weight[real:].zero_()
    return real


def unpad_vocab(model, real_vocab: int | None = None):
    """`model` with only its first `real_vocab` rows (default: `config.unpadded_vocab_size`, which
    `GPT2Module` sets when it pads): a new GPT2LMHeadModel of the standard HF shape, for export.
    An unpadded model is returned as is."""
    from transformers import GPT2Config, GPT2LMHeadModel

    real_vocab = real_vocab or getattr(model.config, "unpadded_vocab_size", None) or model.config.vocab_size
    if model.config.vocab_size == real_vocab:
        return model
    cfg_dict = {k: v for k, v in model.config.to_dict().items() if k != "unpadded_vocab_size"}
    cfg = GPT2Config.from_dict({**cfg_dict, "vocab_size": real_vocab})
    with torch.device("meta"):  # no random init of 774M weights only to overwrite them
        out = GPT2LMHeadModel(cfg)
    vocab_rows = {"transformer.wte.weight", "lm_head.weight"}
    state = {k: (v[:real_vocab] if k in vocab_rows else v).detach().clone() for k, v in model.state_dict().items()}
    out.load_state_dict(state, strict=False, assign=True)
    # Non-persistent buffers (not in state_dict) are taken from the source model by name.
    src_buffers = dict(model.named_buffers())
    for name, buf in list(out.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            out.get_submodule(owner).register_buffer(leaf, src_buffers[name].clone(), persistent=False)
    out.tie_weights()
    leftover = [n for n, t in [*out.named_parameters(), *out.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"unpad_vocab: tensors left uninitialised: {leftover[:3]}")
    return out.train(model.training)


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convs on CUDA (process-wide, like the flags it sets). Matmuls
    through set_float32_matmul_precision, the API Lightning's hint names: after a user's call to it,
    setting `allow_tf32` made every later get_float32_matmul_precision() (Inductor, the next Trainer)
    raise on the "mix of the legacy and new APIs" (torch 2.9+). That call also sets oneDNN's CPU
    matmuls (to TF32 where a CPU has it), so a machine without CUDA is left as it is."""
    if not torch.cuda.is_available():
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def blocks(model) -> list[torch.nn.Module]:
    """The transformer blocks of a GPT2LMHeadModel (the unit for compile, checkpointing, sharding)."""
    return list(model.transformer.h)


class BiasAfterMatmul(Conv1D):
    """transformers' GPT-2 `Conv1D` (same weight (nx, nf), bias (nf), state_dict), computed as
    `x @ weight`, then `+ bias`, instead of `addmm(bias, x, weight)`.

    Why: on the H200 (torch 2.11, bf16, Inductor's GEMM autotune log), cuBLAS addmm took 0.440 ms
    for GPT-2 Large's MLP-in GEMM (16384 x 1280 @ 1280 x 5120) where a plain mm of the same shape
    took 0.285 ms; the QKV, attention-out and MLP-out addmms were 0.333 / 0.125 / 0.312 ms. Inductor
    re-fuses `mm + bias` into addmm when the sum feeds backward, so the add follows a view of the
    mm (`matmul` on 3-D input), which its pattern does not match; the add then fuses into the next
    elementwise kernel (GELU, the residual add). The bias is added in the matmul's dtype (bf16
    under autocast), as addmm does, but after the product is rounded: up to 1 bf16 ulp apart.
    Measured per step on the same H200 (tools/gpu_check_perf.sh TUNE=1): slower, 199.4 vs 191.1 ms
    (Large 16 x 1024) and 78.8 vs 74.1 ms (small 32 x 1024); the bias adds cost more than addmm's
    epilogue saved. Kept, off by default, for other cuBLAS versions and cards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y + self.bias.to(y.dtype)


def bias_after_matmul(model) -> int:
    """Turn each block's Conv1D into `BiasAfterMatmul` in place (class swap: parameters, hooks and
    sharding stay as they are); returns how many."""
    n = 0
    for block in blocks(model):
        for m in block.modules():
            if type(m) is Conv1D:
                m.__class__ = BiasAfterMatmul
                n += 1
    return n


def apply_activation_checkpointing(model) -> None:
    """Recompute each GPT2Block in backward (non-reentrant, so it composes with compile and FSDP2)."""
    # No `config.use_cache = False` here: every training forward passes use_cache=False itself, and the
    # config is saved into checkpoints and exports, where it would turn off the KV cache of a user's
    # plain forward (past_key_values None) in the exported model.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_compile_options(mode: str | None, options: dict | None) -> None:
    """model.compile_mode / model.compile_options: a mode torch.compile knows, known Inductor options of the
    right types, and not both (torch.compile takes one or the other). It would only say so at the first
    compiled forward, after data preparation, as a traceback."""
    if not options:
        _check_with_inductor(mode, None, "model.compile_mode", f"={mode!r}")
        return
    if mode is not None:
        raise ConfigError(f"model.compile_mode={mode!r} and model.compile_options cannot both be set "
                          "(torch.compile takes one); drop one of them")
    from torch._inductor import list_options

    known = set(list_options())
    bad = sorted(set(options) - known)
    if bad:
        import difflib

        near = difflib.get_close_matches(bad[0], known, n=1)
        raise ConfigError(f"model.compile_options: {bad[0]!r} is not an Inductor option"
                          f"{f' (did you mean {near[0]!r}?)' if near else ''}; see torch._inductor.list_options()")
    _check_with_inductor(None, options, "model.compile_options", "")


def _check_with_inductor(mode: str | None, options: dict | None, knob: str, shown: str) -> None:
    # torch.compile's own Inductor wrapper checks the mode name and each option's type when built.
    wrapper = getattr(torch, "_TorchCompileInductorWrapper", None)
    if wrapper is None or (mode is None and not options):
        return
    try:
        wrapper(mode, options, False)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ConfigError(f"{knob}{shown}: {err}; fix it in the model section") from None


def compile_blocks(model, mode: str | None = None, options: dict | None = None) -> int:
    """`torch.compile` each block in place ("regional"); returns how many were compiled.

    All blocks have the same code and shapes, so Dynamo compiles one graph and reuses it; the
    embeddings, final LayerNorm and lm_head stay eager (the loss is compiled apart, see
    `compiled_shifted_token_losses`).
    """
    check_compile_options(mode, options)
    n = 0
    for block in blocks(model):
        block.compile(dynamic=False, **({"options": dict(options)} if options else {"mode": mode}))
        n += 1
    return n


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def fused_linear_token_losses(model, input_ids: torch.Tensor, real_vocab: int) -> torch.Tensor:
    """Per-token losses (batch, T-1) via Liger's fused linear cross-entropy: hidden states go in,
    the lm_head matmul and the loss happen in vocab chunks, so no (tokens x vocab) tensor exists."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden = model.transformer(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    weight = model.lm_head.weight[:real_vocab]  # padded rows are never candidates
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")
    losses = loss_fn(weight, hidden.flatten(0, 1), targets.flatten())
    return losses.float().view_as(targets)


def shifted_token_losses(logits: torch.Tensor, input_ids: torch.Tensor, real_vocab: int | None = None) -> torch.Tensor:
    """Next-token loss per position, shape (batch, T-1), in fp32, from logits (batch, T, vocab).
    `real_vocab`: logit columns from it on are padding (pad_vocab_to_multiple_of); they get -inf, so
    they take no probability mass and no gradient."""
    targets = input_ids[:, 1:]
    logits = logits[:, :-1].flatten(0, 1).float()
    if real_vocab is not None and real_vocab < logits.shape[-1]:
        # A mask, not a slice: compiled, it fuses into the log-softmax, and the backward writes the
        # padded-width gradient in that same kernel. A slice outside made eager slice_backward zero-fill
        # and copy it instead: 2 kernels over 32 x 1024 x 50304 bf16, ~4 ms of GPT-2 small's 74 ms step (H200).
        padding = torch.arange(logits.shape[-1], device=logits.device) >= real_vocab
        logits = logits.masked_fill(padding, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, targets.flatten(), reduction="none").view_as(targets)


# With `compile`, the loss is a compiled region too: the shift, fp32 upcast, padding mask, log-softmax
# and gather fuse, so neither the fp32 logits nor their log-softmax is written out (each 32 x 1023 x
# 50257 x 4 B = 6.6 GB for GPT-2 small at micro-batch 32). Lazy: nothing compiles until the first call.
compiled_shifted_token_losses = torch.compile(shifted_token_losses)


def apply_perf_options(module) -> None:
    """Apply GPT2Module's perf knobs to its freshly built `module.model` (called once)."""
    hp = module.hparams
    model = module.model
    set_tf32(hp.tf32)
    if hp.fused_cross_entropy and not liger_available():
        raise ConfigError(
            "model.fused_cross_entropy=true needs a CUDA GPU and the liger-kernel package; "
            "`pip install liger-kernel` on the GPU machine, or set model.fused_cross_entropy=false"
        )
    if hp.get("bias_after_matmul"):
        bias_after_matmul(model)
    if hp.activation_checkpointing:
        apply_activation_checkpointing(model)
    if hp.compile:
        options = hp.get("compile_options")
        n = compile_blocks(model, hp.compile_mode, options)
        log.info("torch.compile: %d GPT2Blocks compiled regionally (mode=%s, options=%s)", n, hp.compile_mode, options)
