"""Memory planner: per-GPU memory of GPT-2 training for DDP, FSDP2, FSDP1, ZeRO-1/2/3, ZeRO-3 offload.

    python tools/plan.py --model gpt2-large --gpus 8 --gpu-mem-gb 80 --seq 1024
    python tools/plan.py --model gpt2-xl --gpus 4 --nodes 2 --gpu-mem-gb 40 --micro-batch 4 --json plan.json
    python tools/plan.py --model gpt2 --gpus 1 --gpu-mem-gb 80 --seq 1024 --micro-batch 32   # single GPU
    python tools/plan.py --model gpt2-large --gpus 1 --precision bf16-true     # bf16 weights, fp32 masters
    python tools/plan.py --model gpt2-large --gpus 8 --accumulate 2            # as configs/gpt2-large.yaml

The formulas are in gpt2dist/planner.py (module docstring and `estimate`). Each row shows the
model states per GPU, activations for one sequence, the total at --micro-batch with and without
activation checkpointing, and the largest micro-batch that fits in USABLE_FRACTION of the card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2dist.planner import GB, PRECISIONS, STRATEGIES, USABLE_FRACTION, estimate, recommend, shape_from_config  # noqa: E402


def plan(model: str, gpus: int, nodes: int, gpu_mem_gb: float, seq: int, micro_batch: int, pad_vocab: int = 1,
         eager: bool = False, min_micro_batch: int = 4, strategies: list[str] | None = None,
         precision: str = "bf16-mixed", accumulate: int = 1) -> dict:
    from gpt2dist.model import build_config

    config = build_config(model)
    shape = shape_from_config(config, pad_vocab)
    world = gpus * nodes
    budget = gpu_mem_gb * GB * USABLE_FRACTION
    rows = []
    ests = [estimate(s, shape, world, seq, compiled=not eager, precision=precision, accumulate=accumulate)
            for s in (strategies or STRATEGIES)]
    for e in ests:
        rows.append({"strategy": e.strategy, "params_gb": e.params / GB, "grads_gb": e.grads / GB,
                     "optimizer_gb": e.optimizer / GB, "other_gb": e.other / GB, "states_gb": e.states / GB,
                     "other_ckpt_gb": (e.other if e.other_ckpt is None else e.other_ckpt) / GB,
                     "act_per_seq_gb": e.act_per_sample / GB, "act_per_seq_ckpt_gb": e.act_per_sample_ckpt / GB,
                     "total_gb": e.total(micro_batch, False) / GB, "total_ckpt_gb": e.total(micro_batch, True) / GB,
                     "max_micro_batch": e.max_micro_batch(budget, False),
                     "max_micro_batch_ckpt": e.max_micro_batch(budget, True), "cpu_gb": e.cpu / GB, "notes": e.notes})
    rec = recommend(ests, budget, min_micro_batch)
    return {"model": model, "params": shape.params, "vocab_rows": shape.vocab, "world": world, "gpus": gpus,
            "nodes": nodes, "gpu_mem_gb": gpu_mem_gb, "budget_gb": budget / GB, "seq": seq, "micro_batch": micro_batch,
            "precision": precision, "accumulate": accumulate, "rows": rows, "recommendation": rec}


def print_plan(p: dict) -> None:
    print(f"{p['model']}: {p['params'] / 1e6:.1f}M params (vocab rows {p['vocab_rows']}), {p['gpus']} GPU(s) x "
          f"{p['nodes']} node(s) = {p['world']} ranks, {p['gpu_mem_gb']:g} GB/GPU (plan within {p['budget_gb']:.1f} GB), "
          f"seq {p['seq']}, micro-batch {p['micro_batch']} x {p['accumulate']} accumulated, {p['precision']}; GB = 1e9 bytes")
    print("| strategy | params | grads | optim | other | states | act/seq | act/seq ckpt | "
          f"total b={p['micro_batch']} | total b={p['micro_batch']} ckpt | max b | max b ckpt | CPU/rank |")
    print("|---|" + "---:|" * 12)
    for r in p["rows"]:
        print(f"| {r['strategy']} | {r['params_gb']:.2f} | {r['grads_gb']:.2f} | {r['optimizer_gb']:.2f} | "
              f"{r['other_gb']:.2f} | {r['states_gb']:.2f} | {r['act_per_seq_gb']:.2f} | {r['act_per_seq_ckpt_gb']:.2f} | "
              f"{r['total_gb']:.1f} | {r['total_ckpt_gb']:.1f} | {r['max_micro_batch']} | {r['max_micro_batch_ckpt']} | "
              f"{r['cpu_gb']:.1f} |")
    rec = p["recommendation"]
    if rec is None:
        print("recommendation: nothing fits even micro-batch 1 with checkpointing: add GPUs/nodes or use a smaller model")
    else:
        name, ckpt, b = rec
        print(f"recommendation: {name}{' + activation checkpointing' if ckpt else ''}, micro-batch up to {b} "
              f"(first of {' > '.join(['DDP', 'ZeRO-1', 'ZeRO-2', 'FSDP2', 'ZeRO-3', 'FSDP1', 'ZeRO-3 offload'])} "
              "that fits the minimum micro-batch; accumulate gradients for a larger global batch)")


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
        m = r["model"]
        config = build_config(m.get("model_name_or_path", "gpt2"), m.get("config_overrides"))
        shape = shape_from_config(config, int(m.get("pad_vocab_to_multiple_of", 1)))
        precision = str(r.get("precision", "bf16-mixed"))
        if precision not in PRECISIONS:
            rows.append({"bench": path, "error": f"precision {precision}: the planner covers {' and '.join(PRECISIONS)}"})
            continue
        e = estimate("DDP", shape, 1, r["seq"], compiled=bool(m.get("compile")), fused_ce=bool(m.get("fused_cross_entropy")),
                     precision=precision)  # bench.py steps the optimizer every micro-batch: accumulate=1
        ckpt = bool(m.get("activation_checkpointing"))
        est = e.total(r["micro_batch"], ckpt) / GB
        ours = next((x for x in r["rows"] if x["run"] == "gpt2dist" and "error" not in x), None)
        # CPU rows report process RSS, not comparable with the estimate.
        measured = ours["peak_alloc_gib"] * 2**30 / GB if ours and not str(r["device"]).startswith("CPU") else None
        rows.append({"bench": path, "model": m.get("model_name_or_path"), "micro_batch": r["micro_batch"], "seq": r["seq"],
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-large", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local folder")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8, help="micro-batch for the total columns")
    ap.add_argument("--accumulate", type=int, default=1,
                    help="trainer.accumulate_grad_batches: above 1 the gradients stay through every micro-batch's activation peak")
    ap.add_argument("--min-micro-batch", type=int, default=4, help="smallest micro-batch the recommendation accepts")
    ap.add_argument("--pad-vocab", type=int, default=1, help="model.pad_vocab_to_multiple_of (128 on GPUs)")
    ap.add_argument("--eager", action="store_true",
                    help="model.compile=false: eager GELU and loss keep more activations (60 vs 36 B/token/width per layer, 12 vs 4 B/token/vocab row)")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed",
                    help="trainer.precision: bf16-true keeps bf16 weights (+ fp32 masters under DDP) and a bf16 residual stream")
    ap.add_argument("--strategy", action="append", choices=["DDP", *[s for s in STRATEGIES if s != "DDP"]],
                    help="only these rows (repeatable)")
    ap.add_argument("--json", help="also write the plan as JSON here")
    ap.add_argument("--validate", nargs="+", metavar="BENCH_JSON",
                    help="instead: compare the estimate with peak memory measured by tools/bench.py --out")
    args = ap.parse_args(argv)
    if args.validate:
        rows = validate(args.validate)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return {"validation": rows}
    for name in ("gpus", "nodes", "seq", "micro_batch", "accumulate"):
        if getattr(args, name) < 1:
            sys.exit(f"plan: error: --{name.replace('_', '-')} must be >= 1")
    p = plan(args.model, args.gpus, args.nodes, args.gpu_mem_gb, args.seq, args.micro_batch, args.pad_vocab,
             args.eager, args.min_micro_batch, args.strategy, args.precision, args.accumulate)
    print_plan(p)
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=1))
    return p


if __name__ == "__main__":
    main()
