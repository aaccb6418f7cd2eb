"""Memory planner: per-GPU memory of GPT-2 training for DDP, FSDP2, FSDP1, ZeRO-1/2/3, ZeRO-3 offload.

    python tools/plan.py --model gpt2-large --gpus 8 --gpu-mem-gb 85 --seq 1024          # H100 80GB
    python tools/plan.py --model gpt2-xl --gpus 4 --nodes 2 --gpu-mem-gb 42.4 --micro-batch 4 --json plan.json
    python tools/plan.py --model gpt2 --gpus 1 --gpu-mem-gb 85 --seq 1024 --micro-batch 32   # single GPU
    python tools/plan.py --model gpt2-large --gpus 1 --precision bf16-true     # bf16 weights, fp32 masters
    python tools/plan.py --model gpt2-large --gpus 8 --accumulate 2            # as configs/gpt2-large.yaml
    python tools/plan.py --model gpt2-xl --gpus 8 --gpu-mem-gb 42.4 --compile on # every row compiled

--gpu-mem-gb counts GB of 1e9 bytes, as torch.cuda.get_device_properties(0).total_memory / 1e9 gives
(and the OOM message's plan command passes): a card sold as "80GB" holds 85.0 of them (an H100), one
sold as "40GB" 42.4 (an A100). Its label read as GB plans about 6% short; the plan says so.

The formulas are in gpt2dist/planner.py (module docstring and `estimate`). Each row shows the
model states per GPU, activations for one sequence, the total at --micro-batch with and without
activation checkpointing, and the largest micro-batch that fits in USABLE_FRACTION of the card.
By default each row is planned as the shipped configs run it (PRESETS): a plan that assumed compiled
activations for a ZeRO row, whose overlay turns compile off, recommended micro-batches that do not fit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/outfile.py, also under runpy or an import
from outfile import check_out, write_out  # noqa: E402

from gpt2dist.errors import GPT2DistError  # noqa: E402
from gpt2dist.planner import GB, PRECISIONS, PREFERENCE, STRATEGIES, USABLE_FRACTION, estimate, recommend, shape_from_config  # noqa: E402


# How the shipped configs run each strategy: configs/gpt2-*.yaml compile and pad the vocabulary to a
# multiple of 128; the fsdp1 and deepspeed_* overlays turn compile off, the ZeRO-3 ones the padding too,
# and fsdp1.yaml checkpoints activations. tests/test_planner.py checks this table against the YAML files.
PRESETS = {  # strategy: (overlay in configs/strategy, model.compile, model.pad_vocab_to_multiple_of)
    "DDP": ("ddp.yaml", True, 128),
    "FSDP2": ("fsdp.yaml", True, 128),
    "FSDP1": ("fsdp1.yaml", False, 128),
    "ZeRO-1": ("deepspeed_zero1.yaml", False, 128),
    "ZeRO-2": ("deepspeed_zero2.yaml", False, 128),
    "ZeRO-3": ("deepspeed_zero3.yaml", False, 1),
    "ZeRO-3 offload": ("deepspeed_zero3_offload.yaml", False, 1),
}


def plan(model: str, gpus: int, nodes: int, gpu_mem_gb: float, seq: int, micro_batch: int, pad_vocab: int | None = None,
         compile: str = "presets", min_micro_batch: int = 4, strategies: list[str] | None = None,
         precision: str = "bf16-mixed", accumulate: int = 1, dropout: float | None = None) -> dict:
    """`compile`: presets (each row as its configs/strategy overlay sets model.compile), on or off;
    `pad_vocab`: None for each row's preset padding, else that multiple for every row; `dropout`:
    model.dropout (None: the model config's own, as configs/gpt2-*.yaml leave it)."""
    from gpt2dist.model import build_config

    config = build_config(model, dropout=dropout)
    world = gpus * nodes
    budget = gpu_mem_gb * GB * USABLE_FRACTION
    rows, ests = [], []
    for s in strategies or STRATEGIES:
        overlay, preset_compile, preset_pad = PRESETS[s]
        compiled = preset_compile if compile == "presets" else compile == "on"
        zero3 = s.startswith("ZeRO-3")
        # ZeRO-3 partitions the embedding as it is built: GPT2Module refuses padding there (model.py).
        shape = shape_from_config(config, preset_pad if zero3 else pad_vocab or preset_pad)
        e = estimate(s, shape, world, seq, compiled=compiled, precision=precision, accumulate=accumulate)
        if compile == "presets" and not compiled:
            e.notes.append(f"eager: configs/strategy/{overlay} sets model.compile false (--compile on plans it compiled)")
        if s == "FSDP1":
            e.notes.append("configs/strategy/fsdp1.yaml checkpoints activations by default: read the ckpt columns")
        if zero3 and (pad_vocab or 1) > 1:
            e.notes.append(f"vocabulary unpadded ({shape.vocab} rows): ZeRO-3 refuses --pad-vocab {pad_vocab}")
        ests.append(e)
        rows.append({"strategy": e.strategy, "compiled": compiled, "vocab_rows": shape.vocab,
                     "params_gb": e.params / GB, "grads_gb": e.grads / GB, "optimizer_gb": e.optimizer / GB, "other_gb": e.other / GB, "states_gb": e.states / GB,
                     "other_ckpt_gb": (e.other if e.other_ckpt is None else e.other_ckpt) / GB,
                     "act_per_seq_gb": e.act_per_sample / GB, "act_per_seq_ckpt_gb": e.act_per_sample_ckpt / GB,
                     "total_gb": e.total(micro_batch, False) / GB, "total_ckpt_gb": e.total(micro_batch, True) / GB,
                     "max_micro_batch": e.max_micro_batch(budget, False),
                     "max_micro_batch_ckpt": e.max_micro_batch(budget, True), "cpu_gb": e.cpu / GB, "notes": e.notes})
    rec = recommend(ests, budget, min_micro_batch)
    return {"model": model, "params": shape_from_config(config).params, "vocab": config.vocab_size,
            "vocab_rows": None if pad_vocab is None else shape_from_config(config, pad_vocab).vocab, "world": world, "gpus": gpus,
            "nodes": nodes, "gpu_mem_gb": gpu_mem_gb, "budget_gb": budget / GB, "seq": seq, "micro_batch": micro_batch,
            "precision": precision, "accumulate": accumulate, "dropout": config.resid_pdrop, "rows": rows, "recommendation": rec,
            "min_micro_batch": max(1, min_micro_batch)}


def print_plan(p: dict) -> None:
    rows = "as --pad-vocab sets them" if p["vocab_rows"] else "padded per row as the presets pad"
    print(f"{p['model']}: {p['params'] / 1e6:.1f}M params (vocabulary {p['vocab']}, logit rows {rows}), {p['gpus']} GPU(s) x "
          f"{p['nodes']} node(s) = {p['world']} ranks, {p['gpu_mem_gb']:g} GB/GPU (plan within {p['budget_gb']:.1f} GB), "
          f"seq {p['seq']}, micro-batch {p['micro_batch']} x {p['accumulate']} accumulated, {p['precision']}, "
          f"dropout {p['dropout']:g}; GB = 1e9 bytes")
    print("| strategy | compile | vocab rows | params | grads | optim | other | states | act/seq | act/seq ckpt | "
          f"total b={p['micro_batch']} | total b={p['micro_batch']} ckpt | max b | max b ckpt | CPU/rank |")
    print("|---|---|" + "---:|" * 13)
    for r in p["rows"]:
        print(f"| {r['strategy']} | {'on' if r['compiled'] else 'off'} | {r['vocab_rows']} | {r['params_gb']:.2f} | "
              f"{r['grads_gb']:.2f} | {r['optimizer_gb']:.2f} | "
              f"{r['other_gb']:.2f} | {r['states_gb']:.2f} | {r['act_per_seq_gb']:.2f} | {r['act_per_seq_ckpt_gb']:.2f} | "
              f"{r['total_gb']:.1f} | {r['total_ckpt_gb']:.1f} | {r['max_micro_batch']} | {r['max_micro_batch_ckpt']} | "
              f"{r['cpu_gb']:.1f} |")
    for r in p["rows"]:
        for note in r["notes"]:
            print(f"- {r['strategy']}: {note}")
    rec = p["recommendation"]
    if rec is None:
        print("recommendation: nothing fits even micro-batch 1 with checkpointing: add GPUs/nodes or use a smaller model")
    else:
        name, ckpt, b = rec
        planned = {r["strategy"] for r in p["rows"]}
        order = " > ".join(s for s in PREFERENCE if s in planned)
        if b >= p["min_micro_batch"]:
            why = (f"first of {order} that fits micro-batch {p['min_micro_batch']} (--min-micro-batch), without "
                   "checkpointing if any does; accumulate gradients for a larger global batch")
        else:  # recommend's fallback: nothing reached the minimum
            why = (f"below --min-micro-batch {p['min_micro_batch']}, which no plan reaches: the largest micro-batch "
                   "any plan fits; add GPUs/nodes or accept it with more accumulation")
        print(f"recommendation: {name}{' + activation checkpointing' if ckpt else ''}, micro-batch up to {b} ({why})")


def validate(bench_jsons: list[str]) -> list[dict]:
    """Planner estimate vs the peak memory `tools/bench.py` measured (its gpt2dist row), one GPU.

    The estimate uses the bench run's own shape, micro-batch, sequence, vocab padding, precision,
    compile (fused GELU and loss), Liger fused cross-entropy and activation checkpointing; the
    comparison is with CUDA peak allocated.
    """
    from gpt2dist.model import build_config

    rows = []
    for path in bench_jsons:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            rows.append({"bench": path, "error": f"no bench result ({type(e).__name__})"})
            continue
        try:
            m, seq, micro_batch, bench_rows = r["model"], int(r["seq"]), int(r["micro_batch"]), list(r["rows"])
            config = build_config(m.get("model_name_or_path", "gpt2"), m.get("config_overrides"), m.get("dropout"))
        except (KeyError, TypeError, AttributeError, ValueError, GPT2DistError) as e:
            rows.append({"bench": path, "error": f"not a tools/bench.py --out result ({type(e).__name__}: {e})"})
            continue
        shape = shape_from_config(config, int(m.get("pad_vocab_to_multiple_of") or 1))  # null: unpadded
        precision = str(r.get("precision", "bf16-mixed"))
        if precision not in PRECISIONS:
            rows.append({"bench": path, "error": f"precision {precision}: the planner covers {' and '.join(PRECISIONS)}"})
            continue
        e = estimate("DDP", shape, 1, seq, compiled=bool(m.get("compile")), fused_ce=bool(m.get("fused_cross_entropy")),
                     precision=precision)  # bench.py steps the optimizer every micro-batch: accumulate=1
        ckpt = bool(m.get("activation_checkpointing"))
        est = e.total(micro_batch, ckpt) / GB
        ours = next((x for x in bench_rows if isinstance(x, dict) and x.get("run") == "gpt2dist" and "error" not in x), None)
        # CPU rows report process RSS, not comparable with the estimate.
        measured = ours["peak_alloc_gib"] * 2**30 / GB if ours and not str(r.get("device", "CPU")).startswith("CPU") else None
        rows.append({"bench": path, "model": m.get("model_name_or_path"), "micro_batch": micro_batch, "seq": seq,
                     "precision": precision, "compile": bool(m.get("compile")), "ckpt": ckpt, "estimate_gb": est, "measured_gb": measured,
                     "error_pct": None if measured is None else 100 * (est - measured) / measured})
    print("| config | b x seq | precision | compile | act ckpt | plan estimate GB | measured peak alloc GB | error |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for x in rows:
        if "error" in x:
            print(f"| {x['bench']} | {x['error']} | | | | | | |")
            continue
        meas = f"{x['measured_gb']:.2f}" if x["measured_gb"] is not None else "n/a (no CUDA)"
        err = f"{x['error_pct']:+.1f}%" if x["error_pct"] is not None else "-"
        print(f"| {x['model']} | {x['micro_batch']} x {x['seq']} | {x['precision']} | {x['compile']} | {x['ckpt']} | {x['estimate_gb']:.2f} | "
              f"{meas} | {err} |")
    return rows


# Data-centre cards' labels in GB -> about their total_memory / 1e9: A100 40GB, A100/H100 80GB, H200 141GB.
CARD_LABELS = {40: 42.4, 80: 85.0, 141: 150.0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-large", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local folder")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-mem-gb", type=float, default=85.0,
                    help="memory per GPU in GB of 1e9 bytes (total_memory / 1e9): 85 for an H100 80GB, 42.4 for "
                         "an A100 40GB, 150 for an H200 141GB")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8, help="micro-batch for the total columns")
    ap.add_argument("--accumulate", type=int, default=1,
                    help="trainer.accumulate_grad_batches: above 1 the gradients stay through every micro-batch's activation peak")
    ap.add_argument("--min-micro-batch", type=int, default=4, help="smallest micro-batch the recommendation accepts")
    ap.add_argument("--pad-vocab", type=int, default=None,
                    help="model.pad_vocab_to_multiple_of for every row (default: as the presets, 128, and 1 for ZeRO-3)")
    ap.add_argument("--compile", choices=["presets", "on", "off"], default="presets",
                    help="model.compile per row: presets (as each configs/strategy overlay sets it: off for FSDP1 and ZeRO), "
                         "on, or off (eager GELU and loss keep more activations: 60 vs 36 B/token/width per layer, "
                         "12 vs 4 B/token/vocab row)")
    ap.add_argument("--eager", action="store_const", const="off", dest="compile", help="the same as --compile off")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed",
                    help="trainer.precision: bf16-true keeps bf16 weights (+ fp32 masters under DDP) and a bf16 residual stream")
    ap.add_argument("--dropout", type=float, default=None,
                    help="model.dropout of the run (default: the model config's, 0.1 for the hub's GPT-2s, as "
                         "configs/gpt2-*.yaml train; configs/perf/* set 0): above 0, two dropout masks per block")
    ap.add_argument("--strategy", action="append", choices=["DDP", *[s for s in STRATEGIES if s != "DDP"]],
                    help="only these rows (repeatable)")
    ap.add_argument("--json", help="also write the plan as JSON here")
    ap.add_argument("--validate", nargs="+", metavar="BENCH_JSON",
                    help="instead: compare the estimate with peak memory measured by tools/bench.py --out")
    args = ap.parse_args(argv)
    check_out(args.json, "plan", "--json")
    if args.validate:
        rows = validate(args.validate)
        write_json(args.json, rows)
        return {"validation": rows}
    for name in ("gpus", "nodes", "seq", "micro_batch", "accumulate", "min_micro_batch", "pad_vocab"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            sys.exit(f"plan: error: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        sys.exit(f"plan: error: --dropout={args.dropout} must be in [0, 1), as model.dropout")
    if not (math.isfinite(args.gpu_mem_gb) and args.gpu_mem_gb > 0):
        sys.exit(f"plan: error: --gpu-mem-gb={args.gpu_mem_gb} must be a positive number of GB (e.g. 85 for an H100 80GB)")
    from gpt2dist.model import build_config

    try:
        n_positions = build_config(args.model).n_positions
    except (GPT2DistError, OSError) as e:
        sys.exit(f"plan: error: --model {args.model}: {str(e).splitlines()[0]}")
    if args.seq > n_positions:  # training refuses data.block_size above it
        sys.exit(f"plan: error: --seq {args.seq} exceeds {args.model}'s n_positions={n_positions}; "
                 f"plan --seq {n_positions} or less")
    p = plan(args.model, args.gpus, args.nodes, args.gpu_mem_gb, args.seq, args.micro_batch, args.pad_vocab,
             args.compile, args.min_micro_batch, args.strategy, args.precision, args.accumulate, args.dropout)
    print_plan(p)
    if args.gpu_mem_gb in CARD_LABELS:
        # A card's label is GiB-ish (an H100 "80GB" holds 85.0e9 bytes): read as 1e9 bytes it plans short.
        print(f"note: --gpu-mem-gb {args.gpu_mem_gb:g} is {args.gpu_mem_gb:g}e9 bytes; a card sold as "
              f"{args.gpu_mem_gb:g}GB holds about {CARD_LABELS[args.gpu_mem_gb]:g}e9 (total_memory / 1e9): pass "
              f"--gpu-mem-gb {CARD_LABELS[args.gpu_mem_gb]:g} to plan its whole memory")
    write_json(args.json, p)
    return p


def write_json(path: str | None, obj) -> None:
    if path:
        write_out(path, json.dumps(obj, indent=1), "plan", "--json")


if __name__ == "__main__":
    main()
