"""Throughput and MFU arithmetic: pure functions, no Lightning (unit-tested with known numbers).

Model FLOPs per token (PaLM appendix B; the nanoGPT/Chinchilla convention):

    flops_per_token = 6 * N + 12 * L * d * T

- 6N: forward (2 FLOPs per weight per token: one multiply, one add) + backward (2x forward).
- N counts every weight used in a matmul: the transformer blocks, the final LayerNorm and the
  token embedding `wte`, because GPT-2 ties it to the LM head (a d x V matmul per token).
  N EXCLUDES the position embedding `wpe` (a table lookup, no FLOPs). Biases and LayerNorms are
  included (they are < 0.1% of N and not worth a second convention).
- 12·L·d·T: attention scores QK^T and the weighted sum AV, 2·T·d FLOPs each per token per
  layer forward, x3 for forward + backward; T is the full block length (no causal discount).

MFU = achieved model FLOP/s per device / the device's peak dense bf16 FLOP/s. It counts the
tokens actually processed per device (every micro-batch of an accumulation window) over the
wall time they took, so it is the same number whatever the world size or accumulation.
"""

from __future__ import annotations

import re

# Peak DENSE bf16 tensor FLOP/s per GPU, from NVIDIA's datasheets (sparsity numbers halved).
# Matched in order against torch.cuda.get_device_name(), lower-cased. Lightning's own table
# (lightning.fabric.utilities.throughput) lists H200 and H100 NVL at their *sparse* 2 PFLOP/s
# and does not recognise the plain name "NVIDIA H200", which would halve MFU or drop it.
# An H100 whose name says neither SXM/HBM3, PCIe nor NVL is ambiguous (756 vs 989 TFLOP/s):
# no MFU rather than a wrong one; set `monitor.peak_tflops` for it.
PEAK_BF16_FLOPS: list[tuple[str, str, float]] = [
    # (regex on the lower-cased device name, label, dense bf16 FLOP/s)
    (r"gh200", "GH200", 989.4e12),
    (r"h200.*nvl", "H200 NVL", 835.5e12),
    (r"h200", "H200 SXM", 989.4e12),
    (r"h100.*nvl", "H100 NVL", 835.5e12),
    (r"h100.*pcie", "H100 PCIe", 756.0e12),
    (r"h100.*(sxm|hbm3)", "H100 SXM", 989.4e12),
    (r"\ba100(?!\d)", "A100", 312.0e12),  # SXM and PCIe have the same tensor peak; not an RTX A1000
    (r"l40s", "L40S", 362.05e12),
    (r"\bl40\b", "L40", 181.05e12),
    (r"\bl4\b", "L4", 121.0e12),
    (r"\ba40\b", "A40", 149.7e12),
    (r"\ba10\b", "A10", 125.0e12),
]


def is_mig_slice(device_name: str) -> bool:
    """A MIG partition of a GPU: "NVIDIA H100 80GB HBM3 MIG 1g.10gb"."""
    return re.search(r"\bmig\b", device_name.lower()) is not None


def peak_bf16_flops(device_name: str | None) -> tuple[str, float] | None:
    """(label, peak dense bf16 FLOP/s) for a CUDA device name, or None when it is not in the table."""
    if not device_name:
        return None
    name = device_name.lower()
    if is_mig_slice(name):  # a fraction of the GPU's peak, which the name does not say
        return None
    for pattern, label, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, name):
            return label, flops
    return None


def gpt2_block_params(n_embd: int, n_inner: int | None = None) -> int:
    """One GPT2Block: ln_1 (2d) + c_attn (3d^2 + 3d) + attn c_proj (d^2 + d) + ln_2 (2d)
    + c_fc (d*f + f) + mlp c_proj (f*d + d), with f = n_inner or 4d (12d^2 + 13d when f = 4d)."""
    d, f = n_embd, n_inner or 4 * n_embd
    return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)


def gpt2_param_count(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_inner: int | None = None) -> dict:
    """Parameter counts of a (tied) GPT2LMHeadModel, from its config alone.

    Computed from the config, not from `module.parameters()`: under FSDP/ZeRO-3 each rank only
    holds a shard, and counting local tensors would make N (and MFU) world-size dependent.
    """
    d = n_embd
    wte, wpe = vocab_size * d, n_positions * d
    total = wte + wpe + n_layer * gpt2_block_params(d, n_inner) + 2 * d  # + ln_f
    return {"total": total, "wte": wte, "wpe": wpe, "flops_n": total - wpe}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """Model FLOPs per trained token: 6N + 12·L·d·T (N without the position embedding; see module doc)."""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def gpt2_flops_per_token(config, seq_len: int, vocab_size: int | None = None) -> int:
    """`flops_per_token` for a transformers GPT2Config trained on blocks of `seq_len` tokens. The
    vocabulary is the real one (`vocab_size`, else the config's `unpadded_vocab_size` that
    `pad_vocab` sets): rows padded for tensor cores do no useful work and must not inflate MFU."""
    vocab = vocab_size or getattr(config, "unpadded_vocab_size", None) or config.vocab_size
    counts = gpt2_param_count(vocab, config.n_positions, config.n_embd, config.n_layer,
                              getattr(config, "n_inner", None))
    return flops_per_token(counts["flops_n"], config.n_layer, config.n_embd, seq_len)


def throughput(tokens_per_device: int, seconds: float, world_size: int, flops_per_tok: int | None = None,
               peak_flops: float | None = None) -> dict[str, float]:
    """Tokens/s per device and for the job, and MFU (only when the peak is known).

    `tokens_per_device` are the tokens ONE rank processed in `seconds` (all its micro-batches,
    accumulation included). Every rank processes the same number of tokens per optimizer step
    (BlockSampler gives each rank equal full batches) and the gradient all-reduce keeps the ranks
    in step, so the job's rate is world_size times a rank's rate.
    """
    if seconds <= 0:
        raise ValueError(f"seconds={seconds} must be > 0")
    per_device = tokens_per_device / seconds
    out = {"tokens_per_sec_per_device": per_device, "tokens_per_sec": per_device * world_size}
    if flops_per_tok and peak_flops:
        out["mfu"] = per_device * flops_per_tok / peak_flops
    return out
