#!/usr/bin/env python
"""Strategy check: one GPT-2 run per strategy, then resume + export checks. Prints one table.

    bash tools/gpu_check_strategies.sh              # one GPU: GPT-2 Medium shape (355M), seq 1024, bf16
    bash tools/gpu_check_strategies.sh --cpu-smoke  # CPU: tiny model, DDP x2, FSDP2 x2 eager and compiled (CI-sized)
    bash tools/gpu_check_strategies.sh --rows fsdp1,fsdp1+compile,deepspeed_zero2,deepspeed_zero2+compile

A row `NAME+compile` is NAME's overlay plus the presets' speed knobs (`model.compile`, the vocabulary
padded to 128; not padded under ZeRO-3, which cannot resize it): next to NAME in the same call, it
measures what the overlays that turn compile off would gain.

Each row is `gpt2dist fit` in its own subprocess under its own timeout, so one failure leaves
the other rows; the table is printed even when rows fail. Results go under $OUT (or a temp dir).
Data: this Python's standard library sources, with a BPE tokenizer trained on them (offline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]

# fsdp+offload: cpu_offload keeps the shards on the CPU and the module's device on the GPU (validation sums,
# NCCL reductions and the monitor's CUDA syncs follow it): a path the CPU tests cannot tell apart.
GPU_ROWS = ["ddp", "fsdp", "fsdp+offload", "fsdp1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]
CPU_ROWS = ["ddp", "fsdp", "fsdp+compile"]


def row_overlay(name: str) -> tuple[str, list[str]]:
    """A row name -> (its strategy overlay, extra `fit` arguments): `NAME+compile` compiles and pads;
    `fsdp+offload` turns FSDP2's cpu_offload on."""
    strategy, _, knob = name.partition("+")
    if knob not in ("", "compile") and (knob, strategy) != ("offload", "fsdp"):
        raise SystemExit(f"row {name!r}: the row suffixes are '+compile', and '+offload' for fsdp")
    if not (REPO / "configs/strategy" / f"{strategy}.yaml").exists():
        raise SystemExit(f"row {name!r}: no configs/strategy/{strategy}.yaml (rows: {', '.join(GPU_ROWS)})")
    if not knob:
        return strategy, []
    if knob == "offload":
        return strategy, ["--trainer.strategy.init_args.cpu_offload", "true"]
    pad = "1" if strategy.startswith("deepspeed_zero3") else "128"
    return strategy, ["--model.compile", "true", "--model.pad_vocab_to_multiple_of", pad]


