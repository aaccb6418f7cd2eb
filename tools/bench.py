"""Train a config's model for a few steps and print speed and memory, against a baseline.

    python tools/bench.py --config configs/perf/gpt2-large.yaml --baseline hf-trainer --out large.json
    python tools/bench.py --config configs/perf/tiny-cpu.yaml --baseline torch --steps 30
    python tools/bench.py --config configs/perf/gpt2-small.yaml --data both     # real DataModule vs synthetic
    python tools/bench.py --config C.yaml -o model.compile=false -o data.batch_size=8

CONFIG is a `gpt2dist fit` YAML (trainer / model / data sections; several --config merge, the
later wins; `-o key.path=value` overrides one field). Rows, all in this process on one device:

- gpt2dist: the real GPT2Module in a Lightning Trainer, synthetic tokens (uniform random ids,
  generated before the clock starts), or with `--data real` the real TokenBlockDataModule.
- torch: a bare PyTorch loop over the same GPT2Module (same perf knobs, same optimizer and
  schedule): what Lightning's step machinery costs.
- hf-trainer: `transformers.Trainer` on an unpadded GPT2LMHeadModel with the same shape, batch
  and precision, SDPA attention, its fused AdamW (as ours: CUDA and CPU), and `torch_compile` (with
  our compile mode or Inductor options) when ours compiles; one GPU, as ours. With bf16-true it
  steps the bf16 weights with plain AdamW, where ours keeps fp32 master weights (more work for us).

The rows time one device's micro-step: of the config's trainer section only `precision` and
`gradient_clip_val` apply (devices, strategy and accumulate_grad_batches are a cluster run's).

Timing: step time is the time between consecutive step ends (data loading included); on CUDA
they are events on the GPU timeline with no host sync in between (see `Meter`), and the host
syncs the training loop itself makes are counted (`syncs/step`). The median over the timed
steps is reported; `first step` is the first step's time (compile happens there) and
`compile` = first step - median. MFU uses
`gpt2dist.metrics.gpt2_flops_per_token` and the card's dense bf16 peak (unknown on CPU: blank).
Memory: CUDA peak allocated / reserved per row; on CPU, the process's peak RSS sampled at step ends
(freed heap is handed back to the OS before each row, so a row does not inherit most of the last one's,
~15 MiB stays; the Trainer baseline's libraries are loaded before the first row, so every row holds them).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
import difflib
import gc
import inspect
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402
import yaml  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/outfile.py, also under runpy or an import
from outfile import check_out, write_out  # noqa: E402

GiB = 2**30


# ----------------------------------------------------------------------------- config


def _init_params(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _trainer_params() -> set[str]:
    import lightning.pytorch as pl

    return _init_params(pl.Trainer)


def _model_params() -> set[str]:
    from gpt2dist.model import GPT2Module

    return _init_params(GPT2Module)


def _data_params() -> set[str]:
    from gpt2dist.data import TokenBlockDataModule

    return _init_params(TokenBlockDataModule)


# -o SECTION.key: the keys each section's class takes (what `gpt2dist fit` would accept there).
KNOWN_KEYS = {"trainer": _trainer_params, "model": _model_params, "data": _data_params}
# The trainer keys the rows honour; the rest of a fit config's trainer section (devices, strategy,
# accumulate_grad_batches, ...) is a multi-GPU run's, and bench times one device's micro-step.
TRAINER_KEYS_USED = {"precision", "gradient_clip_val"}
KNOWN_KEYS_WHERE = {"trainer": "lightning.pytorch.Trainer", "model": "gpt2dist.model.GPT2Module",
                    "data": "gpt2dist.data.TokenBlockDataModule"}


def load_config(paths: list[str], overrides: list[str]) -> dict:
    from gpt2dist.launch import merge_configs

    cfg: dict = {}
    for p in paths:
        if not Path(p).is_file():
            sys.exit(f"bench: error: --config {p} does not exist")
        cfg = merge_configs(cfg, yaml.safe_load(Path(p).read_text()) or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not all(key.split(".")):
            sys.exit(f"bench: error: -o {item!r} must be key.path=value, e.g. -o model.compile=true")
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            sys.exit(f"bench: error: -o {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                     "quote or fix it, e.g. -o 'model.betas=[0.9, 0.95]'")
        path = key.split(".")
        if path[0] not in KNOWN_KEYS and path[0] != "seed_everything" or path[0] in KNOWN_KEYS and len(path) < 2:
            # -o date.batch_size=2 (or model=...) ran the row with the config's value, saying nothing.
            near = difflib.get_close_matches(path[0], [*KNOWN_KEYS, "seed_everything"], n=1)
            sys.exit(f"bench: error: -o {item!r}: " + (f"{path[0]!r} is not a section" + (f"; did you mean {near[0]}?" if near
                     else "; sections: trainer, model, data, seed_everything") if path[0] not in KNOWN_KEYS else
                     f"give a key of the {path[0]} section, e.g. -o {path[0]}.{sorted(KNOWN_KEYS[path[0]]())[0]}=..."))
        if path[0] in KNOWN_KEYS and len(path) > 1:
            section = cfg.get(path[0])
            if path[1] not in ("class_path", "init_args") and isinstance(section, dict) and "init_args" in section:
                path.insert(1, "init_args")  # else the class_path/init_args unwrapping below would drop it
            elif path[1] == "init_args" and len(path) > 2 and not (isinstance(section, dict) and (
                    "init_args" in section or "class_path" in section)):
                del path[1]  # a flat section: its init_args key would replace the whole section below
            name = path[2] if path[1] == "init_args" and len(path) > 2 else path[1]
            known = KNOWN_KEYS[path[0]]()
            if name not in known | {"class_path", "init_args"}:
                # A typo was silently ignored: the row ran with the config's value.
                near = difflib.get_close_matches(name, known, n=1)
                sys.exit(f"bench: error: -o {item!r}: {path[0]} has no {name!r}"
                         + (f"; did you mean {path[0]}.{near[0]}?" if near else f" (see {KNOWN_KEYS_WHERE[path[0]]})"))
            if path[0] == "trainer" and name not in TRAINER_KEYS_USED:
                # A real Trainer key that no row would use: the rows ran without it, and said nothing.
                sys.exit(f"bench: error: -o {item!r}: bench does not use trainer.{name} (every row is one device, "
                         f"accumulation 1, no strategy; it takes trainer.{', trainer.'.join(sorted(TRAINER_KEYS_USED))}); "
                         + ("use --cpu to run on CPU" if name == "accelerator" else "drop it"))
        node = cfg
        *parents, leaf = path
        for i, part in enumerate(parents):
            if node.get(part) is None:  # absent, or `key:` left empty in the YAML
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                sys.exit(f"bench: error: -o {item!r}: {'.'.join(path[:i + 1])} is {node!r}, not a section; "
                         f"set it whole, e.g. -o {'.'.join(path[:i + 1])}=VALUE")
        node[leaf] = value
    for section in ("model", "data", "trainer"):
        if cfg.get(section) is None:  # absent, or `model:` left empty
            cfg[section] = {}
        if not isinstance(cfg[section], dict):
            sys.exit(f"bench: error: {section} is {cfg[section]!r} in the config, not a section; fix --config")
        if "init_args" in cfg[section]:  # class_path/init_args form
            cfg[section] = cfg[section]["init_args"]
    return cfg


def make_module(cfg: dict, vocab_override: int | None = None):
    from gpt2dist.model import GPT2Module

    kw = dict(cfg["model"])
    if vocab_override is not None:
        kw["config_overrides"] = {**(kw.get("config_overrides") or {}), "vocab_size": vocab_override}
    return GPT2Module(**kw)


def model_config(cfg: dict):
    """The GPT2Config the run trains (unpadded), without building weights."""
    from gpt2dist.model import build_config

    m = cfg["model"]
    return build_config(m.get("model_name_or_path", "gpt2"), m.get("config_overrides"), m.get("dropout"))


# ----------------------------------------------------------------------------- measuring


SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def use_sdpa_backend(name: str, config, block: int, device: torch.device, dtype: torch.dtype) -> str:
    """Restrict SDPA to backend `name` for the rest of the process (every row, eager and compiled:
    the compiled graph takes the kernel chosen when it is traced), and say which kernel SDPA picks
    for this model's causal attention shape, e.g. "attention: flash (--sdpa flash); cuDNN 91500"."""
    from torch.nn.attention import SDPBackend

    if SDPA_BACKENDS[name]:
        # The flags themselves: sdpa_kernel(...).__enter__() would be undone when its generator is collected.
        for key, setter in (("flash", torch.backends.cuda.enable_flash_sdp), ("cudnn", torch.backends.cuda.enable_cudnn_sdp),
                            ("efficient", torch.backends.cuda.enable_mem_efficient_sdp), ("math", torch.backends.cuda.enable_math_sdp)):
            setter(key == name)
    hd = config.n_embd // config.n_head
    q = torch.zeros(1, config.n_head, block, hd, device=device, dtype=dtype)  # GPT-2's (b, heads, seq, head_dim)
    try:
        picked = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
        short = {v: k for k, v in SDPA_BACKENDS.items() if v}.get(picked, picked.lower())
    except RuntimeError:  # the forced backend cannot take this shape or device: the rows fail as well
        short = "none viable"
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    asked = "" if name == "auto" else f" (--sdpa {name})"
    return f"attention: {short}{asked}{f'; cuDNN {cudnn}' if cudnn else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_COUNTING = None  # the Meter whose sync counting is on (switched off if its row fails)


