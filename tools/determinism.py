"""Is plain CPU training bitwise the same in every fresh process? Counts the processes that part.

    python tools/determinism.py                          # 120 processes, 2 at a time, torch's default threads
    python tools/determinism.py --processes 240 --threads 1 --parallel 2
    python tools/determinism.py --processes 20 --threads 2,1     # alternate: does the thread count matter?

No Lightning and no gpt2dist: each process trains Hugging Face's GPT-2 (the tests' tiny shape:
2 layers, 64 wide, dropout 0.1) with torch's fused AdamW, the kernel `GPT2Module` steps on CPU (one
group, no clipping: which tensors decay changes the numbers, not whether they repeat), for `--steps`
steps of 2 micro-batches from the same seed and data, and prints a digest of the weights after each step. The most common sequence of digests is the reference; the table lists
each other outcome, the step where it parted, and how far its final weights are off. This is the
tool behind README.md's "What is exact": a resume test that is not bitwise can be this, not resume.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def train(steps: int, out: Path) -> None:
    """One process's run: prints one weights digest per optimizer step, saves the final weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.use_deterministic_algorithms(True)  # as trainer.deterministic: true
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=1000,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    # steps x 2 micro-batches x 2 sequences x 32 tokens: 128 tokens per optimizer step
    data = torch.randint(0, config.vocab_size, (steps, 2, 2, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    digests = []
    for step in range(steps):
        for x in data[step]:  # 2 micro-batches of 2 x 32 tokens, accumulated
            (model(input_ids=x, labels=x).loss / 2).backward()
        opt.step()
        opt.zero_grad()
        digests.append(hashlib.md5(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:8])
    torch.save({n: p.detach() for n, p in model.named_parameters()}, out)
    print(torch.get_num_threads(), *digests)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=120, help="fresh processes to run")
    ap.add_argument("--parallel", type=int, default=2, help="processes at a time (load on the machine)")
    ap.add_argument("--threads", default="", help="OMP_NUM_THREADS per process, or a list the processes cycle "
                    "through (2,1); default: torch's")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per process")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return train(args.steps, args.child)

    threads = [t.strip() for t in args.threads.split(",") if t.strip()]
    if min(args.processes, args.parallel, args.steps) < 1 or not all(t.isdigit() and int(t) > 0 for t in threads):
        sys.exit(f"determinism.py: --processes, --parallel and --steps must be >= 1 and --threads positive integers "
                 f"(got {args.processes}, {args.parallel}, {args.steps}, {args.threads!r}); fix the flag")
    with tempfile.TemporaryDirectory() as tmp:
        def one(i: int) -> tuple[int, tuple[str, ...]]:
            env = {**os.environ, "OMP_NUM_THREADS": threads[i % len(threads)]} if threads else None
            cmd = [sys.executable, __file__, "--child", f"{tmp}/{i}.pt", "--steps", str(args.steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:  # one line naming the process and its last error, not a pool traceback
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise SystemExit(f"determinism.py: process {i} failed (exit {proc.returncode}): {last}")
            return i, tuple(proc.stdout.split())

        with ThreadPoolExecutor(args.parallel) as pool:
            runs = dict(pool.map(one, range(args.processes)))
        import torch

        # An outcome is the per-step digests; the thread count is how a process ran, not what it computed
        # (as part of the key, --threads 2,1 reported equal weights as parted).
        outcome_of = {i: r[1:] for i, r in runs.items()}
        counts = Counter(outcome_of.values())
        reference = counts.most_common(1)[0][0]

        def first(outcome) -> int:
            return next(i for i, o in outcome_of.items() if o == outcome)

        def threads_of(outcome) -> str:
            return ",".join(sorted({runs[i][0] for i, o in outcome_of.items() if o == outcome}, key=int))

        ref_weights = torch.load(f"{tmp}/{first(reference)}.pt", weights_only=True)
        print(f"{args.processes} fresh processes, {args.parallel} at a time, "
              f"{args.steps} steps; torch {torch.__version__}, {os.cpu_count()} CPUs")
        print("| outcome | processes | parted at step | tensors off | max diff (tensor) |")
        print("| --- | ---: | ---: | ---: | --- |")
        print(f"| reference ({threads_of(reference)} threads) | {counts[reference]} | - | 0 of {len(ref_weights)} | 0 |")
        for k, (outcome, n) in enumerate(c for c in counts.most_common() if c[0] != reference):
            weights = torch.load(f"{tmp}/{first(outcome)}.pt", weights_only=True)
            diffs = {name: (weights[name].double() - w.double()).abs().max().item() for name, w in ref_weights.items()}
            worst = max(diffs, key=diffs.get)
            step = next((s + 1 for s, (a, b) in enumerate(zip(outcome, reference)) if a != b), "-")
            print(f"| other {k + 1} ({threads_of(outcome)} threads) | {n} | {step} | {sum(d > 0 for d in diffs.values())} of "
                  f"{len(diffs)} | {diffs[worst]:.3g} ({worst}) |")
        print(f"parted: {args.processes - counts[reference]} of {args.processes}")


if __name__ == "__main__":
    main()