class StepStats(pl.Callback):
    """Per-step loss and wall time; tokens/s over the steps after `warmup`; peak GPU memory.
    Rank 0 writes them as JSON to `out_file` at the end of training."""

    def __init__(self, out_file: str, warmup: int = 5):
        """
        Args:
            out_file: JSON file to write.
            warmup: Steps left out of the tokens/s average (compilation, allocator warm-up).
        """
        self.out_file, self.warmup = out_file, warmup
        self.losses: dict[int, float] = {}
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses[trainer.global_step] = float(loss)
        # What gpt2dist's TrainMonitor logged for this step (checked against our own numbers above).
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if k.startswith(("throughput/", "memory/")) or k == "train/grad_norm"}
        self.tokens_per_step = batch["input_ids"].numel() * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        import torch

        if not trainer.is_global_zero:
            return
        # Median step: the checked rows save a sharded checkpoint mid-run, and the last step also
        # generates the sample (see base_config); a mean over the interval would count both.
        t = self.times[self.warmup:-1]
        dt = sorted(b - a for a, b in zip(t, t[1:]))
        tps = self.tokens_per_step / dt[len(dt) // 2] if dt else float("nan")
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        Path(self.out_file).write_text(json.dumps({"losses": self.losses, "tokens_per_s": tps, "peak_gib": peak,
                                                   "final_loss": self.losses[max(self.losses)] if self.losses else None,
                                                   "logged": getattr(self, "logged", {})}))


def base_config(work: Path, cpu: bool, steps: int) -> dict:
    model = ({"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64} if cpu
             else {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257})
    return {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu" if cpu else "gpu", "devices": 2 if cpu else 1,
            "precision": "32-true" if cpu else "bf16-mixed",
            "max_steps": steps, "val_check_interval": steps, "check_val_every_n_epoch": None,
            "gradient_clip_val": 1.0,  # as every preset: clipping is strategy-specific (FSDP1, fused AdamW + bf16-mixed)
            "limit_val_batches": 2, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
        },
        "model": {"model_name_or_path": "gpt2-medium", "from_scratch": True, "config_overrides": model,
                  "dropout": 0.0, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 5},
        "data": {"train_files": ["{stdlib}/[a-c]*.py" if cpu else "{stdlib}/*.py"], "text_unit": "file",
                 "val_fraction": 0.05, "train_tokenizer_vocab_size": 512 if cpu else 8192,
                 "block_size": 32 if cpu else 1024, "batch_size": 2 if cpu else 8, "num_workers": 0 if cpu else 2,
                 "cache_dir": str(work / "cache")},
        "export": {"sample_prompt": None},
        "checkpoint": {"every_n_train_steps": steps // 2, "save_top_k": -1},
        # One greedy sample at the last step: generation under each strategy's sharding (all ranks
        # take part), from the bf16 compute weights on a GPU.
        "samples": {"sample_every_n_steps": steps, "prompts": ["def "], "max_new_tokens": 16},
    }


def run_fit(name: str, strategy: str, work: Path, cfg: dict, timeout: int, extra: list[str]) -> tuple[int, float, Path]:
    import yaml

    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(cfg))
    cfg["trainer"]["default_root_dir"] = str(root)
    cfg["trainer"]["callbacks"] = [{"class_path": "tools.gpu_check_strategies.StepStats",
                                    "init_args": {"out_file": str(root / "stats.json"),
                                                  "warmup": 1 if cfg["trainer"]["accelerator"] == "cpu" else 5}}]
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "gpt2dist", "fit",
           "--config", str(root / "config.yaml"), "--config", str(REPO / "configs/strategy" / f"{strategy}.yaml"), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    with open(root / "log.txt", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return rc, time.time() - t0, root


def stats(root: Path) -> dict | None:
    f = root / "stats.json"
    return json.loads(f.read_text()) if f.exists() else None


def first_sample(root: Path) -> str:
    """The text of the first greedy sample the run wrote, on one line ("-" when none)."""
    files = sorted(root.rglob("samples.txt"))
    if not files:
        return "-"
    _, _, rest = files[0].read_text(errors="replace").partition("\n")  # a one-line file: no sample text yet
    text = rest.split("\n\n=== step")[0].strip("\n")
    return repr(text[:40]).replace("|", "/")  # a table cell


def logits_diff(a: Path, b: Path) -> float:
    import torch
    from transformers import GPT2LMHeadModel

    ma, mb = (GPT2LMHeadModel.from_pretrained(str(p)).eval() for p in (a, b))
    x = torch.arange(64).view(2, 32) % ma.config.vocab_size  # a fixed batch
    with torch.no_grad():
        return float((ma(x).logits - mb(x).logits).abs().max())


def resume_and_export(name: str, strategy: str, work: Path, cfg: dict, steps: int, timeout: int) -> list[str]:
    """Resume `name`'s mid-run checkpoint for 2 steps (losses vs the uninterrupted run), and export
    its final checkpoint with tools/export_hf.py (logits vs the end-of-fit export of the live model)."""
    lines = []
    first = work / name
    full = stats(first)
    mid = steps // 2
    ckpt = first / "checkpoints" / f"step{mid:07d}.ckpt"
    if full is None or not ckpt.exists():
        return [f"{name}: resume/export SKIPPED (the row did not finish or saved no checkpoint {ckpt.name})"]
    c2 = json.loads(json.dumps(cfg))
    c2["trainer"]["max_steps"] = mid + 2
    c2["checkpoint"] = {"every_n_train_steps": 0, "save_last": False}
    c2["export"]["enabled"] = False
    rc, secs, root = run_fit(f"{name}_resume", strategy, work, c2, timeout, ["--ckpt_path", str(ckpt)])
    res = stats(root)
    if rc == 0 and res:
        steps_cmp = sorted(int(k) for k in res["losses"])
        diffs = [abs(res["losses"][str(k)] - full["losses"][str(k)]) for k in steps_cmp if str(k) in full["losses"]]
        ok = steps_cmp and steps_cmp[0] == mid + 1 and diffs and max(diffs) < (1e-5 if "cpu" in str(cfg["trainer"]["accelerator"]) else 2e-2)
        lines.append(f"{name}: resume from step {mid}: steps {steps_cmp}, max |loss - uninterrupted| = "
                     f"{max(diffs) if diffs else float('nan'):.2e} -> {'PASS' if ok else 'FAIL'} ({secs:.0f}s)")
    else:
        lines.append(f"{name}: resume FAILED rc={rc} (see {root / 'log.txt'})")
    last = first / "checkpoints" / f"step{steps:07d}.ckpt"
    out = work / f"{name}_export"
    t0 = time.time()
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(last), str(out)], capture_output=True, text=True,
                       timeout=timeout,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    if p.returncode == 0 and (first / "hf_model").exists():
        d = logits_diff(out, first / "hf_model")
        lines.append(f"{name}: tools/export_hf.py {last.name} ({'folder' if last.is_dir() else 'file'}): max |logits - end-of-fit export| = "
                     f"{d:.2e} -> {'PASS' if d < 1e-4 else 'FAIL'} ({time.time() - t0:.0f}s)")
    else:
        lines.append(f"{name}: export FAILED rc={p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:200]}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, DDP x2 and FSDP2 x2 (eager and compiled) on CPU")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rows", default=None, help="comma-separated overlay names, each optionally +compile (default: all for the mode)")
    ap.add_argument("--row-timeout", type=int, default=None, help="seconds per row")
    args = ap.parse_args()
    cpu = args.cpu_smoke
    steps = args.steps or (6 if cpu else 20)
    if steps < 2 or steps % 2:  # checkpoints every steps/2; the resume starts halfway, the export reads the last
        ap.error(f"--steps {steps}: give an even number >= 2")
    row_timeout = args.row_timeout or (240 if cpu else 75)
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)  # made before the rows: a missing $OUT lost every result at the end
    # Checkpoints of a 355M model are ~4 GB each: keep them out of $OUT (only the table goes back).
    work = Path(tempfile.mkdtemp(prefix="gpu_check_strategies_"))
    cfg = base_config(work, cpu, steps)
    rows = args.rows.split(",") if args.rows else (CPU_ROWS if cpu else GPU_ROWS)
    for name in rows:  # a typo stops the script before any row runs
        row_overlay(name)
    device = "cpu (2 processes)"
    if not cpu:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU found"
    results = []
    checked = {"fsdp"} if cpu else {"deepspeed_zero3", "fsdp1"}  # rows whose checkpoints are resumed/exported
    for name in rows:
        row_cfg = cfg
        if name not in checked:  # no checkpoints or export: time and disk go to the rows that need them
            row_cfg = json.loads(json.dumps(cfg))
            row_cfg["checkpoint"] = {"save_top_k": 0, "save_last": False}
            row_cfg["export"]["enabled"] = False
        # Rows that also write sharded checkpoints get twice the time (fsdp1 hit 55 s while saving on the H100).
        strategy, extra = row_overlay(name)
        rc, secs, root = run_fit(name, strategy, work, row_cfg, row_timeout * (2 if name in checked else 1), extra)
        s = stats(root)
        status = "ok" if rc == 0 and s else ("TIMEOUT" if rc in (124, 137) else f"FAIL rc={rc}")
        if status != "ok":
            tail = (root / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
            print(f"--- {name} {status}:\n" + "\n".join(tail), flush=True)
        results.append((name, status, s, secs))
        compiled = "GPT2Blocks compiled regionally" in (root / "log.txt").read_text(errors="replace")
        print(f"{name}: {status} in {secs:.0f}s{', blocks compiled' if compiled else ''}", flush=True)
    checks = []
    for name, strategy in ([("fsdp", "fsdp")] if cpu else [("deepspeed_zero3", "deepspeed_zero3"), ("fsdp1", "fsdp1")]):
        if name in rows:
            checks += resume_and_export(name, strategy, work, cfg, steps, row_timeout)
    model = "tiny 2x64" if cpu else "GPT-2 Medium shape (24x1024, 355M params, vocab 50257)"
    seq, bs = cfg["data"]["block_size"], cfg["data"]["batch_size"]
    print(f"\n## strategies on {device}: {model}, seq {seq}, batch {bs}/device, {cfg['trainer']['precision']}, {steps} steps\n")
    print("| strategy | status | final loss | tokens/s | peak GPU mem (GiB) | wall (s) | greedy sample at the last step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, status, s, secs in results:
        sample = first_sample(work / name)
        if s:
            loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"  # stats, but no loss logged
            print(f"| {name} | {status} | {loss} | {s['tokens_per_s']:,.0f} | {s['peak_gib']:.2f} | {secs:.0f} | {sample} |")
        else:
            print(f"| {name} | {status} | - | - | - | {secs:.0f} | {sample} |")
    print("\n### what TrainMonitor logged at the last step (MFU needs a known GPU; CPU shows none)\n")
    keys = ["throughput/tokens_per_sec", "throughput/mfu", "memory/peak_allocated_gib", "memory/peak_reserved_gib",
            "train/grad_norm"]
    print("| strategy | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name, status, s, secs in results:
        logged = (s or {}).get("logged", {})
        print(f"| {name} | " + " | ".join(f"{logged[k]:,.4g}" if k in logged else "-" for k in keys) + " |")
    print()
    for line in checks:
        print(line)
    with open(out / "strategies_logs.txt", "w") as f:  # one file back, the tail of every row's log
        for log in sorted(work.glob("*/log.txt")):
            f.write(f"===== {log.parent.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]) + "\n")
    (out / "strategies_table.txt").write_text(json.dumps([(n, st, s, secs) for n, st, s, secs in results]) + "\n" + "\n".join(checks))
    failed = [r for r in results if r[1] != "ok"] + [c for c in checks if "PASS" not in c]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