def release_freed_memory() -> None:
    """Hand glibc's freed heap back to the OS (malloc_trim), so RSS measures what a row holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include an earlier row's freed memory
        pass


class Meter:
    """Step-end times, host syncs and memory high-water marks for one row.

    On CUDA each step end records an event and nothing waits for it: the GPU timeline between
    consecutive events is the step time, as in a real run, where the CPU queues the next step's
    work while the GPU still runs this one. (A sync per step would expose the CPU-side loop between
    steps, which training otherwise hides.) The events are read after the last step. The timed
    steps also run under `torch.cuda.set_sync_debug_mode("warn")`: each host sync the training
    loop makes is counted (`syncs_per_step`), from the end of the last warm-up step to the end of
    the last timed step: exactly `steps` iterations. (Counting until `result()` also counted the
    end of fit: Lightning's teardown moves the module and the optimizer state to the CPU, one sync
    per tensor: 175 "syncs/step" for GPT-2 Large on the H200, where the steps made ~2.)"""

    def __init__(self, device: torch.device, warmup: int = 0, steps: int | None = None):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.ends: list[float] = []
        self.events: list = []
        self.rss = 0
        self.start = None
        self.syncs: list | None = None  # warnings recorded while counting
        self._catcher = None

    def begin(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()  # else a row's RSS starts at the previous row's malloc high-water mark
        sync(self.device)
        self.start = time.perf_counter()
        if self.device.type == "cuda":
            self.events = [torch.cuda.Event(enable_timing=True)]
            self.events[0].record()
            if self.warmup == 0:
                self._count_syncs(True)  # step_end starts counting after the last warm-up step: there is none

    def step_end(self) -> None:
        if self.steps is not None and max(len(self.events) - 1, len(self.ends)) >= self.warmup + self.steps:
            return  # a profiled step after the timed ones (--profile): not timed
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
            if len(self.events) - 1 == self.warmup:
                self._count_syncs(True)
            elif self.steps is not None and len(self.events) - 1 == self.warmup + self.steps:
                self._count_syncs(False)
            return
        self.ends.append(time.perf_counter())
        import psutil

        self.rss = max(self.rss, psutil.Process().memory_info().rss)

    def _count_syncs(self, on: bool) -> None:
        global _COUNTING
        _COUNTING = self if on else None
        if on and self._catcher is None:
            self._catcher = warnings.catch_warnings(record=True)
            self.syncs = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif not on and self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None
            self.syncs = [w for w in self.syncs if "synchronizing" in str(w.message)]

    def step_times(self) -> list[float]:
        """Seconds per step, warm-up steps included (on CUDA: read from the events, after a sync)."""
        if self.device.type == "cuda":
            self._count_syncs(False)
            sync(self.device)
            first = self.events[0]
            self.ends = [self.start + first.elapsed_time(e) / 1000 for e in self.events[1:]]
        return [b - a for a, b in zip([self.start, *self.ends[:-1]], self.ends)]

    def result(self, name: str, warmup: int, tokens_per_step: int, flops_per_token: float, peak: float | None) -> dict:
        times = self.step_times()
        timed = times[warmup:]
        if not timed:
            raise RuntimeError(f"{name}: no timed steps ({len(times)} steps ran, warmup {warmup})")
        med = statistics.median(timed)
        tps = tokens_per_step / med
        r = {"run": name, "steps_timed": len(timed), "median_step_s": med, "first_step_s": times[0],
             "compile_s": max(0.0, times[0] - med), "tokens_per_s": tps,
             "mfu": tps * flops_per_token / (peak * 1e12) if peak else None, "step_times_s": times}
        if self.device.type == "cuda":
            r["peak_alloc_gib"] = torch.cuda.max_memory_allocated(self.device) / GiB
            r["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GiB
            r["syncs_per_step"] = len(self.syncs or []) / len(timed)
            where = sorted({str(w.filename).rsplit("site-packages/", 1)[-1] + f":{w.lineno}" for w in self.syncs or []})
            r["sync_sites"] = where[:20]  # the Python lines that synced (first 20)
        else:
            r["peak_alloc_gib"], r["peak_reserved_gib"] = self.rss / GiB, None  # process RSS
        return r


def reset_compiler() -> None:
    """Each row traces and compiles again and frees the previous row's graphs. Inductor's on-disk
    caches stay (as on a user's machine): a row whose graphs an earlier row already compiled (e.g.
    `+ fit callbacks`, `real data`) reports a warm compile time; the first row of a model a cold one
    only on a fresh machine or with an empty TORCHINDUCTOR_CACHE_DIR."""
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- data


class SyntheticBlocks(torch.utils.data.Dataset):
    """Uniform random token blocks, generated up front (no tokenizer, no disk in the way)."""

    def __init__(self, n: int, block_size: int, vocab: int, hf_format: bool = False, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, block_size), generator=g)
        self.hf_format = hf_format

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids} if self.hf_format else {"input_ids": ids}


def synthetic_loader(n_steps: int, batch: int, block: int, vocab: int, device: torch.device):
    ds = SyntheticBlocks(n_steps * batch, block, vocab)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, drop_last=True,
                                       pin_memory=device.type == "cuda", num_workers=0)


def real_datamodule(cfg: dict, cache_dir: str):
    from gpt2dist.data import TokenBlockDataModule

    d = dict(cfg["data"])
    d.setdefault("train_files", ["{stdlib}/*.py"])
    if not d.get("tokenizer") and not d.get("train_tokenizer_vocab_size"):
        d["train_tokenizer_vocab_size"] = 4096  # no hub here: train a small BPE on the corpus
    d.setdefault("val_fraction", 0.0)
    d["cache_dir"] = d.get("cache_dir") or cache_dir
    return TokenBlockDataModule(**d)


# ----------------------------------------------------------------------------- rows


def trainer_kwargs(cfg: dict, device: torch.device, max_steps: int, callbacks: list) -> dict:
    t = cfg["trainer"]
    return dict(accelerator=device.type, devices=1, precision=t["precision"],  # resolve_precision's
                max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                limit_val_batches=0, callbacks=callbacks, gradient_clip_val=t.get("gradient_clip_val"),
                accumulate_grad_batches=1)


KERNEL_KINDS = [  # first match wins: cuDNN's attention kernels are named sm90_... too
    ("attention", r"flash|fmha|sdpa|attention"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|^sm\d+_|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("fused elementwise (Inductor)", r"triton|CompiledFxGraph"),  # CPU: Inductor's C++ runs inside this range
    ("copy / cast", r"copy|memcpy|memset|to_copy|cast|fill"),
]


def kernel_table(prof, device: torch.device, steps: int, step_ms: float | None = None, top: int = 12) -> dict:
    """Where a step's time goes, from a torch.profiler run of `steps` steps: GPU kernel time (on CPU:
    the ops' own CPU time) summed per kind of kernel, and the top kernels. Printed as two tables.
    `step_ms`: the median timed step (unprofiled: the profiler slows the CPU side); the kernels' share
    of it says whether the GPU waits on the host (a low share) or the kernels themselves are slow."""
    import re

    from torch.autograd import DeviceType

    cuda = device.type == "cuda"
    # User annotations (`Optimizer.step#AdamW.step`, `ProfilerStep#`) are ranges on the GPU timeline
    # spanning other kernels, not kernels: counted, they doubled the H200 Large table (371 ms of a 191 ms step).
    # (On CPU they stay: Inductor's C++ runs inside its `CompiledFxGraph` range.)
    events = [e for e in prof.key_averages() if not (cuda and getattr(e, "is_user_annotation", False))]
    rows = [(e.key, e.count, e.self_device_time_total if cuda else e.self_cpu_time_total) for e in events
            if not cuda or e.device_type == DeviceType.CUDA]
    if cuda and not any(us > 0 for *_, us in rows):  # kernels not listed apart: the ops' own device time
        rows = [(e.key, e.count, e.self_device_time_total) for e in events]
    rows = [r for r in rows if r[2] > 0]
    total = sum(us for _, _, us in rows) or 1.0
    kinds: dict[str, float] = {}
    for name, _, us in rows:
        kind = next((k for k, pat in KERNEL_KINDS if re.search(pat, name, re.I)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    ms = 1e3 * steps  # microseconds over all steps -> ms per step
    out = {"steps": steps, "clock": "GPU kernels" if cuda else "CPU ops (self time)",
           "total_ms_per_step": total / ms, "median_step_ms": step_ms,
           "kinds": {k: v / ms for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
           "top": [{"name": n, "calls_per_step": c / steps, "ms_per_step": us / ms}
                   for n, c, us in sorted(rows, key=lambda r: -r[2])[:top]]}
    lines = [f"profile of the gpt2dist row: {steps} step(s) after the timed ones, {out['clock']}, "
             f"{out['total_ms_per_step']:.1f} ms/step in all"
             + (f", {100 * out['total_ms_per_step'] / step_ms:.0f}% of the {step_ms:.1f} ms median timed step"
                if step_ms else ""),
             "", "| kind | ms/step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {100 * v / out['total_ms_per_step']:.1f}% |" for k, v in out["kinds"].items()]
    lines += ["", "| kernel | calls/step | ms/step | share |", "|---|---:|---:|---:|"]
    lines += [f"| `{t['name'][:90]}` | {t['calls_per_step']:g} | {t['ms_per_step']:.2f} | "
              f"{100 * t['ms_per_step'] / out['total_ms_per_step']:.1f}% |" for t in out["top"]]
    out["text"] = "\n".join(lines)
    return out


def run_ours(cfg: dict, args, device: torch.device, real: bool, callbacks: bool = False) -> tuple[dict, Meter]:
    """`callbacks`: also the per-step callbacks `gpt2dist fit` adds by default (TrainMonitor, the
    NaN guard of FaultTolerance) and its progress bar, to show what they cost."""
    import lightning.pytorch as pl

    meter = Meter(device, args.warmup, args.steps)

    class StepTimer(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            meter.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.step_end()

    profiled: dict = {}
    timed_steps = args.warmup + args.steps
    profile = getattr(args, "profile", 0) if not (real or callbacks) else 0

    class Profile(pl.Callback):  # --profile: steps after the timed ones, under torch.profiler
        prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == timed_steps:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.prof is not None and batch_idx == timed_steps + profile - 1:
                sync(device)
                self.prof.__exit__(None, None, None)
                step_ms = 1e3 * statistics.median(meter.step_times()[args.warmup:timed_steps])
                profiled.update(kernel_table(self.prof, device, profile, step_ms, getattr(args, "profile_top", 12)))
                self.prof = None

    pl.seed_everything(cfg.get("seed_everything", 1234), verbose=False)
    steps = timed_steps + profile
    extra = []
    if callbacks:
        from gpt2dist.faults import FaultTolerance
        from gpt2dist.monitor import TrainMonitor

        extra = [TrainMonitor(), FaultTolerance()]
    kw = trainer_kwargs(cfg, device, steps, [*extra, StepTimer(), *([Profile()] if profile else [])])
    kw["enable_progress_bar"] = callbacks  # the bar `gpt2dist fit` shows reads metrics every batch
    trainer = pl.Trainer(**kw)
    vocab = model_config(cfg).vocab_size
    if real:
        # Same compute as synthetic: keep the model's vocabulary, whatever the tokenizer's size.
        module = make_module(cfg, vocab_override=vocab)
        dm = real_datamodule(cfg, args.cache_dir)
        trainer.fit(module, datamodule=dm)
    else:
        module = make_module(cfg)
        trainer.fit(module, train_dataloaders=synthetic_loader(steps, args.batch, args.block, vocab, device))
    info = {"vocab_rows": module.model.config.vocab_size, "vocab": module.vocab_size}
    if profiled:
        print(profiled["text"], flush=True)  # at once: a later row that times out must not take it along
        info["profile"] = {k: v for k, v in profiled.items() if k != "text"}
    del trainer, module
    return info, meter


AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning's MixedPrecision
WEIGHTS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}  # its HalfPrecision, DoublePrecision
BASELINE_PRECISIONS = ("32-true", *AUTOCAST, *WEIGHTS)


def resolve_precision(cfg: dict, device: torch.device, baseline: str) -> str:
    """trainer.precision as the gpt2dist row's Trainer runs it, from Lightning itself: its aliases (bf16 is
    bf16-mixed, 16 is 16-mixed) and its switch of fp16 AMP on CPU to bf16-mixed. Every row then runs this
    one precision: a baseline that read the raw value ran fp32 against our bf16 (hf-trainer on CPU, alias 16)."""
    import lightning.pytorch as pl

    raw = cfg["trainer"].get("precision", "bf16-mixed" if device.type == "cuda" else "32-true")
    try:
        precision = str(pl.Trainer(accelerator=device.type, devices=1, precision=raw, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False).precision)
    except Exception as e:  # ValueError, MisconfigurationException: Lightning's own message
        sys.exit(f"bench: error: trainer.precision={raw!r}: {str(e).splitlines()[0]}")
    if baseline != "none" and precision not in BASELINE_PRECISIONS:
        sys.exit(f"bench: error: trainer.precision={raw!r} ({precision}): the {baseline} baseline cannot run it; "
                 f"use one of {', '.join(BASELINE_PRECISIONS)} or --baseline none")
    return precision


def autocast_ctx(precision: str, device: torch.device):
    if precision in AUTOCAST:
        return torch.autocast(device.type, dtype=AUTOCAST[precision])
    return contextlib.nullcontext()


def run_torch(cfg: dict, args, device: torch.device) -> Meter:
    """The same GPT2Module, optimizer and schedule in a bare loop (no Lightning)."""
    from types import SimpleNamespace

    import lightning.pytorch as pl

    pl.seed_everything(cfg.get("seed_everything", 1234), verbose=False)
    precision = cfg["trainer"]["precision"]  # resolve_precision's
    steps = args.warmup + args.steps
    module = make_module(cfg)
    with torch.device(device):
        module.configure_model()
    module.to(device)
    if precision in WEIGHTS:
        module.to(WEIGHTS[precision])
    module.train()
    # fp16 AMP scales the loss, as Lightning's MixedPrecision("16-mixed") and HF's fp16 do.
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    # Under a scaler configure_optimizers picks the unfused AdamW, as it does for our Lightning row: without the
    # plugin the loop stepped the fused kernel, and the overhead line compared two kernels.
    module.trainer = SimpleNamespace(max_steps=steps, estimated_stepping_batches=steps, strategy=None,
                                     precision_plugin=SimpleNamespace(scaler=scaler))
    opt_cfg = module.configure_optimizers()
    module.trainer = None
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    clip = cfg["trainer"].get("gradient_clip_val")
    loader = synthetic_loader(steps, args.batch, args.block, model_config(cfg).vocab_size, device)
    meter = Meter(device, args.warmup, args.steps)
    meter.begin()
    for batch in loader:
        ids = batch["input_ids"].to(device, non_blocking=True)
        with autocast_ctx(precision, device):
            loss = module.token_losses(ids).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        meter.step_end()
    del module, opt, sched
    return meter


def run_hf_trainer(cfg: dict, args, device: torch.device) -> Meter:
    """`transformers.Trainer` on the same (unpadded) GPT-2 shape, batch and precision."""
    try:
        import accelerate  # noqa: F401  (Trainer refuses to start without it)
    except ImportError:
        raise RuntimeError("hf-trainer baseline needs `accelerate` (pip install accelerate; offline: carry "
                           "accelerate-*-py3-none-any.whl in .whl/)") from None
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    m, t = cfg["model"], cfg["trainer"]
    precision = t["precision"]  # resolve_precision's
    config = model_config(cfg)
    config._attn_implementation = m.get("attn_implementation", "sdpa")
    config.use_cache = False  # as ours trains: the default built a KV cache in every training forward
    torch.manual_seed(cfg.get("seed_everything", 1234))
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    if precision in WEIGHTS:
        model.to(WEIGHTS[precision])
    steps = args.warmup + args.steps
    meter = Meter(device, args.warmup, args.steps)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            meter.begin()

        def on_step_end(self, *a, **k):
            meter.step_end()

    cuda = device.type == "cuda"
    # transformers 5.x renamed gradient_checkpointing (deprecated, gone in v6); pyproject allows >= 4.45.
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"), per_device_train_batch_size=args.batch, max_steps=steps,
        learning_rate=m.get("lr", 1e-4), weight_decay=m.get("weight_decay", 0.1),
        adam_beta1=m.get("betas", (0.9, 0.95))[0], adam_beta2=m.get("betas", (0.9, 0.95))[1],
        warmup_steps=m.get("warmup_steps", 100), lr_scheduler_type="cosine",
        # AMP as ours: bf16 on CUDA and CPU; fp16 only reaches here on CUDA (Lightning makes it bf16 on CPU).
        bf16=AUTOCAST.get(precision) == torch.bfloat16, fp16=AUTOCAST.get(precision) == torch.float16,
        tf32=bool(m.get("tf32", True)) if cuda else None,
        # Fused where ours is (model.py: CUDA and CPU): a for-loop AdamW is ~9x slower on CPU
        # (model.py's measurement) and would flatter our ratio.
        # Not under 16-mixed: ours steps the unfused AdamW there (Lightning clips no fused step under a GradScaler).
        optim="adamw_torch_fused" if device.type in ("cuda", "cpu") and precision != "16-mixed" else "adamw_torch",
        # Only with compile: a mode alone turns Trainer's torch_compile on (TrainingArguments.__post_init__).
        torch_compile=bool(m.get("compile", False)), torch_compile_mode=m.get("compile_mode") if m.get("compile") else None,
        **{ckpt: bool(m.get("activation_checkpointing", False))},
        max_grad_norm=t.get("gradient_clip_val") or 0.0,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_pin_memory=cuda, dataloader_num_workers=0, use_cpu=not cuda, seed=cfg.get("seed_everything", 1234),
    )
    # Single-process Trainer takes every visible GPU as nn.DataParallel (n_gpu = device_count): on an
    # 8-GPU node it would time DataParallel with an 8x batch against our one device.
    _ = targs.device  # sets _n_gpu (0 on CPU) once; it is not computed again
    targs._n_gpu = min(targs._n_gpu, 1)
    ds = SyntheticBlocks(steps * args.batch, args.block, config.vocab_size, hf_format=True)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, callbacks=[Timer()])
    # model.compile_options are Inductor config (torch.compile(options=) patches it for its graphs);
    # Trainer has no such argument, so its compile gets them as a patch around the run.
    from torch._inductor import config as inductor_config

    options = m.get("compile_options") if m.get("compile") else None
    with inductor_config.patch(options) if options else contextlib.nullcontext():
        trainer.train()
    del trainer, model
    return meter


# ----------------------------------------------------------------------------- report


def fmt_table(rows: list[dict], device_name: str) -> str:
    mem_hdr = "peak alloc GiB" if "cuda" in device_name.lower() or "nvidia" in device_name.lower() else "peak RSS GiB"
    lines = [f"| run | median step ms | tokens/s/device | MFU | {mem_hdr} | peak reserved GiB | first step s | compile s | "
             "syncs/step | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        res = f"{r['peak_reserved_gib']:.2f}" if r.get("peak_reserved_gib") is not None else "-"
        syncs = f"{r['syncs_per_step']:.1f}" if r.get("syncs_per_step") is not None else "-"
        ratio = "-" if math.isnan(r["ratio"]) else f"{r['ratio']:.3f}"  # NaN: no row of ours to compare with
        lines.append(f"| {r['run']} | {1000 * r['median_step_s']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{r['peak_alloc_gib']:.2f} | {res} | {r['first_step_s']:.2f} | {r['compile_s']:.2f} | "
                     f"{syncs} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True, help="gpt2dist fit YAML (repeatable; later wins)")
    ap.add_argument("-o", "--override", action="append", default=[], help="key.path=value (YAML value)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator warm-up)")
    ap.add_argument("--baseline", choices=["hf-trainer", "torch", "none"], default="torch")
    ap.add_argument("--data", choices=["synthetic", "real", "both"], default="synthetic",
                    help="real: the TokenBlockDataModule of the config's data section; both: real and synthetic rows")
    ap.add_argument("--callbacks", action="store_true",
                    help="also a row with the per-step callbacks of `gpt2dist fit` (TrainMonitor, NaN guard)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the rows R times in turn (A B A B ...) and keep each row's fastest repeat: "
                         "shields the comparison from other processes on a shared machine")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (default: looked up by name)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="K more steps of the gpt2dist row, after the timed ones, under torch.profiler: "
                         "kernel time per step by kind (matmul, attention, Inductor's fused kernels, optimizer) "
                         "and the top kernels")
    ap.add_argument("--profile-top", type=int, default=12, metavar="T", help="how many of the top kernels --profile lists")
    ap.add_argument("--sdpa", choices=sorted(SDPA_BACKENDS), default="auto",
                    help="attention kernel for every row (auto: SDPA's own priority; on Hopper torch may "
                         "put cuDNN before flash): the A/B of the attention backend")
    ap.add_argument("--out", help="write all rows as JSON here")
    args = ap.parse_args(argv)
    if args.profile_top < 1:  # a slice by 0 or less would list no kernels, or all but the last few
        sys.exit(f"bench: error: --profile-top {args.profile_top} must be >= 1")
    # 0 timed steps failed every row after running them; 0 repeats had no row to report (IndexError).
    for flag, value, least in (("--steps", args.steps, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--profile", args.profile, 0)):
        if value < least:
            sys.exit(f"bench: error: {flag} {value} must be >= {least}")
    warnings.filterwarnings("ignore", message=".*(set_vital|LeafSpec|does not have many workers|tokens.*EOS).*")

    from gpt2dist.data import TokenBlockDataModule
    from gpt2dist.errors import ConfigError
    from gpt2dist.metrics import gpt2_flops_per_token, peak_bf16_flops
    from gpt2dist.model import _check_block_size

    cfg = load_config(args.config, args.override)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        cfg["trainer"]["accelerator"] = "cpu"
    # The DataModule's own defaults when the config leaves them out: what `gpt2dist fit` would train.
    data_defaults = inspect.signature(TokenBlockDataModule.__init__).parameters
    for knob in ("batch_size", "block_size"):
        value = cfg["data"].get(knob, data_defaults[knob].default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # a traceback (abc, null), or 0 rows
            sys.exit(f"bench: error: data.{knob}={value!r} must be a whole number >= 1 (the config or -o data.{knob}=N)")
    args.batch, args.block = int(cfg["data"].get("batch_size", data_defaults["batch_size"].default)), \
        int(cfg["data"].get("block_size", data_defaults["block_size"].default))
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        sys.exit(f"bench: error: --peak-tflops {args.peak_tflops} must be a positive number (the card's dense bf16 "
                 "TFLOP/s), or left out to look the card up")
    try:  # on CUDA an overlong block is a device-side assert that breaks every later row
        config = model_config(cfg)  # a bad config_overrides (n_head 3 of n_embd 64): one line, not a traceback
        _check_block_size(args.block, config.n_positions)
    except ConfigError as e:
        sys.exit(f"bench: error: {e}")
    check_out(args.out, "bench")  # before minutes of rows, not a traceback after them
    args.cache_dir = tempfile.mkdtemp(prefix="bench-cache-")  # the real-data row's packed blocks
    atexit.register(shutil.rmtree, args.cache_dir, ignore_errors=True)
    found = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    peak = args.peak_tflops if args.peak_tflops is not None else (found[1] / 1e12 if found else None)  # TFLOP/s
    fpt = gpt2_flops_per_token(config, args.block)  # the config is not padded yet: its vocab is the real one
    tokens_per_step = args.batch * args.block
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    precision = cfg["trainer"]["precision"] = resolve_precision(cfg, device, args.baseline)
    m = cfg["model"]
    attention = use_sdpa_backend(args.sdpa, config, args.block, device,
                                 AUTOCAST.get(precision) or WEIGHTS.get(precision) or torch.float32)
    print(f"device: {dev_name}; torch {torch.__version__}; {attention}; peak {peak or 'unknown'} TFLOP/s; model "
          f"{m.get('model_name_or_path', 'gpt2')} L{config.n_layer} d{config.n_embd} V{config.vocab_size}; "
          f"micro-batch {args.batch} x seq {args.block} = {tokens_per_step} tokens/step; precision {precision}; "
          f"compile {bool(m.get('compile'))}{' ' + m['compile_mode'] if m.get('compile') and m.get('compile_mode') else ''}; pad_vocab {m.get('pad_vocab_to_multiple_of', 1)}; "
          f"act-ckpt {bool(m.get('activation_checkpointing'))}; fused CE {bool(m.get('fused_cross_entropy'))}; "
          f"{'bias after matmul; ' if m.get('bias_after_matmul') else ''}"
          f"{'compile options ' + str(m['compile_options']) + '; ' if m.get('compile_options') else ''}"
          f"{fpt / 1e9:.3f} GFLOP/token; steps {args.warmup} warmup + {args.steps} timed", flush=True)

    plan = [("gpt2dist", "ours-synthetic")] if args.data in ("synthetic", "both") else []
    if args.callbacks:
        plan.append(("gpt2dist + fit callbacks", "ours-callbacks"))
    if args.data in ("real", "both"):
        plan.append(("gpt2dist (real data)", "ours-real"))
    if args.baseline != "none":
        plan.append((args.baseline, args.baseline))
    results: dict[str, list[dict]] = {name: [] for name, _ in plan}
    extra = {}
    if args.baseline == "hf-trainer" and device.type == "cpu":
        # Loaded before the first row, so every row's RSS holds them: imported inside the Trainer row, they put
        # ~86 MiB (transformers.Trainer + accelerate) into its peak alone, and the tiny CPU table read the
        # Trainer as using 18% more memory, where from its own start it used less.
        with contextlib.suppress(ImportError):
            import accelerate  # noqa: F401
            from transformers import Trainer  # noqa: F401
    for rep in range(args.repeats):
        for name, kind in plan:
            if results[name] and "error" in results[name][-1]:
                continue
            reset_compiler()
            try:
                if kind.startswith("ours"):
                    info, meter = run_ours(cfg, args, device, real=kind == "ours-real", callbacks=kind == "ours-callbacks")
                    extra.update(info)
                elif kind == "torch":
                    meter = run_torch(cfg, args, device)
                else:
                    meter = run_hf_trainer(cfg, args, device)
                results[name].append(meter.result(name, args.warmup, tokens_per_step, fpt, peak))
            except Exception as e:  # one failed row must not hide the others
                import traceback

                if _COUNTING is not None:
                    _COUNTING._count_syncs(False)

                traceback.print_exc()
                results[name].append({"run": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            r = results[name][-1]
            # Printed at once: a later row that times out (e.g. a slow baseline compile) must not
            # take this row's numbers with it (seen on the H100: the whole table was lost).
            summary = r.get("error") or (f"median step {r['median_step_s'] * 1e3:.1f} ms, "
                                         f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r.get('mfu')}, "
                                         f"peak alloc {r.get('peak_alloc_gib')} GiB")
            print(f"row done: {name} (repeat {rep + 1}/{args.repeats}): {summary}", flush=True)
    rows = []
    for name, tries in results.items():
        good = [r for r in tries if "error" not in r]
        best = min(good, key=lambda r: r["median_step_s"]) if good else tries[-1]
        if good:
            best["repeat_medians_s"] = [r["median_step_s"] for r in good]
        rows.append(best)

    # A failed gpt2dist row falls back to another of ours (e.g. real data), never to a baseline:
    # that gave the baseline ratio 1.000, as if it were our number.
    kinds = dict(plan)
    ours = next((r for r in rows if r["run"] == "gpt2dist" and "error" not in r), None) or next(
        (r for r in rows if kinds[r["run"]].startswith("ours") and "error" not in r), None)
    for r in rows:
        if "error" not in r:
            # ratio: gpt2dist's tokens/s over this row's (1.000 on our own row; > 1 = we are faster).
            r["ratio"] = ours["tokens_per_s"] / r["tokens_per_s"] if ours else math.nan
    print()
    print(fmt_table(rows, dev_name if device.type == "cpu" else "cuda"))
    notes = []
    ok = {r["run"]: r for r in rows if "error" not in r}
    if "gpt2dist" in ok and "torch" in ok:
        over = ok["gpt2dist"]["median_step_s"] / ok["torch"]["median_step_s"] - 1
        notes.append(f"Lightning step overhead vs bare torch loop: {100 * over:+.1f}% of step time (target <= 5%)")
    if "gpt2dist" in ok and "hf-trainer" in ok:
        notes.append(f"speed-up over transformers.Trainer: {ok['gpt2dist']['tokens_per_s'] / ok['hf-trainer']['tokens_per_s']:.2f}x "
                     "tokens/s (target >= 1.5x)")
    if "gpt2dist" in ok and "gpt2dist (real data)" in ok:
        d = ok["gpt2dist (real data)"]["tokens_per_s"] / ok["gpt2dist"]["tokens_per_s"] - 1
        notes.append(f"real DataModule vs synthetic tokens/s: {100 * d:+.1f}% (target within 3%)")
    if "gpt2dist" in ok and "gpt2dist + fit callbacks" in ok:
        c = ok["gpt2dist + fit callbacks"]["median_step_s"] / ok["gpt2dist"]["median_step_s"] - 1
        notes.append(f"fit callbacks (TrainMonitor, NaN guard): {100 * c:+.1f}% step time")
    for r in rows:
        if r.get("sync_sites"):
            notes.append(f"{r['run']}: host syncs at {', '.join(r['sync_sites'][:6])}")
    for n in notes:
        print(n)
    result = {"device": dev_name, "torch": torch.__version__, "config": args.config, "overrides": args.override,
              "precision": precision, "micro_batch": args.batch, "seq": args.block, "tokens_per_step": tokens_per_step,
              "flops_per_token": fpt, "peak_tflops": peak, "attention": attention, "model": cfg["model"], **extra, "rows": rows, "notes": notes}
    if args.out:
        write_out(args.out, json.dumps(result, indent=1, default=str), "bench")
    return result


if __name__ == "__main__":
    # Exit 1 when a row failed in every repeat: the table above still has the good rows, but a caller
    # (tools/gpu_check_perf.sh) reads the exit status, and a CUDA OOM in a row read as a pass.
    failed = [r["run"] for r in main()["rows"] if "error" in r]
    if failed:
        print(f"bench: failed rows: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
