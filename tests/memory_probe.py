"""Peak memory of one GPT2Module training step on CPU, per micro-batch: checks the planner's
activation arithmetic with the real model (tests/test_planner.py runs it as a subprocess).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/memory_probe.py '{"n_layer": 2, ...}' compiled,eager,ckpt 1,2

`states` mode: the whole step's peak (weights, gradients, AdamW moments, activations) under bf16
autocast, eager, one micro-batch per step and two accumulated, for the planner's model states and
its choice of peak (gradients at the activation peak or not). Under `torch.distributed.run` (gloo),
also DDP and FSDP2 (gpt2dist.strategies.shard_fsdp2). Rank 0 prints one JSON object:
{strategy: {accumulate: peak bytes}}.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/memory_probe.py states '{"n_layer": 4, ...}' single 8 128
    MALLOC_MMAP_THRESHOLD_=65536 python -m torch.distributed.run --nproc_per_node 2 tests/memory_probe.py \
        states '{"n_layer": 4, ...}' ddp,fsdp2 8 128

Modes: compiled, eager, ckpt (compiled + activation checkpointing) under bf16 autocast over fp32
weights (bf16-mixed); with a `-bf16true` suffix, bf16 weights and no autocast (bf16-true, and
what DeepSpeed's bf16 runs).

Why this measures what a CUDA allocator would: with glibc's mmap threshold pinned at 64 KiB
(the environment variable must be set before the process starts), every tensor of note is its
own mmap, unmapped when freed, so resident memory follows the live tensors. Linux's VmHWM (reset
through /proc/self/clear_refs) then gives the step's peak, transients included. Model states
(weights, grads, bf16 weight copies) are the same for every micro-batch, so the growth per extra
sequence is the activation memory per sequence. Prints one JSON object: {mode: {b: peak bytes}}.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def peak_step_bytes(overrides: dict, mode: str, batch: int, seq: int, pad: int) -> int:
    from gpt2dist.model import GPT2Module

    torch.manual_seed(0)
    module = GPT2Module("gpt2", from_scratch=True, config_overrides=overrides, dropout=0.0,
                        compile=not mode.startswith("eager"), activation_checkpointing=mode.startswith("ckpt"),
                        pad_vocab_to_multiple_of=pad)
    module.configure_model()
    module.train()
    true_bf16 = mode.endswith("bf16true")
    if true_bf16:  # as bf16-true: bf16 weights, no autocast, the residual stream in bf16
        module.to(torch.bfloat16)
    ids = torch.randint(0, overrides["vocab_size"], (batch, seq))

    def step():
        # bf16-mixed: bf16 matmuls under autocast, fp32 weights and residual stream
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not true_bf16):
            loss = module.token_losses(ids).mean()
        loss.backward()

    for _ in range(2):  # compile, first gradient allocation
        step()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()
    return _status("VmHWM") - base


def peak_states_bytes(overrides: dict, strategy: str, batch: int, seq: int, accumulate: int) -> int:
    """Peak bytes of a step's last micro-batch (the earlier ones' gradients kept, as Lightning
    accumulates), above the resident memory before the model was built."""
    import torch.distributed as dist

    from gpt2dist.model import GPT2Module

    torch.manual_seed(0)
    base = _status("VmRSS")
    module = GPT2Module("gpt2", from_scratch=True, config_overrides=overrides, dropout=0.0)
    module.configure_model()
    model = module
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        from gpt2dist.strategies import shard_fsdp2

        shard_fsdp2(module, init_device_mesh("cpu", (dist.get_world_size(),)), "bf16-mixed")
    elif strategy == "ddp":
        # As configs/strategy/ddp.yaml: the gradients are views of the all-reduce buckets.
        model = torch.nn.parallel.DistributedDataParallel(module, gradient_as_bucket_view=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, overrides["vocab_size"], (batch, seq))

    def micro_batch():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, per_token_loss=True).mean()
        loss.backward()

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)  # a plain loop's order; Lightning's: after the next forward (planner.py)

    for _ in range(2):  # AdamW's moments, every lazily built buffer
        for _ in range(accumulate):
            micro_batch()
        optimizer_step()
    for _ in range(accumulate - 1):
        micro_batch()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    micro_batch()
    optimizer_step()
    peak = _status("VmHWM") - base
    del model, module, opt
    return peak


def main_states(argv: list[str]) -> None:
    import os

    import torch.distributed as dist

    overrides, strategies = json.loads(argv[0]), argv[1].split(",")
    batch, seq = int(argv[2]), int(argv[3])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    from gpt2dist.model import GPT2Module  # noqa: F401  (imported before any baseline is taken)

    result = {s: {a: peak_states_bytes(overrides, s, batch, seq, a) for a in (1, 2)} for s in strategies}
    if int(os.environ.get("RANK", "0")) == 0:  # one line: two ranks' prints can interleave mid-line
        print(json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "states":
        return main_states(sys.argv[2:])
    overrides = json.loads(sys.argv[1])
    modes, batches = sys.argv[2].split(","), [int(b) for b in sys.argv[3].split(",")]
    seq = int(sys.argv[4]) if len(sys.argv) > 4 else overrides["n_positions"]
    pad = 128  # as the GPU configs: 50257 -> 50304 rows
    print(json.dumps({m: {b: peak_step_bytes(overrides, m, b, seq, pad) for b in batches} for m in modes}))


if __name__ == "__main__":
    main()
