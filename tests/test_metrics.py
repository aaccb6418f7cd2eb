"""gpt2dist/metrics.py: FLOPs per token, the peak table and MFU, against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2dist.metrics import flops_per_token, gpt2_flops_per_token, gpt2_param_count, peak_bf16_flops, throughput

# GPT-2 124M: V=50257, T=n_positions=1024, d=768, L=12.
#   wte = 50257*768 = 38,597,376; wpe = 1024*768 = 786,432
#   block = 12d^2 + 13d = 7,077,888 + 9,984 = 7,087,872; x12 = 85,054,464; ln_f = 1,536
#   total = 124,439,808 (the published count); N (no wpe) = 123,653,376
#   6N = 741,920,256; 12*L*d*T = 12*12*768*1024 = 113,246,208; sum = 855,166,464 FLOPs/token
GPT2_TOTAL, GPT2_N, GPT2_FLOPS = 124_439_808, 123_653_376, 855_166_464


def test_gpt2_param_count_matches_the_real_model():
    counts = gpt2_param_count(50257, 1024, 768, 12)
    assert counts["total"] == GPT2_TOTAL and counts["flops_n"] == GPT2_N
    with torch.device("meta"):  # no memory: shapes only
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12))
    unique = {id(p): p.numel() for p in model.parameters()}  # wte and lm_head are tied: count once
    assert sum(unique.values()) == GPT2_TOTAL


def test_flops_per_token_hand_computed():
    assert flops_per_token(GPT2_N, 12, 768, 1024) == GPT2_FLOPS
    assert gpt2_flops_per_token(GPT2Config(), 1024) == GPT2_FLOPS
    # A vocabulary padded to 50304 for tensor cores does no useful work: the real 50257 counts,
    # given explicitly or read from the `unpadded_vocab_size` that pad_vocab leaves in the config.
    padded = GPT2Config(vocab_size=50304)
    assert gpt2_flops_per_token(padded, 1024) == GPT2_FLOPS + 6 * 47 * 768
    assert gpt2_flops_per_token(padded, 1024, 50257) == GPT2_FLOPS
    padded.unpadded_vocab_size = 50257
    assert gpt2_flops_per_token(padded, 1024) == GPT2_FLOPS
    # n_inner changes the MLP width: GPT2Config(n_inner=1536) halves the MLP (2*d*f fewer per block).
    small = gpt2_param_count(50257, 1024, 768, 12, n_inner=1536)["flops_n"]
    assert GPT2_N - small == 12 * (2 * 768 * (3072 - 1536) + (3072 - 1536))


def test_mfu_hand_computed_h100_with_accumulation_and_8_gpus():
    # 8x H100 SXM, micro-batch 16 x 1024 tokens, 4 accumulation steps, 1.0 s per optimizer step.
    # Tokens per device per step = 16*1024*4 = 65,536 -> 65,536 tok/s/device, 524,288 tok/s job.
    # MFU = 65,536 * 855,166,464 / 989.4e12 = 5.6044e13 / 9.894e14 = 0.056645...
    label, peak = peak_bf16_flops("NVIDIA H100 80GB HBM3")
    assert label == "H100 SXM" and peak == 989.4e12
    r = throughput(16 * 1024 * 4, 1.0, 8, GPT2_FLOPS, peak)
    assert r["tokens_per_sec_per_device"] == 65_536 and r["tokens_per_sec"] == 524_288
    assert r["mfu"] == pytest.approx(0.0566447, rel=1e-5)
    # nanoGPT's bug class: counting one micro-batch per step under-reports by the accumulation factor.
    assert throughput(16 * 1024, 1.0, 8, GPT2_FLOPS, peak)["mfu"] == pytest.approx(r["mfu"] / 4)


def test_mfu_is_the_same_for_any_split_of_the_same_global_batch():
    # 512 sequences x 1024 per step at the same per-device speed: 1 GPU x 32 accum, 8 x 4, 64 x 0.5.
    per_device_rate = 40_000.0
    mfus = []
    for world, tokens_per_device in [(1, 512 * 1024), (8, 64 * 1024), (64, 8 * 1024)]:
        seconds = tokens_per_device / per_device_rate
        r = throughput(tokens_per_device, seconds, world, GPT2_FLOPS, 312e12)
        assert r["tokens_per_sec"] == pytest.approx(per_device_rate * world)
        mfus.append(r["mfu"])
    assert mfus == pytest.approx([40_000 * GPT2_FLOPS / 312e12] * 3)


@pytest.mark.parametrize("name,label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A100X", "A100"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"), ("NVIDIA A10", "A10"),
])
def test_peak_table_names(name, label):
    assert peak_bf16_flops(name)[0] == label


@pytest.mark.parametrize("name", [None, "", "cpu", "NVIDIA H100", "Tesla V100-SXM2-16GB", "NVIDIA A10G",
                                  "NVIDIA GeForce RTX 4090", "NVIDIA RTX A1000", "NVIDIA RTX A1000 Laptop GPU",
                                  "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA A100-SXM4-40GB MIG 3g.20gb"])
def test_unknown_or_ambiguous_devices_give_no_peak(name):
    assert peak_bf16_flops(name) is None  # no MFU rather than a wrong one


def test_no_peak_means_no_mfu():
    assert "mfu" not in throughput(1000, 1.0, 2, GPT2_FLOPS, None)
    with pytest.raises(ValueError):
        throughput(1000, 0.0, 1)
